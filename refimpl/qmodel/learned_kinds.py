"""The QAT quantizer kinds MQBench (Li et al. 2021) benchmarked next to LSQ and DSQ: "pact",
"dorefa" and "qil", registered with ``register_kind`` when ``refimpl.qmodel`` is imported.

Each kind is a :class:`~refimpl.qmodel.quantizers.QuantizerKind` around the pure math of
``refimpl.quant.pact``, ``refimpl.quant.dorefa`` and ``refimpl.quant.qil``:

* "pact" (Choi et al. 2018): activations clipped at a learned ``alpha`` (and ``beta`` at signed
  asymmetric sites), weights quantized as in DoReFa (MQBench's setting);
* "dorefa" (Zhou et al. 2016): the tanh-normalised weight on a min-max grid (or the paper's
  grid, option ``paper_grid``), activations clipped to [0, 1] or [-1, 1]; nothing learned but
  the weights;
* "qil" (Jung et al. 2019): a learned interval (``center``, ``distance``) and, for weights, the
  exponent ``gamma`` (learned only with the option ``learn_gamma``).

All three have ``affine = False``: DoReFa's and QIL's outputs are in normalised units, not the
input's ([-1, 1] or [0, 1]; a BN after the layer absorbs the scale), and PACT's weights are
DoReFa's, so ``refimpl.qmodel.freeze`` leaves them in their kind after QAT. ``export`` returns
the grid where it is a plain affine grid on the tensor quantized (PACT's and DoReFa's
activations), else raises TypeError. They are registered from this module, inside the
``refimpl`` package, so ``unregister_kind`` refuses to remove them, as the kinds of
``quantizers``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant import dorefa_act, dorefa_weight, lsq_grad_scale, pact_quant, pact_range, qil_act, qil_weight, qparams
from .quantizers import Quantizer, QuantizerKind, WeightQuantizer, register_kind

__all__ = ["PACT", "DoReFa", "QIL"]

_EPS = torch.finfo(torch.float32).eps


def _drop(q: Quantizer, names) -> None:
    """Remove the kind's own Parameters and buffers from q."""
    for name in names:
        q._parameters.pop(name, None)
        q._buffers.pop(name, None)


def _set_grid(q: Quantizer, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
    """Write a kind's affine grid into q's (scale, zero_point) tensors when it leaves the kind."""
    with torch.no_grad():
        q.scale = scale.detach().to(device=q.scale.device, dtype=torch.float32).clone()
        q.zero_point = zero_point.detach().to(device=q.zero_point.device, dtype=torch.float32).clone()


def _grid_export(scale: torch.Tensor, zero_point: torch.Tensor) -> dict:
    return {"scale": scale.detach().clone(), "zero_point": zero_point.detach().to(torch.int32)}


@register_kind
class PACT(QuantizerKind):
    """PACT (Choi et al. 2018, Eq. 1-3; ``refimpl.quant.pact_quant``) as MQBench ran it.

    Activations: the Parameter ``alpha`` (0-d, initialised to ``PACT.alpha_init`` = 6.0, the
    paper's and MQBench's value, not from calibration), range (0, α) at unsigned sites
    (``spec.signed`` False), (-α, α) at signed symmetric sites and (β, α) at signed asymmetric
    sites with a second Parameter ``beta`` (``PACT.beta_init`` = -6.0); the spec's grid over that
    range, ``qparams(lower, upper, spec)``. Gradient in α: Eq. 3 (1 where x >= α; -1 where
    x <= -α in the symmetric range), in β: 1 where x <= β; x straight-through inside the range.
    In training mode α is replaced by abs(α) (floored at float32 eps) before each forward, as
    MQBench does, and β kept below α.

    Weights: DoReFa's (``refimpl.quant.dorefa_weight``, MQBench's min-max grid; "Weights are
    quantized as in DoReFa"), nothing learned but the weight; the output is in normalised units,
    [-1, 1]. ``export``: the activation grid {"scale", "zero_point"}; TypeError for a weight.
    Leaving the kind writes an activation's learned grid into (scale, zero_point) and removes
    ``alpha`` and ``beta``. MQBench's 8-bit exception (no clipping at 8 bits) is not reproduced.
    """

    name = "pact"
    requires_range = False
    trainable = True
    affine = False
    alpha_init = 6.0
    beta_init = -6.0

    @staticmethod
    def _asymmetric(q) -> bool:
        return bool(q.spec.signed) and not q.spec.symmetric

    def learnable(self, q):
        if isinstance(q, WeightQuantizer):
            return ()
        return ("alpha", "beta") if self._asymmetric(q) else ("alpha",)

    def init(self, q):
        if isinstance(q, WeightQuantizer):
            return
        if not isinstance(getattr(q, "alpha", None), nn.Parameter):
            q.alpha = nn.Parameter(torch.tensor(self.alpha_init, device=q.scale.device))
        if self._asymmetric(q) and not isinstance(getattr(q, "beta", None), nn.Parameter):
            q.beta = nn.Parameter(torch.tensor(self.beta_init, device=q.scale.device))

    def loaded(self, q):
        pass

    def _grid(self, q):
        return qparams(*pact_range(q.spec, q.alpha.detach(), q.beta.detach() if self._asymmetric(q) else None),
                       q.spec)

    def leave(self, q):
        if not isinstance(q, WeightQuantizer):
            _set_grid(q, *self._grid(q))
        _drop(q, ("alpha", "beta"))

    def forward(self, q, x, elements):
        if isinstance(q, WeightQuantizer):
            return dorefa_weight(x, q.spec)
        beta = q.beta if self._asymmetric(q) else None
        if q.training:
            with torch.no_grad():
                q.alpha.copy_(q.alpha.abs().clamp(min=_EPS))
                if beta is not None:
                    beta.clamp_(max=float(q.alpha.detach()) * (1 - _EPS))
        return pact_quant(x, q.alpha, q.spec, beta)

    def export(self, q):
        if isinstance(q, WeightQuantizer):
            raise TypeError("a 'pact' weight is DoReFa's: a grid on tanh(w)/max|tanh(w)|, not on the weight, "
                            "which an affine runtime cannot express")
        return _grid_export(*self._grid(q))


@register_kind
class DoReFa(QuantizerKind):
    """DoReFa-Net (Zhou et al. 2016; ``refimpl.quant.dorefa_weight``, ``dorefa_act``) as MQBench ran it.

    Weights: t = tanh(w)/max|tanh(w)| per tensor (autograd through tanh and the max), on the
    quantizer's spec grid with (scale, zero_point) from the min-max of t, recomputed every
    forward (MQBench's variant, the default); with the option ``paper_grid`` (default False) the
    paper's Eq. 9 grid, 2^b levels -1 + 2i/(2^b - 1). The output is in normalised units,
    [-1, 1]. Activations: clipped to [0, 1] at unsigned sites (the paper, MQBench's academic
    setting) and [-1, 1] at signed sites (MQBench's hardware setting), on the spec's grid over
    that fixed range, straight-through inside it. Nothing is learned but the weights (``trainable``
    is True so that ``qat_pipeline`` trains with it). The calibrated (scale, zero_point) are not
    used. ``export``: an activation's fixed grid; TypeError for a weight.
    """

    name = "dorefa"
    requires_range = False
    trainable = True
    affine = False

    def options(self, q):
        return {"paper_grid": False} if isinstance(q, WeightQuantizer) else {}

    @staticmethod
    def _act_grid(q):
        return qparams(-1.0 if q.spec.signed else 0.0, 1.0, q.spec)

    def leave(self, q):
        if not isinstance(q, WeightQuantizer):
            _set_grid(q, *self._act_grid(q))

    def forward(self, q, x, elements):
        if isinstance(q, WeightQuantizer):
            return dorefa_weight(x, q.spec, paper_grid=q.paper_grid)
        return dorefa_act(x, q.spec)

    def export(self, q):
        if isinstance(q, WeightQuantizer):
            raise TypeError("a 'dorefa' weight is quantized on a grid of tanh(w)/max|tanh(w)|, not of the "
                            "weight, which an affine runtime cannot express")
        return _grid_export(*self._act_grid(q))


@register_kind
class QIL(QuantizerKind):
    """QIL (Jung et al. 2019; ``refimpl.quant.qil_weight``, ``qil_act``) as MQBench ran it.

    Learns the interval's centre ``center`` and half-width ``distance`` (0-d Parameters, per
    tensor), both initialised to m/2 with m the largest magnitude of the calibrated range (the
    weight's min-max range, an activation site's calibration range), so that the interval
    [c - d, c + d] = [0, m] starts as the range: MQBench initialises them the same way from the
    first batch it sees; here calibration, which every QAT run starts with, gives m, and a loaded
    ``state_dict`` keeps the learned values (the buffer ``qil_range`` records m). Weights also
    have ``gamma`` (0-d, init 1), trained only with the option ``learn_gamma`` (default False,
    because MQBench reports that learning γ does not converge; True sets ``gamma.requires_grad``).

    Forward: weights on q_D = 2^(b-1) - 1 levels per sign (b >= 2); unsigned activations
    clamp(αx + β, 0, 1) on 2^b - 1 levels (the paper's clamp; MQBench's released code omits it
    for unsigned activations); signed activations sign(x) clamp(α|x| + β, 0, 1) on 2^(b-1) - 1
    levels per sign (MQBench). c and d get the gradient scale 1/sqrt(numel q_max)
    (``lsq_grad_scale`` of the quantized tensor's numel, the batch included for activations, and
    the spec's q_max), MQBench's replacement for QIL's 0.01. In training mode c and d are
    replaced by abs(c) and abs(d) and capped at max|x|/2 of the current input before each forward (d
    floored at float32 eps), as MQBench does. Outputs are in normalised units. ``export`` raises
    TypeError; MQBench's 8-bit exception (a plain min-max grid at 8 bits) is not reproduced.
    """

    name = "qil"
    requires_range = True
    trainable = True
    affine = False

    def options(self, q):
        return {"learn_gamma": False} if isinstance(q, WeightQuantizer) else {}

    def learnable(self, q):
        return ("center", "distance", "gamma") if isinstance(q, WeightQuantizer) else ("center", "distance")

    def init(self, q):
        weight = isinstance(q, WeightQuantizer)
        if q.spec.bits < 2 and (weight or q.spec.signed):
            raise ValueError(f"the 'qil' quantizer kind needs bits >= 2 for weights and signed activations "
                             f"(2^(b-1) - 1 levels per sign), got spec {q.spec}")
        dev = q.scale.device
        if not isinstance(getattr(q, "center", None), nn.Parameter):
            q.center = nn.Parameter(torch.ones((), device=dev))
            q.distance = nn.Parameter(torch.ones((), device=dev))
            q.register_buffer("qil_range", torch.zeros((), device=dev))
        if weight and not isinstance(getattr(q, "gamma", None), nn.Parameter):
            q.gamma = nn.Parameter(torch.ones((), device=dev))
        if weight:
            q.gamma.requires_grad_(q.learn_gamma)
        self.update(q)

    def option_changed(self, q, name):
        q.gamma.requires_grad_(q.learn_gamma)

    @staticmethod
    def _top(q) -> torch.Tensor:
        """The largest magnitude of the calibrated range (scale, zero_point), over channels."""
        s, z = q.scale.detach().float(), q.zero_point.detach().float()
        if q.spec.symmetric:
            # refimpl.quant.qparams inverted: scale = max|x| / ((qmax - qmin) / 2)
            top = s * ((q.spec.qmax - q.spec.qmin) / 2)
        else:
            top = torch.maximum((s * (q.spec.qmin - z)).abs(), (s * (q.spec.qmax - z)).abs())
        return top.max().clamp(min=_EPS)

    def update(self, q):
        with torch.no_grad():
            m = self._top(q).to(q.qil_range.device)
            # a loaded state_dict brings the learned interval and the range it started from: keep it
            if not torch.equal(m, q.qil_range):
                q.center.data = m / 2
                q.distance.data = m / 2
                q.qil_range.copy_(m)

    def loaded(self, q):
        self.update(q)
        if isinstance(q, WeightQuantizer):
            q.gamma.requires_grad_(q.learn_gamma)

    def leave(self, q):
        _drop(q, ("center", "distance", "gamma", "qil_range"))

    def forward(self, q, x, elements):
        if q.training:
            with torch.no_grad():
                half = max(float(x.detach().abs().max()) / 2, _EPS)
                q.center.copy_(q.center.abs().clamp(max=half))
                q.distance.copy_(q.distance.abs().clamp(min=_EPS, max=half))
        g = lsq_grad_scale(x.numel(), q.spec)
        if isinstance(q, WeightQuantizer):
            return qil_weight(x, q.center, q.distance, q.gamma, q.spec.bits, grad_scale=g)
        return qil_act(x, q.center, q.distance, q.spec.bits, signed=bool(q.spec.signed), grad_scale=g)

    def export(self, q):
        raise TypeError("a 'qil' quantizer outputs normalised values through a learned nonlinear "
                        "transformer, not an affine grid on its input")

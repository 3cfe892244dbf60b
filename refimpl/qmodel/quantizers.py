"""Quantizer modules and the registry of quantizer kinds.

A quantizer module (:class:`WeightQuantizer` for one layer's weight, :class:`ActQuantizer` for
one activation site) holds the grid (``spec``), the quantization parameters ``scale`` and
``zero_point`` and its switches; *how* it fake-quantizes is its kind, a small
:class:`QuantizerKind` looked up by name in one registry:

* ``"fixed"``: the grid set by the range method, round to nearest (white paper §2.2, §3);
* ``"ste"``: learned scale and zero point with the white paper's straight-through gradients
  (§4.1; ``refimpl.quant.ste_fake_quant``);
* ``"lsq"``: learned step size (LSQ, Esser et al. 2020, eq. 3 and its gradient scale
  ``lsq_grad_scale``), zero point fixed: LSQ proper when the zero point is 0, else LSQ's
  step-size gradient on the asymmetric grid (the zero point then stays where calibration put it);
* ``"pwlq"``: piecewise linear quantization of weights (Fang et al. 2020, Eq. 3;
  ``refimpl.quant.pwlq``), range and breakpoint computed from the weight itself, per output
  channel when the spec is per-channel; post-training only (no gradient, not exportable);
* ``"dsq"``: differentiable soft quantization (Gong et al. 2019, §3; ``refimpl.quant.dsq``),
  learned clipping range [lower, upper] and α; the soft quantizer in training mode, the hard one
  in eval mode.
* ``"pot"``, ``"apot"``: power-of-two and additive powers-of-two grids (Li et al. 2020;
  ``refimpl.quant.pot_quant``, ``apot_quant``) with a learned clipping threshold ``alpha`` and the
  reparameterised clipping gradient; optional weight normalisation; not exportable.
* ``"pact"``, ``"dorefa"``, ``"qil"``: PACT (Choi et al. 2018), DoReFa (Zhou et al. 2016) and QIL
  (Jung et al. 2019) as MQBench ran them (``refimpl.quant.pact_quant``, ``dorefa_weight``,
  ``dorefa_act``, ``qil_weight``, ``qil_act``), defined in ``refimpl.qmodel.learned_kinds``.

A new kind is a subclass of
:class:`QuantizerKind` declaring which tensors it learns, its forward, how it initialises from
the calibrated (scale, zero_point) and what it exports, registered with one line,
``@register_kind``. ``QuantConfig(weight_quantizer=..., act_quantizer=...)`` and
``set_trainable`` then accept its name without other edits. tests/test_qmodel.py adds a kind
as a worked example.

Switches that must survive ``state_dict`` and replication (``enabled``, the activation state,
``calibrated``, AdaRound's ``rounding``) are buffers.

Why one module: the registry, the quantizer modules and the first kinds are written against each
other (each kind is a few dozen lines driving the quantizer module it is given), so they are kept
together. Kinds can also live elsewhere: ``refimpl.qmodel.learned_kinds`` (PACT, DoReFa, QIL)
registers its kinds through the public ``register_kind`` like any user module, and is imported
by ``refimpl.qmodel``. A kind whose class is defined inside the ``refimpl`` package is built in,
wherever it is registered from: ``unregister_kind`` refuses to remove it.
"""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_choice
from ..quant import (QuantSpec, apot_quant, fake_quant, lsq_fake_quant, lsq_grad_scale, pot_quant, pot_scale, qparams,
                     ste_fake_quant, weight_norm)
from ..quant.adaround import soft_rounded_weight
from ..quant.dsq import dsq, dsq_hard, dsq_ste
from ..quant.pwlq import PWLQ_BREAKPOINT_METHODS, PWLQ_SCHEMES, pwlq, pwlq_bias_correction, pwlq_breakpoint
from .observers import Observer, tensor_range

__all__ = ["QuantizerKind", "register_kind", "unregister_kind", "quantizer_kinds", "get_kind", "Quantizer", "WeightQuantizer",
           "ActQuantizer", "ACT_STATES"]

ACT_STATES = ("observe", "quantize", "off")


# --------------------------------------------------------------------------------------------
# The registry of kinds
# --------------------------------------------------------------------------------------------
class QuantizerKind:
    """How a quantizer fake-quantizes: one instance per kind, shared by every quantizer of it.

    Override:

    * ``name``: the registry name;
    * ``learnable(q)``: the names of ``q``'s tensors that are trained (nn.Parameters), among
      ``scale``, ``zero_point`` and the ones ``init`` creates; () for a fixed quantizer;
    * ``requires_range``: True when the kind cannot quantize before a range was set (calibration);
      a learned kind may start from the default scale;
    * ``init(q)``: called when ``q`` switches to this kind: derive or create the kind's own state
      from the current (scale, zero_point) (by default: ``update(q)``);
    * ``update(q)``: called whenever (scale, zero_point) are set later (calibration, loading);
    * ``loaded(q)``: called after ``load_state_dict`` (by default: ``update(q)``); a kind whose
      learned tensors are not derived from (scale, zero_point) keeps what was loaded;
    * ``leave(q)``: called when ``q`` switches to another kind: write what was learned back into
      (scale, zero_point) and remove the kind's own tensors (by default: nothing);
    * ``forward(q, x, elements)``: the fake-quantized x (x's shape and dtype); ``elements`` is
      the number of values that share one scale (LSQ's gradient scale);
    * ``export(q)``: the affine grid a runtime executes, {"scale", "zero_point"} (the default),
      or raise TypeError for a grid an affine runtime cannot express;
    * ``trainable``: True when quantization-aware training learns the kind's tensors
      (``refimpl.qat.qat_pipeline`` accepts it as ``trainable``);
    * ``affine``: True when the (evaluation-mode) grid is affine, so that a trained quantizer
      freezes to "fixed" without changing its levels (``refimpl.qmodel.freeze``); False for a
      non-uniform grid, which stays in its own kind;
    * ``uniform``: True when the evaluation-mode grid is uniform (integer codes times one scale
      per tensor or channel, whatever units the kind normalises to), so integer hardware can run
      it; False for PoT, APoT and PWLQ, which only MQBench's academic backend accepts
      (``refimpl.qmodel.get_backend``);
    * ``options(q)``: {name: default} of the kind's plain settings (e.g. APoT's ``rcf``), set as
      attributes of ``q`` when it switches to the kind and changed with ``q.set_option``;
      ``option_changed(q, name)`` is called after a change (by default: nothing).
    """

    name = ""
    requires_range = True
    trainable = False
    affine = True
    uniform = True

    def options(self, q: "Quantizer") -> dict:
        return {}

    def option_changed(self, q: "Quantizer", name: str) -> None:
        pass

    def learnable(self, q: "Quantizer") -> tuple[str, ...]:
        return ()

    def init(self, q: "Quantizer") -> None:
        self.update(q)

    def update(self, q: "Quantizer") -> None:
        pass

    def loaded(self, q: "Quantizer") -> None:
        self.update(q)

    def leave(self, q: "Quantizer") -> None:
        """Called when ``q`` leaves this kind: remove the state ``init`` created (by default none)."""

    def forward(self, q: "Quantizer", x: torch.Tensor, elements: int) -> torch.Tensor:
        raise NotImplementedError

    def export(self, q: "Quantizer") -> dict:
        return {"scale": q.scale.detach().clone(), "zero_point": torch.round(q.zero_point.detach()).to(torch.int32)}

    def __repr__(self) -> str:
        return f"<quantizer kind {self.name!r}>"


_KINDS: dict[str, QuantizerKind] = {}


def register_kind(cls: type) -> type:
    """Class decorator: register a :class:`QuantizerKind` subclass under its ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, QuantizerKind)):
        raise TypeError(f"register_kind needs a QuantizerKind subclass, got {cls!r}")
    if not cls.name or cls.name in _KINDS:
        raise ValueError(f"a quantizer kind needs a new, non-empty name; {cls.name!r} is taken or empty "
                         f"(registered: {list(_KINDS)})")
    _KINDS[cls.name] = cls()
    return cls


def unregister_kind(name: str) -> None:
    """Remove a registered kind (not a built-in one: a kind whose class is defined in the ``refimpl``
    package); quantizers of that kind stop working."""
    check_choice(name, "name", quantizer_kinds())
    if _is_built_in(_KINDS[name]):
        raise ValueError(f"{name!r} is a built-in quantizer kind and cannot be removed")
    del _KINDS[name]


def _is_built_in(kind: QuantizerKind) -> bool:
    """Whether a kind's class is defined inside the refimpl package (wherever it was registered)."""
    return type(kind).__module__.startswith("refimpl.")


def quantizer_kinds() -> tuple[str, ...]:
    """The registered kind names, in registration order."""
    return tuple(_KINDS)


def get_kind(name: str) -> QuantizerKind:
    """The registered kind ``name`` (ValueError listing the registered ones otherwise)."""
    check_choice(name, "kind", quantizer_kinds())
    return _KINDS[name]


@register_kind
class Fixed(QuantizerKind):
    """Fixed (scale, integer zero_point), round to nearest (white paper §2.2, eq. 7)."""

    name = "fixed"

    def init(self, q):
        # freezing: a grid another kind learned becomes a deployable one (positive scale, integer
        # zero point); qparams set later (calibration) are taken as given
        with torch.no_grad():
            q.scale.clamp_(min=torch.finfo(torch.float32).eps)
            q.zero_point.copy_(torch.round(q.zero_point).clamp(q.spec.qmin, q.spec.qmax))

    def forward(self, q, x, elements):
        return fake_quant(x, q.scale, q.zero_point.to(torch.int32), q.spec)


@register_kind
class STE(QuantizerKind):
    """Learned scale and zero point, straight-through gradients (white paper §4.1)."""

    name = "ste"
    requires_range = False
    trainable = True

    def learnable(self, q):
        learn_zp = not q.spec.symmetric and not q.fixed_zero_point
        return ("scale", "zero_point") if learn_zp else ("scale",)

    def forward(self, q, x, elements):
        return ste_fake_quant(x, q.scale, q.zero_point, q.spec)


@register_kind
class LSQ(QuantizerKind):
    """Learned step size (Esser et al. 2020, eq. 3; gradient scale 1/sqrt(N Q_P), §2.2).

    Option ``learn_zero_point`` (default False): on an asymmetric grid the zero point is learned
    too, with the white paper's STE gradient (§4.1) times the same gradient scale: LSQ+'s
    learnable offset (Bhalgat et al. 2020) in the form MQBench runs it ("the zero-point is
    learnable in the asymmetric case"; rounded to an integer in the forward pass).
    """

    name = "lsq"
    requires_range = False
    trainable = True

    def options(self, q):
        return {"learn_zero_point": False}

    def option_changed(self, q, name):
        # the zero point becomes (or stops being) a Parameter
        self.sync_zero_point(q)

    @staticmethod
    def _learns_zero_point(q) -> bool:
        return bool(getattr(q, "learn_zero_point", False)) and not q.spec.symmetric and not q.fixed_zero_point

    def learnable(self, q):
        return ("scale", "zero_point") if self._learns_zero_point(q) else ("scale",)

    def sync_zero_point(self, q):
        """Make ``q.zero_point`` a Parameter exactly when the kind learns it."""
        zp = q.zero_point.detach().clone()
        q._parameters.pop("zero_point", None)
        q._buffers.pop("zero_point", None)
        if self._learns_zero_point(q):
            q.zero_point = nn.Parameter(zp)
        else:
            q.register_buffer("zero_point", zp)

    def update(self, q):
        # LSQ proper (refimpl.quant.lsq_fake_quant) has no zero point: used when it is 0
        q.use_lsq = bool((q.zero_point == 0).all()) and not self._learns_zero_point(q)

    def forward(self, q, x, elements):
        g = lsq_grad_scale(max(1, elements), q.spec)
        if q.use_lsq and not self._learns_zero_point(q):
            return lsq_fake_quant(x, q.scale, q.spec, grad_scale=g)
        # asymmetric grid: LSQ's step-size gradient; the zero point fixed, or learned with the
        # same gradient scale (option learn_zero_point: LSQ+'s learnable offset as MQBench runs it)
        zp = q.zero_point if self._learns_zero_point(q) else q.zero_point.detach()
        return ste_fake_quant(x, q.scale, zp, q.spec, grad_scale=g)


def _uniform_max_abs(x: torch.Tensor, bits: int, axis) -> torch.Tensor:
    """x on the symmetric narrow grid of step max|x| / (2^(b-1) - 1), per slice along axis: the
    min-max range (``tensor_range``) and its qparams, as every other weight grid here."""
    spec = QuantSpec(bits=bits, signed=True, symmetric=True, narrow_range=True, axis=axis)
    scale, zero_point = qparams(*tensor_range(x.detach(), spec, "minmax"), spec)
    return fake_quant(x, scale, zero_point, spec)


@register_kind
class PWLQ(QuantizerKind):
    """Piecewise linear quantization of a weight (Fang et al. 2020, Eq. 3; ``refimpl.quant.pwlq``).

    Weights only. Each forward computes m = max|w| and the breakpoint p from the weight (per
    output channel for a per-channel spec, else per tensor) with ``q.breakpoint_method``
    (``PWLQ_BREAKPOINT_METHODS``, default "search"), quantizes with b = ``q.spec.bits`` bits in
    ``q.pwlq_scheme`` (``PWLQ_SCHEMES``, default "signed_centre", the released code's) and, when
    ``breakpoint_method`` is None, with no breakpoint: the paper's uniform baseline (Eq. 1, its
    Table 2 "Uniform" rows), the symmetric grid [-(2^(b-1) - 1), 2^(b-1) - 1] * m / (2^(b-1) - 1)
    with the same m, so that bias correction applies to it the same way. And when
    ``q.bias_correction`` (default False), matches each channel's mean and std to the float
    weight's (``pwlq_bias_correction``). Change these attributes on the quantizer after
    ``quantize_model``. scale and zero_point are not used; nothing is learned and no gradient
    flows (a post-training quantizer); ``export`` raises TypeError.
    """

    name = "pwlq"
    requires_range = False
    affine = False
    uniform = False

    def init(self, q):
        if not isinstance(q, WeightQuantizer):
            raise ValueError("the 'pwlq' quantizer kind quantizes weights only; use another act_quantizer "
                             "(or set_trainable(..., acts=False))")
        for attr, default in (("breakpoint_method", "search"), ("pwlq_scheme", "signed_centre"),
                              ("bias_correction", False)):
            if not hasattr(q, attr):
                setattr(q, attr, default)

    def forward(self, q, x, elements):
        if q.breakpoint_method is not None:
            check_choice(q.breakpoint_method, "breakpoint_method", PWLQ_BREAKPOINT_METHODS)
        check_choice(q.pwlq_scheme, "pwlq_scheme", PWLQ_SCHEMES)
        if not isinstance(q.bias_correction, bool):
            raise TypeError(f"bias_correction must be a bool, got {q.bias_correction!r}")
        axis = q.spec.axis
        with torch.no_grad():
            if q.breakpoint_method is None:
                w_q = _uniform_max_abs(x, q.spec.bits, axis)
            else:
                m, p = pwlq_breakpoint(x, q.spec.bits, q.breakpoint_method, axis=axis, scheme=q.pwlq_scheme)
                w_q = pwlq(x, q.spec.bits, m, p, axis=axis, scheme=q.pwlq_scheme)
            if q.bias_correction:
                w_q = pwlq_bias_correction(x, w_q, axis=axis)
        return w_q

    def export(self, q):
        raise TypeError("a PWLQ weight has a piecewise grid (two scales and an offset per channel), which "
                        "ONNX QuantizeLinear/DequantizeLinear cannot express; see refimpl.quant.pwlq_decompose")


@register_kind
class DSQ(QuantizerKind):
    """Differentiable soft quantization (Gong et al. 2019, §3 and §3.4; ``refimpl.quant.dsq``).

    Learns three tensors, created on the quantizer when it switches to this kind: ``lower`` and
    ``upper`` (the clipping range [l, u], per output channel for a per-channel weight spec, else
    scalars), initialised from the calibrated grid as l = (qmin - zero_point)·scale and
    u = (qmax - zero_point)·scale, so that DSQ's step (u - l)/(2^b - 1) is the calibrated scale;
    and ``alpha`` (one per quantizer), initialised to ``DSQ.alpha_init`` = 0.2 (the initial α of
    the ricky40403/DSQ reimplementation; the paper's own was not available). In training mode the
    forward is the soft quantizer ``dsq``, in eval mode the hard one ``dsq_hard``, as the paper
    deploys it; with the option ``hard_forward`` (default False) training uses ``dsq_ste``
    instead, MQBench's released variant (hard forward, soft gradient). α is projected back into
    [``alpha_min``, ``alpha_max``] before each training forward, because a gradient step can
    leave (0, 1), where the soft quantizer is undefined; the option ``alpha_max`` (default
    1 - 1e-4) plays the part of the bound λ of the paper's Eq. 6, ``||α||_2 < λ``, whose value
    was not available.

    The grid has the spec's levels from l to u (2^b; 2^b - 1 for a narrow-range spec).
    ``export`` (and switching to another kind) gives scale = (u - l)/(levels - 1) and
    zero_point = qmin - l/scale
    (rounded on export); l and u are learned separately, so a symmetric spec's zero point may
    move away from 0.
    """

    name = "dsq"
    requires_range = True
    trainable = True
    alpha_init = 0.2
    alpha_min, alpha_max = 1e-4, 1 - 1e-4

    def learnable(self, q):
        return ("lower", "upper", "alpha")

    def options(self, q):
        return {"hard_forward": False, "alpha_max": self.alpha_max}

    def option_changed(self, q, name):
        if name == "alpha_max" and not self.alpha_min < q.alpha_max < 1:
            bad, q.alpha_max = q.alpha_max, self.alpha_max
            raise ValueError(f"alpha_max must lie in ({self.alpha_min}, 1), got {bad}")

    def init(self, q):
        if not isinstance(getattr(q, "lower", None), nn.Parameter):
            self.update(q)
        if not isinstance(getattr(q, "alpha", None), nn.Parameter):
            q.alpha = nn.Parameter(torch.tensor(self.alpha_init, device=q.scale.device))

    def update(self, q):
        with torch.no_grad():
            lo = (q.spec.qmin - q.zero_point) * q.scale
            up = (q.spec.qmax - q.zero_point) * q.scale
        for name, v in (("lower", lo), ("upper", up)):
            cur = getattr(q, name, None)
            if isinstance(cur, nn.Parameter):
                cur.data = v.clone()
            else:
                setattr(q, name, nn.Parameter(v.clone()))

    def loaded(self, q):
        pass

    def _grid(self, q):
        with torch.no_grad():
            scale = (q.upper - q.lower) / (q.spec.num_levels - 1)
            return scale.clone(), q.spec.qmin - q.lower / scale

    def leave(self, q):
        scale, zp = self._grid(q)
        with torch.no_grad():
            q.scale = scale.to(q.scale.dtype)
            q.zero_point = zp.to(q.zero_point.dtype)
        for name in self.learnable(q):
            delattr(q, name)

    def export(self, q):
        scale, zp = self._grid(q)
        return {"scale": scale, "zero_point": torch.round(zp).clamp(q.spec.qmin, q.spec.qmax).to(torch.int32)}

    def forward(self, q, x, elements):
        shape = [1] * x.ndim
        if q.lower.ndim and q.spec.axis is not None:
            shape[q.spec.axis % x.ndim] = x.shape[q.spec.axis % x.ndim]
        lo, up = q.lower.reshape(shape), q.upper.reshape(shape)
        levels = q.spec.num_levels
        if not q.training:
            return dsq_hard(x, lo, up, q.spec.bits, levels)
        with torch.no_grad():
            q.alpha.clamp_(self.alpha_min, q.alpha_max)
        return (dsq_ste if q.hard_forward else dsq)(x, lo, up, q.alpha, q.spec.bits, levels)


class _ClippedGrid(QuantizerKind):
    """A non-uniform grid clipped at a learned alpha (Li et al. 2020): the shared part of PoT and APoT.

    ``init`` creates the Parameter ``alpha`` (0-d, per tensor), set from the calibrated range's
    largest magnitude whenever (scale, zero_point) change (calibration), and kept when a
    ``state_dict`` is loaded (the buffer ``alpha_range`` records the value it was set from).
    Options (``q.set_option``, or ``refimpl.qmodel.set_kind_options`` for a whole model): ``rcf``
    (default True: the reparameterised clipping gradient for alpha; False: 0 inside the range) and,
    for weights, ``weight_normalization`` (default False; True: the weight is standardised every
    forward, ``refimpl.quant.weight_norm``, and quantized as such, as the authors' layers do; alpha
    is then in units of the weight's standard deviation and starts at ``wn_alpha_init`` = 3.0, the
    authors' ``weight_alpha``). Weights use the signed grid (b - 1 magnitude bits and a sign);
    activations the signed grid when their spec is signed, else the unsigned one. In training
    mode alpha is clamped to >= float32 eps before each forward (a gradient step may cross 0).
    ``export`` raises TypeError.
    """

    requires_range = True
    trainable = True
    affine = False
    uniform = False
    wn_alpha_init = 3.0

    def learnable(self, q):
        return ("alpha",)

    def options(self, q):
        opts = {"rcf": True}
        if isinstance(q, WeightQuantizer):
            opts["weight_normalization"] = False
        return opts

    def init(self, q):
        if not isinstance(getattr(q, "alpha", None), nn.Parameter):
            q.alpha = nn.Parameter(torch.ones((), device=q.scale.device))
            q.register_buffer("alpha_range", torch.zeros((), device=q.scale.device))
        self.update(q)

    def option_changed(self, q, name):
        if name == "weight_normalization":
            self.update(q)

    def leave(self, q):
        for name in ("alpha", "alpha_range"):
            q._parameters.pop(name, None)
            q._buffers.pop(name, None)

    @staticmethod
    def _signed(q) -> bool:
        return isinstance(q, WeightQuantizer) or bool(q.spec.signed)

    def update(self, q):
        with torch.no_grad():
            if getattr(q, "weight_normalization", False):
                r = torch.tensor(self.wn_alpha_init, device=q.alpha_range.device)
            else:
                s, z = q.scale.detach().float(), q.zero_point.detach().float()
                if q.spec.symmetric:
                    # refimpl.quant.qparams inverted: scale = max|x| / ((qmax - qmin) / 2)
                    top = s * ((q.spec.qmax - q.spec.qmin) / 2)
                else:
                    hi, lo = s * (q.spec.qmax - z), s * (q.spec.qmin - z)
                    top = torch.maximum(hi.abs(), lo.abs()) if self._signed(q) else hi
                r = top.max().clamp(min=torch.finfo(torch.float32).eps).to(q.alpha_range.device)
            # a loaded state_dict brings alpha and the value it came from: keep the learned alpha
            if not torch.equal(r, q.alpha_range):
                q.alpha.data = r.clone()
                q.alpha_range.copy_(r)

    def quantize(self, q, x, signed):
        raise NotImplementedError

    def forward(self, q, x, elements):
        if q.training:
            with torch.no_grad():
                q.alpha.clamp_(min=torch.finfo(torch.float32).eps)
        if getattr(q, "weight_normalization", False):
            x = weight_norm(x)
        return self.quantize(q, x, self._signed(q))

    def export(self, q):
        raise TypeError(f"a {self.name!r} quantizer has a non-uniform grid, which ONNX "
                        "QuantizeLinear/DequantizeLinear cannot express")


@register_kind
class PoT(_ClippedGrid):
    __doc__ = ("Power-of-two levels alpha * {0, +-2^-j} (Li et al. 2020, Q^p; refimpl.quant.pot_quant).\n\n"
               + _ClippedGrid.__doc__.split("\n", 2)[2])

    name = "pot"

    def quantize(self, q, x, signed):
        return pot_quant(x, q.spec.bits, q.alpha, signed=signed, rcf=q.rcf)


@register_kind
class APoT(_ClippedGrid):
    __doc__ = ("Additive powers-of-two levels (Li et al. 2020, Q^a; refimpl.quant.apot_quant), base bit-width\n"
               "``q.apot_k`` (default 2).\n\n" + _ClippedGrid.__doc__.split("\n", 2)[2])

    name = "apot"

    def options(self, q):
        return {**super().options(q), "apot_k": 2}

    def quantize(self, q, x, signed):
        return apot_quant(x, q.spec.bits, q.alpha, q.apot_k, signed=signed, rcf=q.rcf)



# --------------------------------------------------------------------------------------------
# Quantizer modules
# --------------------------------------------------------------------------------------------
class Quantizer(nn.Module):
    """State shared by the weight and activation quantizers: spec, scale, zero_point, kind.

    ``scale`` (float32) and ``zero_point`` (float32 holding integers) are buffers, or Parameters
    where the kind learns them (same names, so state_dicts match). ``kind``: the kind's name.
    """

    def __init__(self, spec: QuantSpec, fixed_zero_point: bool, *, kind: str = "fixed", device=None):
        super().__init__()
        self.spec = spec
        self.fixed_zero_point = fixed_zero_point
        self.register_buffer("scale", torch.ones((), device=device))
        self.register_buffer("zero_point", torch.zeros((), device=device))
        self.kind = "fixed"
        self.set_kind(kind)

    @property
    def kind_impl(self) -> QuantizerKind:
        """The registered :class:`QuantizerKind` of ``kind``."""
        return get_kind(self.kind)

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Set (scale, zero_point) as returned by refimpl.quant.qparams."""
        with torch.no_grad():
            for name, v in (("scale", scale), ("zero_point", zero_point)):
                cur = getattr(self, name)
                v = v.detach().to(device=cur.device, dtype=torch.float32)
                if isinstance(cur, nn.Parameter):
                    cur.data = v.clone()
                else:
                    setattr(self, name, v.clone())
        self.kind_impl.update(self)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # per-channel shapes are only known once computed: adopt the checkpoint's shapes
        names = ("scale", "zero_point") + tuple(n for n in self.kind_impl.learnable(self)
                                                if n not in ("scale", "zero_point"))
        for name in names:
            key = prefix + name
            cur = getattr(self, name, None)
            if cur is None:
                continue
            if key in state_dict and cur.shape != state_dict[key].shape:
                empty = torch.empty(state_dict[key].shape, device=cur.device)
                if isinstance(cur, nn.Parameter):
                    cur.data = empty
                else:
                    setattr(self, name, empty)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.kind_impl.loaded(self)

    def set_kind(self, kind: str) -> None:
        """Switch to a registered kind (``quantizer_kinds()``): its learnable tensors become
        Parameters (initialised from the current scale and zero point), the rest buffers."""
        impl = get_kind(kind)
        if kind != self.kind:
            self.kind_impl.leave(self)
        scale, zp = self.scale.detach().clone(), self.zero_point.detach().clone()
        for name in ("scale", "zero_point"):
            self._parameters.pop(name, None)
            self._buffers.pop(name, None)
        learn = impl.learnable(self)
        for name, value in (("scale", scale), ("zero_point", zp)):
            if name in learn:
                setattr(self, name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)
        self.kind = kind
        for name, default in impl.options(self).items():
            if not hasattr(self, name):
                setattr(self, name, default)
        impl.init(self)

    def set_option(self, name: str, value) -> None:
        """Set one of the kind's options (``kind_impl.options(self)``: name -> default); the value
        must have the default's type (bool or int)."""
        opts = self.kind_impl.options(self)
        if not opts:
            raise ValueError(f"the {self.kind!r} quantizer kind has no options")
        check_choice(name, "option", tuple(opts))
        default = opts[name]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        else:
            ok = isinstance(value, type(default)) and not isinstance(value, bool)
        if not ok:
            raise TypeError(f"option {name!r} of the {self.kind!r} kind must be a {type(default).__name__}, "
                            f"got {value!r}")
        setattr(self, name, value)
        self.kind_impl.option_changed(self, name)

    def fake_quant(self, x: torch.Tensor, elements: int) -> torch.Tensor:
        """x fake-quantized by this quantizer's kind; ``elements``: values per scale."""
        return self.kind_impl.forward(self, x, elements)

    def export(self) -> dict:
        """The affine grid a runtime executes: {"scale", "zero_point"} (the kind's ``export``); a
        ``spec.pot_scale`` grid's scale as the power of two the forward pass uses."""
        grid = self.kind_impl.export(self)
        if self.spec.pot_scale and "scale" in grid:
            grid["scale"] = pot_scale(grid["scale"].detach().float()).detach()
        return grid


class WeightQuantizer(Quantizer):
    """Fake quantizer of one layer's weight (white paper §2.2; per-channel along axis 0, §2.2.2).

    Ranges are set once from the weight (``set_range``) with ``range_method`` ("minmax" | "mse").
    ``set_rounding(h)`` selects AdaRound's learned rounding (Nagel et al. 2020, eq. 22):
    code = clamp(floor(w / scale) + h + zero_point, qmin, qmax); ``set_rounding(None)``
    = round to nearest. ``enabled=False`` passes the weight through.
    Input/output: the weight tensor (any float dtype), same shape.
    """

    def __init__(self, spec: QuantSpec, range_method: str = "minmax", *, kind: str = "fixed", device=None):
        super().__init__(spec, fixed_zero_point=spec.symmetric, kind=kind, device=device)
        self.range_method = check_choice(range_method, "range_method", ("minmax", "mse"))
        self.register_buffer("enabled_flag", torch.tensor(True, device=device))
        self.register_buffer("rounding", torch.empty(0, device=device))

    @property
    def enabled(self) -> bool:
        """Whether the weight is fake-quantized (else passed through)."""
        return bool(self.enabled_flag)

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"enabled must be a bool, got {value!r}")
        self.enabled_flag.fill_(value)

    @torch.no_grad()
    def set_range(self, weight: torch.Tensor) -> None:
        """Scale and zero point from the weight's range (``range_method``, refimpl.calib)."""
        self.set_qparams(*qparams(*tensor_range(weight.detach(), self.spec, self.range_method), self.spec))

    def qparams_like(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, rounded zero_point) shaped to broadcast over w (per tensor or along spec.axis)."""
        shape = [1] * w.ndim
        if self.spec.axis is not None:
            axis = self.spec.axis % w.ndim
            shape[axis] = w.shape[axis]
        return self.scale.reshape(shape), torch.round(self.zero_point).reshape(shape)

    def floor_codes(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """floor(w / scale) and the fractional part w / scale - floor(w / scale), both w's shape
        (the rounding AdaRound learns is between these two codes)."""
        s, _ = self.qparams_like(w)
        v = w.detach().float() * torch.reciprocal(s)
        f = torch.floor(v)
        return f, v - f

    def quantize_with_rounding(self, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """AdaRound's weight (eq. 22) with soft or hard h in [0, 1], differentiable in h; w's
        shape and dtype (``refimpl.quant.adaround.soft_rounded_weight``)."""
        s, z = self.qparams_like(w)
        f, _ = self.floor_codes(w)
        return soft_rounded_weight(f, h, s, z, self.spec).to(w.dtype)

    def set_rounding(self, h: torch.Tensor | None) -> None:
        """Use rounding h (weight shape, values in [0, 1]; 1 = round up) or None (nearest)."""
        if h is None:
            self.rounding = torch.empty(0, device=self.scale.device)
            return
        if not isinstance(h, torch.Tensor) or not h.is_floating_point():
            raise TypeError("h must be a floating torch.Tensor or None")
        if bool((h < 0).any()) or bool((h > 1).any()):
            raise ValueError("h must lie in [0, 1]")
        self.rounding = h.detach().to(device=self.scale.device, dtype=torch.float32).clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "rounding"
        if key in state_dict:
            self.rounding = torch.empty(state_dict[key].shape, device=self.scale.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        if self.rounding.numel():
            if self.rounding.shape != w.shape:
                raise ValueError(f"rounding has shape {tuple(self.rounding.shape)}, the weight {tuple(w.shape)}")
            return self.quantize_with_rounding(w, self.rounding)
        return self.fake_quant(w, w.numel() // max(1, self.scale.numel()))

    def extra_repr(self) -> str:
        return f"spec={self.spec}, range_method={self.range_method}, kind={self.kind}"


class ActQuantizer(Quantizer):
    """Fake quantizer of one activation site (white paper §2.3, Fig. 4), per tensor.

    state "observe": pass x through its :class:`Observer` (statistics for ``compute_range``);
    "quantize": fake-quantize by its kind; "off": pass through.
    Input/output: any float tensor (N, ...), same shape and dtype.
    """

    def __init__(self, spec: QuantSpec, site: str, range_method: str = "minmax", percentile: float = 99.99,
                 samples: int = 4096, seed: int = 0, fixed_zero_point: bool = False, *, kind: str = "fixed",
                 device=None):
        super().__init__(spec, fixed_zero_point=fixed_zero_point or spec.symmetric, kind=kind, device=device)
        self.site = site
        self.observer = Observer(range_method, percentile, samples, seed)
        self.register_buffer("state_code", torch.tensor(ACT_STATES.index("quantize"), device=device))
        self.register_buffer("calibrated", torch.tensor(False, device=device))

    @property
    def range_method(self) -> str:
        """The observer's range method ("minmax" | "mse" | "percentile")."""
        return self.observer.range_method

    @property
    def state(self) -> str:
        """"observe", "quantize" or "off" (a buffer, so it survives state_dict and replication)."""
        return ACT_STATES[int(self.state_code)]

    def set_state(self, state: str) -> None:
        """Switch to ``state``; entering "observe" forgets earlier statistics."""
        check_choice(state, "state", ACT_STATES)
        if state == "observe" and self.state != "observe":
            self.observer.reset()
        self.state_code.fill_(ACT_STATES.index(state))

    @torch.no_grad()
    def compute_range(self) -> None:
        """Set (scale, zero_point) from what was observed (the observer's range method)."""
        if not self.observer.seen:
            raise RuntimeError(f"activation site {self.site!r} saw no data while observing")
        self.set_qparams(*qparams(*self.observer.range(self.spec), self.spec))
        self.calibrated.fill_(True)
        self.observer.reset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.state
        if state == "off":
            return x
        if state == "observe":
            return self.observer(x)
        if self.kind_impl.requires_range and not bool(self.calibrated):
            raise RuntimeError(f"activation quantizer {self.site!r} has no range yet: call "
                               "refimpl.qmodel.calibrate(qmodel, x) first (or set_quant_state(acts=False))")
        return self.fake_quant(x, x[0].numel() if x.ndim > 1 else x.numel())

    def extra_repr(self) -> str:
        return f"site={self.site!r}, spec={self.spec}, kind={self.kind}, state={self.state}"

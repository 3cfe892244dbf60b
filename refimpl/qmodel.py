"""Simulated quantization of a whole model: quantizers inserted into a torch.fx graph.

White paper (Nagel et al. 2021, arXiv 2106.08295) §2.3 "Quantization simulation", Fig. 4: every
quantized layer computes with fake-quantized weights, and its output is fake-quantized where a
deployed integer kernel would requantize it; §2.3.1: a ReLU/ReLU6 that follows a layer is fused
into it, so the quantizer sits after the activation ("no quantizer between a conv and its ReLU").
§3 (PTQ): weight ranges are static and set at insertion, activation ranges are calibrated.

``quantize_model(model, config)`` traces a (BatchNorm-free, i.e. BN-folded: ``refimpl.fold.
fold_all_bn``) FP32 model with ``torch.fx.symbolic_trace`` and returns a ``GraphModule`` in which

* every ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Linear`` not in ``config.keep_fp`` becomes a
  ``QuantConv1d`` / ``QuantConv2d`` / ``QuantLinear`` (a subclass of its class, same qualified
  name, same ``weight``/``bias``) with a ``weight_quantizer`` (``WeightQuantizer``);
* ``ActQuantizer`` modules (in the ``act_quant`` ModuleDict) sit at these *sites*:
    - the model input (name ``"input"``; ``"input_<arg>"`` for several inputs), unless only
      kept-in-float layers read it;
    - the output of every quantized layer (site name = the layer's name), after the ReLU/ReLU6
      that is its only user if there is one (fused activation);
    - the output of a residual addition of two tensors (``+``, ``torch.add``, ``.add``), after
      its ReLU/ReLU6 if that is the add's only user (site name = that ReLU module's name, or the
      fx node name such as ``"add_1"``);
    - the output of average pooling (``nn.AvgPool*``, ``nn.AdaptiveAvgPool*``, ``F.avg_pool*``,
      ``F.adaptive_avg_pool*``, ``torch.mean`` / ``.mean``), which leaves the input's grid.
  Max pooling, flatten/reshape/view, dropout, identity and every other op (concatenation,
  multiplication, sigmoid, ...) pass through *unquantized*: their inputs carry the quantizers of
  their producers. Other layer types (ConvTranspose, Embedding, RNNs, ...) stay in float.
  A site whose tensor is non-negative by construction (a ReLU/ReLU6 output, an add or average of
  such tensors) gets an unsigned grid; other sites (the input, a linear output) a signed one.

What it cannot handle: models torch.fx cannot trace symbolically (data-dependent control flow,
unsupported Python): ``quantize_model`` raises a ValueError quoting torch.fx's message; models
with BatchNorm (ValueError: fold it first, or keep the BN that follows a layer with
``keep_bn=True`` and merge it after QAT with ``merge_bn``). The input model is never modified.

Activation quantizers have three states: ``"observe"`` (pass through, record statistics),
``"quantize"`` and ``"off"``. ``calibrate`` sets their ranges with ``config.act_range``.
Both quantizers have a trainable mode for QAT (``set_trainable``): ``"ste"`` (learned scale and
zero point with the white paper's straight-through gradients, §4.1) or
``"lsq"`` (learned step size, LSQ, Esser et al. 2020).

>>> qm = quantize_model(fold_all_bn(model), QuantConfig(weight_bits=8, act_bits=8))
>>> calibrate(qm, data.x_calib)
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import calib
from .fold import _bn_scale_shift
from ._checks import check_choice, check_float_tensor, check_int
from .quant import QuantSpec, fake_quant, lsq_fake_quant, lsq_grad_scale, qparams

__all__ = [
    "QuantConfig", "WeightQuantizer", "ActQuantizer", "QuantConv1d", "QuantConv2d", "QuantLinear",
    "quantize_model", "calibrate", "set_quant_state", "set_trainable", "weight_quantizers",
    "act_quantizers", "quant_layers", "input_sites", "first_last_bits", "merge_bn", "TRAINABLE_MODES", "ACT_STATES",
]

WEIGHT_RANGES = ("minmax", "mse")
ACT_RANGES = ("minmax", "mse", "percentile")
TRAINABLE_MODES = ("none", "ste", "lsq")
ACT_STATES = ("observe", "quantize", "off")


@dataclass(frozen=True)
class QuantConfig:
    """How a model is quantized (white paper §2.2 grids, §3.1 range setting, §3 PTQ).

    weight_bits:        1..16.
    act_bits:           1..16, or None for no activation quantizers (weight-only).
    weight_per_channel: one scale per output channel (axis 0 of Conv/Linear weights), white
                        paper §2.2.2; else one per tensor.
    weight_symmetric:   symmetric signed weight grid (zero_point 0); else asymmetric.
    weight_narrow_range: drop the most negative weight code ([-127, 127] at 8 bits).
    act_symmetric:      symmetric activation grid for signed sites; unsigned sites (ReLU outputs)
                        always use [0, 2^b - 1] with zero_point 0, which is what both choices give
                        for a non-negative tensor.
    weight_range:       "minmax" | "mse" (refimpl.calib functions on the weight tensor).
    act_range:          "minmax" | "mse" | "percentile" (on the calibration activations).
    act_percentile:     q for "percentile".
    act_samples:        values per site kept for "mse" (randomly subsampled: calib.mse costs
                        ~10-20 us per value) and 100x that for "percentile".
    keep_fp:            names of Conv/Linear layers whose weights and outputs stay in float.
    layer_weight_bits:  {layer name: bits} overriding ``weight_bits`` for those layers (mixed
                        precision; e.g. the common convention of 8-bit first and last layers, see
                        :func:`first_last_bits`). Accepts a dict; stored as sorted pairs.
    site_act_bits:      {activation site name: bits} overriding ``act_bits`` at those sites
                        (site names as listed by ``act_quantizers``: "input", a layer's name, ...).
    seed:               seed of the activation subsampling.
    """

    weight_bits: int = 8
    act_bits: int | None = 8
    weight_per_channel: bool = True
    weight_symmetric: bool = True
    weight_narrow_range: bool = False
    act_symmetric: bool = False
    weight_range: str = "minmax"
    act_range: str = "minmax"
    act_percentile: float = 99.99
    act_samples: int = 4096
    keep_fp: tuple = ()
    layer_weight_bits: tuple = ()
    site_act_bits: tuple = ()
    seed: int = 0

    def __post_init__(self):
        check_int(self.weight_bits, "weight_bits", 1, 16)
        if self.act_bits is not None:
            check_int(self.act_bits, "act_bits", 1, 16)
        for name in ("weight_per_channel", "weight_symmetric", "weight_narrow_range", "act_symmetric"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        check_choice(self.weight_range, "weight_range", WEIGHT_RANGES)
        check_choice(self.act_range, "act_range", ACT_RANGES)
        if not 50.0 <= float(self.act_percentile) <= 100.0:
            raise ValueError(f"act_percentile must be in [50, 100], got {self.act_percentile}")
        check_int(self.act_samples, "act_samples", 16)
        check_int(self.seed, "seed", 0)
        if isinstance(self.keep_fp, str) or not all(isinstance(n, str) for n in self.keep_fp):
            raise TypeError(f"keep_fp must be a tuple of layer names (str), got {self.keep_fp!r}")
        object.__setattr__(self, "keep_fp", tuple(self.keep_fp))
        for field in ("layer_weight_bits", "site_act_bits"):
            object.__setattr__(self, field, _bits_pairs(getattr(self, field), field))
        if self.site_act_bits and self.act_bits is None:
            raise ValueError("site_act_bits needs activation quantizers: act_bits is None")

    def weight_spec(self, layer: str | None = None) -> QuantSpec:
        """The weight grid of ``layer`` (axis 0 = output channel when per-channel)."""
        bits = dict(self.layer_weight_bits).get(layer, self.weight_bits)
        return QuantSpec(bits, signed=True, symmetric=self.weight_symmetric,
                         narrow_range=self.weight_narrow_range, axis=0 if self.weight_per_channel else None)

    def act_spec(self, signed: bool, site: str | None = None) -> QuantSpec:
        """The activation grid of a site: signed sites follow act_symmetric; unsigned are affine
        [0, 2^b - 1] (zero_point 0 for a non-negative tensor)."""
        bits = dict(self.site_act_bits).get(site, self.act_bits)
        if signed:
            return QuantSpec(bits, signed=True, symmetric=self.act_symmetric)
        return QuantSpec(bits, signed=False, symmetric=False)


def _bits_pairs(value, name: str) -> tuple:
    """A {name: bits} mapping (or pairs) as a sorted tuple of (str, int) pairs, validated."""
    if isinstance(value, dict):
        value = tuple(value.items())
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        raise TypeError(f"{name} must be a dict {{name: bits}}, got {value!r}")
    pairs = []
    for item in value:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(f"{name} must map names (str) to bit-widths (int), got item {item!r}")
        pairs.append((item[0], check_int(item[1], f"{name}[{item[0]!r}]", 1, 16)))
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"{name} names a layer or site twice: {names}")
    return tuple(sorted(pairs))


# --------------------------------------------------------------------------------------------
# The straight-through affine fake quantizer with learnable scale and zero point
# --------------------------------------------------------------------------------------------
def _param_shape(x: torch.Tensor, axis):
    shape = [1] * x.ndim
    if axis is not None:
        shape[axis] = x.shape[axis]
    return shape


class _AffineSTE(torch.autograd.Function):
    """x_hat = s * (clamp(round(x / s) + z, qmin, qmax) - z) with round-to-nearest z, and the white
    paper's §4.1 straight-through gradients:
      dx_hat/dx = 1 inside the grid, 0 where clipped;
      dx_hat/ds = round(x/s) - x/s inside, qmin - z below, qmax - z above;
      dx_hat/dz = 0 inside, -s where clipped (z passes through its rounding with an STE).
    Parameter gradients are summed per channel and multiplied by ``grad_scale``.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, grad_scale):
        shape = _param_shape(x, axis)
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        s = scale.detach().to(cdt).reshape(shape)
        z = torch.round(zero_point.detach().to(cdt)).clamp(qmin, qmax).reshape(shape)
        v = x.detach().to(cdt) * torch.reciprocal(s)
        r = torch.round(v)
        c = r + z
        below, above = c < qmin, c > qmax
        out = (torch.clamp(c, qmin, qmax) - z) * s
        ctx.save_for_backward(v, r, below, above, s, z)
        ctx.meta = (qmin, qmax, axis, grad_scale, scale.shape, zero_point.shape)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        v, r, below, above, s, z = ctx.saved_tensors
        qmin, qmax, axis, grad_scale, s_shape, z_shape = ctx.meta
        gc = g.to(v.dtype)
        inside = ~(below | above)
        dims = [d for d in range(v.ndim) if d != axis]

        def reduce(t, shape):
            return (t.sum(dim=dims) if dims else t).reshape(shape) * grad_scale

        gx = (gc * inside).to(g.dtype) if ctx.needs_input_grad[0] else None
        gs = gz = None
        if ctx.needs_input_grad[1]:
            ds = torch.where(inside, r - v, torch.where(below, qmin - z, qmax - z))
            gs = reduce(gc * ds, s_shape)
        if ctx.needs_input_grad[2]:
            gz = reduce(gc * torch.where(inside, torch.zeros_like(v), -s), z_shape)
        return gx, gs, gz, None, None, None, None


def ste_fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec,
                   grad_scale: float = 1.0) -> torch.Tensor:
    """Fake quantization with learnable scale and zero point (white paper §4.1, STE gradients).

    x: floating tensor; scale, zero_point: float tensors, 0-d (per-tensor) or 1-d (per channel
    along spec.axis). zero_point is rounded (and clamped to the grid) in the forward pass.
    Returns x's shape and dtype.
    """
    check_float_tensor(x, "x")
    axis = None if spec.axis is None else spec.axis % x.ndim
    return _AffineSTE.apply(x, scale, zero_point, float(spec.qmin), float(spec.qmax), axis, float(grad_scale))


# --------------------------------------------------------------------------------------------
# Quantizer modules
# --------------------------------------------------------------------------------------------
class _Quantizer(nn.Module):
    """State shared by the weight and activation quantizers: spec, scale, zero_point, mode.

    ``scale`` (float32) and ``zero_point`` (float32 holding integers) are buffers in mode "none"
    and become Parameters in the trainable modes (same names, so state_dicts match).
    """

    def __init__(self, spec: QuantSpec, fixed_zero_point: bool, device=None):
        super().__init__()
        self.spec = spec
        self.fixed_zero_point = fixed_zero_point
        self.trainable = "none"
        self.use_lsq = False
        shape = ()
        self.register_buffer("scale", torch.ones(shape, device=device))
        self.register_buffer("zero_point", torch.zeros(shape, device=device))

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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # per-channel shapes are only known once computed: adopt the checkpoint's shapes
        for name in ("scale", "zero_point"):
            key = prefix + name
            cur = getattr(self, name)
            if key in state_dict and cur.shape != state_dict[key].shape:
                empty = torch.empty(state_dict[key].shape, device=cur.device)
                if isinstance(cur, nn.Parameter):
                    cur.data = empty
                else:
                    setattr(self, name, empty)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.trainable == "lsq":  # which LSQ form applies depends on the loaded zero point
            self.use_lsq = bool((self.zero_point == 0).all())

    def set_trainable(self, mode: str) -> None:
        """"none": fixed qparams (buffers); "ste": learnable scale and zero point (white paper
        §4.1); "lsq": learnable step size with the LSQ gradient (zero point fixed)."""
        check_choice(mode, "mode", TRAINABLE_MODES)
        scale, zp = self.scale.detach().clone(), self.zero_point.detach().clone()
        for name in ("scale", "zero_point"):
            if name in self._parameters:
                del self._parameters[name]
            if name in self._buffers:
                del self._buffers[name]
        if mode == "none":
            self.register_buffer("scale", scale.clamp(min=torch.finfo(torch.float32).eps))
            self.register_buffer("zero_point", torch.round(zp).clamp(self.spec.qmin, self.spec.qmax))
        else:
            self.scale = nn.Parameter(scale)
            learn_zp = mode == "ste" and not self.spec.symmetric and not self.fixed_zero_point
            if learn_zp:
                self.zero_point = nn.Parameter(zp)
            else:
                self.register_buffer("zero_point", zp)
        self.trainable = mode
        # LSQ proper (refimpl.quant.lsq_fake_quant) has no zero point: used when it is 0
        self.use_lsq = mode == "lsq" and bool((zp == 0).all())

    def _fake_quant(self, x: torch.Tensor, lsq_elements: int) -> torch.Tensor:
        if self.trainable == "none":
            return fake_quant(x, self.scale, self.zero_point.to(torch.int32), self.spec)
        if self.trainable == "ste":
            return ste_fake_quant(x, self.scale, self.zero_point, self.spec)
        g = lsq_grad_scale(max(1, lsq_elements), self.spec)
        if self.use_lsq:
            return lsq_fake_quant(x, self.scale, self.spec, grad_scale=g)
        # asymmetric grid: LSQ's step-size gradient, zero point fixed
        return ste_fake_quant(x, self.scale, self.zero_point.detach(), self.spec, grad_scale=g)


class WeightQuantizer(_Quantizer):
    """Fake quantizer of one layer's weight (white paper §2.2; per-channel along axis 0, §2.2.2).

    Ranges are set once from the weight (``set_range``) with ``range_method`` ("minmax" | "mse").
    ``set_rounding(h)`` selects AdaRound's learned rounding (Nagel et al. 2020, eq. 22):
    code = clamp(floor(w / scale) + h + zero_point, qmin, qmax); ``set_rounding(None)``
    = round to nearest. ``enabled=False`` passes the weight through.
    Input/output: the weight tensor (any float dtype), same shape.
    """

    def __init__(self, spec: QuantSpec, range_method: str = "minmax", device=None):
        super().__init__(spec, fixed_zero_point=spec.symmetric, device=device)
        self.range_method = check_choice(range_method, "range_method", WEIGHT_RANGES)
        self.enabled = True
        self.register_buffer("rounding", torch.empty(0, device=device))

    @torch.no_grad()
    def set_range(self, weight: torch.Tensor) -> None:
        """Scale and zero point from the weight's range (refimpl.calib.minmax / mse)."""
        fn = calib.minmax if self.range_method == "minmax" else calib.mse
        lo, hi = fn(weight.detach(), self.spec)
        self.set_qparams(*qparams(lo, hi, self.spec))

    def _broadcast(self, w):
        shape = _param_shape(w, None if self.spec.axis is None else self.spec.axis % w.ndim)
        return self.scale.reshape(shape), torch.round(self.zero_point).reshape(shape)

    def floor_codes(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """floor(w / scale) and the fractional part w / scale - floor(w / scale), both w's shape
        (the rounding AdaRound learns is between these two codes)."""
        s, _ = self._broadcast(w)
        v = w.detach().float() * torch.reciprocal(s)
        f = torch.floor(v)
        return f, v - f

    def quantize_with_rounding(self, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """scale * (clamp(floor(w/scale) + h + zero_point, qmin, qmax) - zero_point), differentiable
        in h (AdaRound eq. 22 with soft or hard h in [0, 1]); w's shape and dtype."""
        s, z = self._broadcast(w)
        f, _ = self.floor_codes(w)
        code = torch.clamp(f + h + z, self.spec.qmin, self.spec.qmax)
        return ((code - z) * s).to(w.dtype)

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
        per_scale = w.numel() // max(1, self.scale.numel())
        return self._fake_quant(w, per_scale)

    def extra_repr(self) -> str:
        return f"spec={self.spec}, range={self.range_method}, trainable={self.trainable}"


class ActQuantizer(_Quantizer):
    """Fake quantizer of one activation site (white paper §2.3, Fig. 4), per tensor.

    state "observe": pass x through and record statistics for ``compute_range``;
    "quantize": fake-quantize with (scale, zero_point); "off": pass through.
    Input/output: any float tensor (N, ...), same shape and dtype.
    """

    def __init__(self, spec: QuantSpec, site: str, range_method: str = "minmax", percentile: float = 99.99,
                 samples: int = 4096, seed: int = 0, fixed_zero_point: bool = False, device=None):
        super().__init__(spec, fixed_zero_point=fixed_zero_point or spec.symmetric, device=device)
        self.site = site
        self.range_method = check_choice(range_method, "range_method", ACT_RANGES)
        self.percentile = float(percentile)
        self.samples = int(samples)
        self.seed = int(seed)
        self.state = "quantize"
        self.register_buffer("calibrated", torch.tensor(False, device=device))
        self._reset_stats()

    def _reset_stats(self):
        self._min = self._max = None
        self._kept: list[torch.Tensor] = []
        self._gen = None

    def set_state(self, state: str) -> None:
        check_choice(state, "state", ACT_STATES)
        if state == "observe" and self.state != "observe":
            self._reset_stats()
        self.state = state

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        xf = x.detach().float().reshape(-1)
        lo, hi = torch.aminmax(xf)
        self._min = lo if self._min is None else torch.minimum(self._min, lo)
        self._max = hi if self._max is None else torch.maximum(self._max, hi)
        if self.range_method == "minmax":
            return
        keep = self.samples * (1 if self.range_method == "mse" else 100)
        if xf.numel() > keep:
            if self._gen is None:
                self._gen = torch.Generator(device=xf.device).manual_seed(self.seed)
            idx = torch.randperm(xf.numel(), generator=self._gen, device=xf.device)[:keep]
            xf = xf[idx]
        self._kept.append(xf.clone())

    @torch.no_grad()
    def compute_range(self) -> None:
        """Set (scale, zero_point) from what was observed (config.act_range)."""
        if self._min is None:
            raise RuntimeError(f"activation site {self.site!r} saw no data while observing")
        spec = self.spec
        if self.range_method == "minmax":
            lo, hi = self._min, self._max
        else:
            v = torch.cat(self._kept)
            keep = self.samples * (1 if self.range_method == "mse" else 100)
            if v.numel() > keep:
                g = torch.Generator(device=v.device).manual_seed(self.seed)
                v = v[torch.randperm(v.numel(), generator=g, device=v.device)[:keep]]
            if self.range_method == "mse":
                lo, hi = calib.mse(v, spec)
            else:
                lo, hi = calib.percentile(v, spec, self.percentile)
        self.set_qparams(*qparams(lo, hi, spec))
        self.calibrated.fill_(True)
        self._reset_stats()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.state == "off":
            return x
        if self.state == "observe":
            self._observe(x)
            return x
        if self.trainable == "none" and not bool(self.calibrated):
            raise RuntimeError(f"activation quantizer {self.site!r} has no range yet: call "
                               "refimpl.qmodel.calibrate(qmodel, x) first (or set_quant_state(acts=False))")
        return self._fake_quant(x, x[0].numel() if x.ndim > 1 else x.numel())

    def extra_repr(self) -> str:
        return f"site={self.site!r}, spec={self.spec}, range={self.range_method}, state={self.state}"


# --------------------------------------------------------------------------------------------
# Quantized layers: subclasses of the float layers, same parameters
# --------------------------------------------------------------------------------------------
class _QuantLayer:
    """Mixin: ``weight_quantizer`` fake-quantizes ``weight`` in forward."""

    def quantized_weight(self) -> torch.Tensor:
        """The weight used in forward: fake-quantized (or as is when the quantizer is disabled)."""
        return self.weight_quantizer(self.weight)

    def forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer's forward with a given weight (AdaRound's soft-quantized weight)."""
        raise NotImplementedError


class QuantConv1d(_QuantLayer, nn.Conv1d):
    """nn.Conv1d with a fake-quantized weight (white paper §2.3)."""

    def forward_with_weight(self, x, weight):
        return self._conv_forward(x, weight, self.bias)

    def forward(self, x):
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantConv2d(_QuantLayer, nn.Conv2d):
    """nn.Conv2d with a fake-quantized weight (white paper §2.3)."""

    def forward_with_weight(self, x, weight):
        return self._conv_forward(x, weight, self.bias)

    def forward(self, x):
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantLinear(_QuantLayer, nn.Linear):
    """nn.Linear with a fake-quantized weight (white paper §2.3)."""

    def forward_with_weight(self, x, weight):
        return F.linear(x, weight, self.bias)

    def forward(self, x):
        return F.linear(x, self.quantized_weight(), self.bias)


_QUANT_CLASSES = {nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}

# --------------------------------------------------------------------------------------------
# Graph rules
# --------------------------------------------------------------------------------------------
_RELU_MODULES = (nn.ReLU, nn.ReLU6)
_RELU_FUNCTIONS = (F.relu, torch.relu, F.relu6, torch.relu_)
_RELU_METHODS = ("relu", "relu_")
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
_AVG_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_AVG_FUNCTIONS = (F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, torch.mean)
_SIGN_KEEPING_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                         nn.Flatten, nn.Identity, nn.Dropout) + _AVG_MODULES
_SIGN_KEEPING_FUNCTIONS = (torch.flatten, F.max_pool1d, F.max_pool2d, F.dropout) + _AVG_FUNCTIONS
_SIGN_KEEPING_METHODS = ("view", "reshape", "flatten", "mean", "contiguous", "squeeze", "unsqueeze")


def _is_relu(node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _RELU_MODULES)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in _RELU_METHODS


def _is_add(node) -> bool:
    tensors = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return len(tensors) == 2
    return node.op == "call_method" and node.target in _ADD_METHODS and len(tensors) == 2


def _is_avg_pool(node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _AVG_MODULES)
    if node.op == "call_function":
        return node.target in _AVG_FUNCTIONS
    return node.op == "call_method" and node.target == "mean"


def _keeps_sign(node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _SIGN_KEEPING_MODULES)
    if node.op == "call_function":
        return node.target in _SIGN_KEEPING_FUNCTIONS
    return node.op == "call_method" and node.target in _SIGN_KEEPING_METHODS


def _fused_relu(node, modules):
    """The ReLU/ReLU6 that is ``node``'s only user, else None (§2.3.1 activation fusing)."""
    users = list(node.users)
    if len(users) == 1 and _is_relu(users[0], modules):
        return users[0]
    return None


def _bn_of(node, modules):
    """The BatchNorm module node that is ``node``'s only user, else None."""
    users = list(node.users)
    if (len(users) == 1 and users[0].op == "call_module"
            and isinstance(modules.get(users[0].target), nn.modules.batchnorm._BatchNorm)):
        return users[0]
    return None


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    if isinstance(model, torch.fx.GraphModule):
        return copy.deepcopy(model)
    try:
        return torch.fx.symbolic_trace(copy.deepcopy(model))
    except Exception as e:  # torch.fx raises TraceError, TypeError, RuntimeError, ...
        raise ValueError(f"torch.fx.symbolic_trace could not trace {type(model).__name__} (data-dependent "
                         f"control flow or unsupported Python?): {type(e).__name__}: {e}") from e


def quantize_model(model: nn.Module, config: QuantConfig | None = None, keep_bn: bool = False
                   ) -> torch.fx.GraphModule:
    """A simulated-quantization copy of a BN-free FP32 model (white paper §2.3, Fig. 4).

    Weights are quantized at insertion (static ranges, config.weight_range); activation
    quantizers are inserted uncalibrated: run ``calibrate`` before using them (see the module
    docstring for where they sit). The input model is not modified. The result is in eval mode,
    on the model's device. Raises ValueError for BatchNorm layers, unknown keep_fp names, or a
    model torch.fx cannot trace.

    keep_bn: keep each BatchNorm that directly follows a quantized layer (its only user) as a
    float BN after the quantized weights, the layer's output site moving after the BN (and its
    fused ReLU). This is QAT's "keep original BN" option (white paper §4.2, Table 7: trained with
    batch statistics, then merged into per-channel weight scales, :func:`merge_bn`). Any other
    BatchNorm is still a ValueError.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    if not isinstance(keep_bn, bool):
        raise TypeError(f"keep_bn must be a bool, got {keep_bn!r}")
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns and not keep_bn:
        raise ValueError(f"model has BatchNorm layers {bns}: fold them into the preceding layers first "
                         "with refimpl.fold.fold_all_bn(model), or pass keep_bn=True")
    gm = _trace(model)
    gm.eval()
    modules = dict(gm.named_modules())
    layer_names = [n for n, m in modules.items() if type(m) in _QUANT_CLASSES]
    unknown = [n for n in config.keep_fp if n not in layer_names]
    if unknown:
        raise ValueError(f"keep_fp names {unknown} are not Conv1d/Conv2d/Linear layers of the model; "
                         f"layers: {layer_names}")
    quantized = [n for n in layer_names if n not in config.keep_fp]
    if bns:
        kept = {_bn_of(node, modules).target for node in gm.graph.nodes
                if node.op == "call_module" and node.target in quantized and _bn_of(node, modules) is not None}
        stray = [n for n in bns if n not in kept]
        if stray:
            raise ValueError(f"keep_bn: BatchNorm layers {stray} do not directly follow a quantized Conv/Linear "
                             "layer (as its only user); fold or remove them")
    unknown = [n for n, _ in config.layer_weight_bits if n not in quantized]
    if unknown:
        raise ValueError(f"layer_weight_bits names {unknown} are not quantized Conv1d/Conv2d/Linear layers of "
                         f"the model; quantized layers: {quantized}")

    for name in quantized:
        mod = modules[name]
        mod.__class__ = _QUANT_CLASSES[type(mod)]
        mod.weight_quantizer = WeightQuantizer(config.weight_spec(name), config.weight_range, device=mod.weight.device)
        mod.weight_quantizer.set_range(mod.weight)

    if config.act_bits is not None:
        _insert_act_quantizers(gm, modules, set(quantized), config)
    gm.recompile()
    return gm


def _insert_act_quantizers(gm, modules, quantized: set, config: QuantConfig) -> None:
    graph = gm.graph
    nonneg: set = set()
    sites = []            # (anchor node, site name, signed)
    taken = set()
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]

    def add_site(anchor, name):
        if anchor not in taken:
            taken.add(anchor)
            sites.append((anchor, name))

    for node in graph.nodes:
        if _is_relu(node, modules):
            nonneg.add(node)
        elif _is_add(node):
            if all(a in nonneg for a in node.args[:2]):
                nonneg.add(node)
        elif _keeps_sign(node, modules) and node.args and node.args[0] in nonneg:
            nonneg.add(node)
        if node.op == "placeholder":
            readers = [u for u in node.users if not (u.op == "call_module" and u.target in config.keep_fp)]
            if readers:
                add_site(node, "input" if len(placeholders) == 1 else f"input_{node.name}")
        elif node.op == "call_module" and node.target in quantized:
            out = _bn_of(node, modules) or node       # keep_bn: the site follows the BN
            relu = _fused_relu(out, modules)
            add_site(relu if relu is not None else out, node.target)
        elif _is_add(node):
            relu = _fused_relu(node, modules)
            if relu is not None:
                add_site(relu, relu.target if relu.op == "call_module" else relu.name)
            else:
                add_site(node, node.name)
        elif _is_avg_pool(node, modules):
            add_site(node, node.target if node.op == "call_module" else node.name)

    # graph order, so that act_quantizers() lists sites topologically
    order = {n: i for i, n in enumerate(graph.nodes)}
    sites.sort(key=lambda s: order[s[0]])
    unknown = [n for n, _ in config.site_act_bits if n not in {name for _, name in sites}]
    if unknown:
        raise ValueError(f"site_act_bits names {unknown} are not activation sites of the model; "
                         f"sites: {[name for _, name in sites]}")
    gm.add_module("act_quant", nn.ModuleDict())
    device = next((p.device for p in gm.parameters()), None)
    for anchor, name in sites:
        signed = anchor not in nonneg
        key = name.replace(".", "_")
        q = ActQuantizer(config.act_spec(signed, name), name, config.act_range, config.act_percentile,
                         config.act_samples, config.seed, fixed_zero_point=config.act_symmetric, device=device)
        gm.act_quant[key] = q
        users = list(anchor.users)
        with graph.inserting_after(anchor):
            qnode = graph.call_module(f"act_quant.{key}", (anchor,))
        for u in users:
            u.replace_input_with(anchor, qnode)
    graph.lint()


# --------------------------------------------------------------------------------------------
# Access and control
# --------------------------------------------------------------------------------------------
def _check_qmodel(qmodel):
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"qmodel must be an nn.Module (from quantize_model), got {type(qmodel).__name__}")


def quant_layers(qmodel: nn.Module) -> dict:
    """{layer name: QuantConv1d/QuantConv2d/QuantLinear module} in module order."""
    _check_qmodel(qmodel)
    return {n: m for n, m in qmodel.named_modules() if isinstance(m, _QuantLayer)}


def weight_quantizers(qmodel: nn.Module) -> dict:
    """{layer name: WeightQuantizer}."""
    return {n: m.weight_quantizer for n, m in quant_layers(qmodel).items()}


def act_quantizers(qmodel: nn.Module) -> dict:
    """{site name: ActQuantizer} in graph (topological) order; site names as in the module docstring."""
    _check_qmodel(qmodel)
    return {m.site: m for m in qmodel.modules() if isinstance(m, ActQuantizer)}


def input_sites(qmodel: nn.Module, layer: str) -> list:
    """Names of the activation sites whose quantized tensors ``layer`` reads (through max pooling,
    flatten, reshape and the other pass-through ops), in graph order."""
    if not isinstance(qmodel, torch.fx.GraphModule):
        raise TypeError(f"qmodel must be a GraphModule from quantize_model, got {type(qmodel).__name__}")
    layers = quant_layers(qmodel)
    if layer not in layers:
        raise ValueError(f"layer must be a quantized layer of qmodel, one of {list(layers)}; got {layer!r}")
    modules = dict(qmodel.named_modules())
    node = next(n for n in qmodel.graph.nodes if n.op == "call_module" and n.target == layer)
    found, stack, seen = [], [node.args[0]], set()
    while stack:
        n = stack.pop()
        if not isinstance(n, torch.fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.op == "call_module" and isinstance(modules[n.target], ActQuantizer):
            found.append(modules[n.target].site)
        elif n.op != "placeholder":
            stack.extend(a for a in n.all_input_nodes)
    order = list(act_quantizers(qmodel))
    return sorted(found, key=order.index)


def first_last_bits(model: nn.Module, config: QuantConfig, bits: int = 8) -> QuantConfig:
    """``config`` with the first and the last quantized layer at ``bits``: their weights and the
    activation sites they read (the network input; the last layer's input).

    A common convention of low-bit QAT papers (not the white paper's: its experiments use one
    bit-width for all layers, §2.4): the first layer reads raw data, which 4 bits cannot resolve,
    and the last produces the logits, while the two together cost little of the compute.
    ``model``: the BN-free model that will be passed to ``quantize_model``.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    bits = check_int(bits, "bits", 1, 16)
    qm = quantize_model(model, config)
    names = list(quant_layers(qm))
    if not names:
        raise ValueError("the model has no quantized Conv/Linear layer")
    first_last = dict.fromkeys([names[0], names[-1]])
    layer_bits = dict(config.layer_weight_bits) | {n: bits for n in first_last}
    site_bits = dict(config.site_act_bits)
    if config.act_bits is not None:
        site_bits |= {site: bits for n in first_last for site in input_sites(qm, n)}
    return dataclasses.replace(config, layer_weight_bits=layer_bits, site_act_bits=site_bits)


@torch.no_grad()
def merge_bn(qmodel: torch.fx.GraphModule, return_report: bool = False):
    """A BN-free copy of a ``quantize_model(..., keep_bn=True)`` model: each BatchNorm merged into
    the per-channel weight scales of the quantized layer before it (white paper §4.2, Table 7,
    "keep original BN (per-channel)").

    Eval-mode BN is y = a * z + c per channel (a = gamma / sqrt(var + eps), c = beta - a * mean).
    With per-channel symmetric weights W_hat = s * q (codes q, zero point 0), a * W_hat =
    (s * |a|) * (sign(a) * q): the merged layer has the same integer codes up to sign, scale
    s * |a| and bias a * b + c, so it computes the same function -- except where a < 0 and a
    code equals qmin, whose negation -qmin = qmax + 1 is off the grid and clamps to qmax (one
    step off; a narrow-range grid avoids it). The weights become their quantized values
    (the float latent weights of QAT are not needed after training); activation quantizers are
    unchanged. Quantizers must be frozen (``set_trainable(qmodel, "none")``).

    Returns the new GraphModule (eval mode; the input is not modified), and with
    ``return_report=True`` also {layer name: number of codes clamped}.
    """
    if not isinstance(qmodel, torch.fx.GraphModule):
        raise TypeError(f"qmodel must be a GraphModule from quantize_model, got {type(qmodel).__name__}")
    gm = copy.deepcopy(qmodel)
    modules = dict(gm.named_modules())
    report = {}
    for node in list(gm.graph.nodes):
        if not (node.op == "call_module" and isinstance(modules.get(node.target), _QuantLayer)):
            continue
        bn_node = _bn_of(node, modules)
        if bn_node is None:
            continue
        layer, bn, wq = modules[node.target], modules[bn_node.target], modules[node.target].weight_quantizer
        if wq.trainable != "none":
            raise ValueError(f"{node.target}: freeze the quantizers first (set_trainable(qmodel, 'none'))")
        if wq.spec.axis is None or not wq.spec.symmetric:
            raise ValueError(f"{node.target}: merging BN needs per-channel symmetric weight quantization "
                             f"(QuantConfig(weight_per_channel=True, weight_symmetric=True)); got {wq.spec}")
        if bn.running_mean is None:
            raise ValueError(f"{bn_node.target} has no running statistics to merge")
        w = layer.weight
        shape = _param_shape(w, 0)
        s = wq.scale.reshape(shape).to(w.dtype)
        q = torch.round(wq(w) / s) if wq.enabled else None
        if q is None:
            raise ValueError(f"{node.target}: its weight quantizer is disabled")
        a, c = _bn_scale_shift(bn)      # the same per-channel affine form fold_bn folds
        q_new = q * torch.sign(a).reshape(shape)
        report[node.target] = int(((q_new < wq.spec.qmin) | (q_new > wq.spec.qmax)).sum())
        q_new = q_new.clamp(wq.spec.qmin, wq.spec.qmax)
        s_new = wq.scale * a.abs().to(wq.scale.dtype)
        layer.weight.data = (q_new * s_new.reshape(shape).to(w.dtype)).to(w.dtype)
        bias = layer.bias if layer.bias is not None else torch.zeros_like(a)
        new_bias = (a * bias + c).to(w.dtype)
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias)
        else:
            layer.bias.data = new_bias
        wq.set_qparams(s_new, torch.zeros_like(s_new))
        wq.set_rounding(None)
        bn_node.replace_all_uses_with(node)
        gm.graph.erase_node(bn_node)
        parent, _, leaf = bn_node.target.rpartition(".")
        delattr(gm.get_submodule(parent) if parent else gm, leaf)
    gm.graph.lint()
    gm.recompile()
    gm.eval()
    return (gm, report) if return_report else gm


def _device_of(model):
    p = next(model.parameters(), None)
    if p is None:
        p = next(model.buffers(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def calibrate(qmodel: nn.Module, x: torch.Tensor, batch_size: int = 256) -> None:
    """Set every activation quantizer's range from calibration inputs x (N, ...) (white paper §3.1).

    One pass over x in batches with the weights as currently quantized and all activation
    quantizers observing (passing float activations through), then each site's range is set with
    config.act_range. Afterwards the sites quantize (those that were "off" stay off).
    """
    _check_qmodel(qmodel)
    check_float_tensor(x, "x")
    batch_size = check_int(batch_size, "batch_size", 1)
    aqs = act_quantizers(qmodel)
    if not aqs:
        return
    before = {n: q.state for n, q in aqs.items()}
    was_training = qmodel.training
    qmodel.eval()
    device = _device_of(qmodel)
    try:
        for q in aqs.values():
            q.set_state("observe")
        for i in range(0, x.shape[0], batch_size):
            qmodel(x[i:i + batch_size].to(device))
        for q in aqs.values():
            q.compute_range()
    finally:
        for n, q in aqs.items():
            q.set_state("off" if before[n] == "off" else "quantize")
        qmodel.train(was_training)


def set_quant_state(qmodel: nn.Module, weights: bool = True, acts: bool = True, layers=None) -> None:
    """Enable/disable weight and activation quantization (the white paper's debugging flow, §3.7).

    layers=None: every quantizer. Otherwise an iterable of layer names and/or site names: a layer
    name switches its weight quantizer and its output site (same name); a site name (e.g.
    "input", "blocks.0.relu2", "pool") its activation quantizer. Quantizers not named are left
    as they are.
    """
    _check_qmodel(qmodel)
    if not isinstance(weights, bool) or not isinstance(acts, bool):
        raise TypeError("weights and acts must be bools")
    wqs, aqs = weight_quantizers(qmodel), act_quantizers(qmodel)
    if layers is None:
        names_w, names_a = list(wqs), list(aqs)
    else:
        if isinstance(layers, str):
            layers = [layers]
        layers = list(layers)
        unknown = [n for n in layers if n not in wqs and n not in aqs]
        if unknown:
            raise ValueError(f"layers {unknown} are neither quantized layers {list(wqs)} nor sites {list(aqs)}")
        names_w = [n for n in layers if n in wqs]
        names_a = [n for n in layers if n in aqs]
    for n in names_w:
        wqs[n].enabled = weights
    for n in names_a:
        aqs[n].set_state("quantize" if acts else "off")


def set_trainable(qmodel: nn.Module, mode: str, weights: bool = True, acts: bool = True) -> list:
    """Switch quantizers to a QAT mode: "ste" (learned scale and zero point, white paper §4.1),
    "lsq" (learned step size, Esser et al. 2020) or back to "none" (fixed; zero points rounded).

    Returns the list of quantizer parameters (for the optimizer). A checkpoint saved in a
    trainable mode loads into ``quantize_model(...)`` after the same ``set_trainable`` call, or
    call ``set_trainable(qmodel, "none")`` before saving.
    """
    _check_qmodel(qmodel)
    check_choice(mode, "mode", TRAINABLE_MODES)
    qs = (list(weight_quantizers(qmodel).values()) if weights else []) + \
         (list(act_quantizers(qmodel).values()) if acts else [])
    params = []
    for q in qs:
        if mode != "none" and isinstance(q, WeightQuantizer) and q.rounding.numel():
            raise ValueError("a weight quantizer uses AdaRound rounding: set_rounding(None) before QAT")
        q.set_trainable(mode)
        params += list(q.parameters(recurse=False))
    return params

"""Uniform quantization as pure tensor math: quantization parameters, rounding, (fake) quantization.

Notation of the white paper (Nagel et al. 2021, §2.2, eqs. 4-7): a real ``x`` maps to the integer ::

    q = clamp(round(x / scale) + zero_point, qmin, qmax)                  (eqs. 4-5)
    x_hat = scale * (q - zero_point)                                      (eq. 6)

and ``fake_quant`` is the composition x -> x_hat (eq. 7) in floating point ("simulated
quantization", §2.3).
Division by ``scale`` is done as multiplication by the float32 reciprocal, as PyTorch's fused
kernels do, so the results are bit-exact with ``torch.fake_quantize_per_{tensor,channel}_affine``.
"""

from __future__ import annotations

import math

import torch

from .._checks import check_choice, check_float_tensor, normalize_axis
from .spec import QuantSpec

__all__ = [
    "ROUNDING_MODES", "qparams", "round_to_int", "broadcast_qparams", "quantize",
    "dequantize", "in_grid", "fake_quant", "lsq_grad_scale", "lsq_fake_quant", "pot_scale",
]

ROUNDING_MODES = ("half_even", "half_away", "floor", "stochastic")
FLOAT32_EPS = torch.finfo(torch.float32).eps


# --------------------------------------------------------------------------------------------
# Power-of-two scales
# --------------------------------------------------------------------------------------------
# 2^(-1/2): a mantissa m in [0.5, 1) rounds log2(m) up to 0 when m >= 2^(-1/2)
_HALF_OCTAVE = 2.0 ** -0.5


class _PotScale(torch.autograd.Function):
    """s -> 2^round(log2 s), exactly a power of two; gradient p / s (MQBench's STE through log2)."""

    @staticmethod
    def forward(ctx, s):
        m, e = torch.frexp(s)
        p = torch.ldexp(torch.ones_like(s), e - (m < _HALF_OCTAVE).to(e.dtype))
        ctx.save_for_backward(s, p)
        return p

    @staticmethod
    def backward(ctx, g):
        s, p = ctx.saved_tensors
        return g * p / s


def pot_scale(scale: torch.Tensor) -> torch.Tensor:
    """The nearest power of two of a positive scale, 2^round(log2 s), with a straight-through
    gradient in log2 s (d/ds = 2^round(log2 s) / s).

    MQBench's power-of-two scale (Li et al. 2021, TVM's backend: "represent the scale as
    power-of-two"; its released ``pot_quantization`` rounds log2 s with the STE). log2 s is
    rounded exactly, from the float's exponent and mantissa (frexp), not through a
    transcendental function, so the result is the same on every CPU; ties cannot occur
    (2^(-1/2) is irrational). Applied by every function here whose ``QuantSpec`` has
    ``pot_scale=True``.

    scale: floating tensor, finite and > 0, any shape. Returns scale's shape and dtype.
    """
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        raise TypeError("scale must be a floating torch.Tensor")
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise ValueError("scale must be finite and > 0 everywhere")
    return _PotScale.apply(scale)


# --------------------------------------------------------------------------------------------
# Quantization parameters
# --------------------------------------------------------------------------------------------
def _as_range_tensor(value, name: str, device=None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.dtype.is_complex or not (value.dtype.is_floating_point or value.dtype in _INT_DTYPES):
            raise TypeError(f"{name} must be a real number or a real tensor, got dtype {value.dtype}")
        t = value.detach().to(torch.float32)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        t = torch.tensor(float(value), dtype=torch.float32, device=device)
    else:
        raise TypeError(f"{name} must be a float or a torch.Tensor, got {type(value).__name__}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf; a quantization range must be finite")
    return t


_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def qparams(xmin, xmax, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point that map the range [xmin, xmax] onto ``spec``'s grid (white paper §2.2).

    PyTorch observers' convention (``torch.ao.quantization.observer.UniformQuantizationObserverBase
    ._calculate_qparams``): the range is first widened to contain 0, so that zero is exactly
    representable (white paper §2.2, "zero-point"); then::

      symmetric:  scale = max(-xmin, xmax) / ((qmax - qmin) / 2),  zero_point = spec.symmetric_zero_point
      asymmetric: scale = (xmax - xmin) / (qmax - qmin),           zero_point = qmin - round(xmin / scale)

    with scale floored at float32 eps (so an all-zero range gives a valid quantizer). A
    ``spec.pot_scale`` grid takes the nearest power of two of that scale (``pot_scale``), and the
    asymmetric zero_point is computed with it.

    xmin, xmax: floats or float tensors, 0-d for ``spec.axis is None``, 1-d (one per channel) otherwise.
    Returns scale (float32) and zero_point (int32), both 0-d or both 1-d, on xmin's device.

    Used in :ref:`ch1-sec-uniform-and-non-uniform-grids`, :ref:`ch2-sec-the-affine-map`,
    :ref:`ch3-sec-the-last-layer-cross-entropy`.
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    device = xmin.device if isinstance(xmin, torch.Tensor) else (
        xmax.device if isinstance(xmax, torch.Tensor) else None)
    lo = _as_range_tensor(xmin, "xmin", device)
    hi = _as_range_tensor(xmax, "xmax", device).to(lo.device)
    want_ndim = 0 if spec.axis is None else 1
    for name, t in (("xmin", lo), ("xmax", hi)):
        if t.ndim != want_ndim:
            kind = "0-d (per-tensor: spec.axis is None)" if want_ndim == 0 else "1-d (per-channel: spec.axis is set)"
            raise ValueError(f"{name} must be {kind}, got shape {tuple(t.shape)}")
    if lo.shape != hi.shape:
        raise ValueError(f"xmin and xmax must have the same shape, got {tuple(lo.shape)} and {tuple(hi.shape)}")
    if bool((hi < lo).any()):
        raise ValueError("xmax must be >= xmin (elementwise)")

    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    if spec.symmetric:
        scale = torch.maximum(-lo, hi) / (float(spec.qmax - spec.qmin) / 2)
        scale = torch.clamp(scale, min=FLOAT32_EPS)
        if spec.pot_scale:
            scale = pot_scale(scale)
        zero_point = torch.full_like(scale, spec.symmetric_zero_point, dtype=torch.int32)
    else:
        scale = (hi - lo) / float(spec.qmax - spec.qmin)
        scale = torch.clamp(scale, min=FLOAT32_EPS)
        if spec.pot_scale:
            scale = pot_scale(scale)
        zero_point = spec.qmin - torch.round(lo / scale).to(torch.int32)
        zero_point = torch.clamp(zero_point, spec.qmin, spec.qmax)
    return scale, zero_point


# --------------------------------------------------------------------------------------------
# Rounding
# --------------------------------------------------------------------------------------------
def round_to_int(v: torch.Tensor, rounding: str = "half_even", generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """Round a floating tensor to integral values (same dtype).

    ::

        half_even:  ties to even (IEEE default; ``torch.round``, C's ``nearbyint``).
        half_away:  ties away from zero (C's ``round``).
        floor:      towards -inf.
        stochastic: floor(v) + Bernoulli(v - floor(v)), so E[round(v)] = v (Gupta et al. 2015, §3);
                    uniforms drawn from ``generator`` (on v's device) when given.

    Used in :ref:`ch2-sec-stochastic-rounding`.
    """
    check_choice(rounding, "rounding", ROUNDING_MODES)
    if rounding == "half_even":
        return torch.round(v)
    if rounding == "floor":
        return torch.floor(v)
    if rounding == "half_away":
        # v - trunc(v) is exact in floating point; floor(|v| + 0.5) is not (0.49999997 + 0.5 -> 1.0)
        t = torch.trunc(v)
        return t + torch.sign(v) * ((v - t).abs() >= 0.5)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    f = torch.floor(v)
    u = torch.rand(v.shape, generator=generator, device=v.device, dtype=v.dtype)
    return f + (u < (v - f))


# --------------------------------------------------------------------------------------------
# Quantize / dequantize / fake-quantize
# --------------------------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float16/bfloat16 are scaled in float32, as PyTorch's kernels promote Half * float to float
    return torch.float64 if dtype == torch.float64 else torch.float32


def _qparam_tensor(value, name: str, device, dtype: torch.dtype) -> torch.Tensor:
    """A scale or zero point given as a number or a real tensor, detached, in ``dtype`` on ``device``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=dtype, device=device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a number or a torch.Tensor, got {type(value).__name__}")
    if value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must be real, got dtype {value.dtype}")
    return value.detach().to(device=device, dtype=dtype)


def broadcast_qparams(x: torch.Tensor, scale, zero_point, spec: QuantSpec, dtype: torch.dtype = torch.float32):
    """Validate (scale, zero_point) against x and spec; return them shaped to broadcast over x.

    The parameters of white paper §2.2 (eqs. 4-7): scale > 0 and finite, zero_point an integer
    on spec's grid [qmin, qmax]. Per tensor (spec.axis None): one value each. Per channel: 1-d
    with x.shape[spec.axis] values, or one value used for every channel.

    x: tensor whose shape and device the parameters are shaped for (its values are not read).
    scale, zero_point: Python numbers or real tensors of any dtype. dtype: the dtype to return
    them in (float32: as PyTorch's fake-quant kernels, which take a float32 scale; float64).
    Returns (scale, zero_point, axis): scale and zero_point (integral values) in ``dtype`` on x's
    device, 0-d per tensor or of shape [1, ..., C, ..., 1] per channel; axis the non-negative
    channel axis, or None per tensor. A ``spec.pot_scale`` grid's scale is rounded to the nearest
    power of two here (``pot_scale``): quantize, dequantize and fake_quant all come through here.
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    s = _qparam_tensor(scale, "scale", x.device, dtype)
    z = _qparam_tensor(zero_point, "zero_point", x.device, dtype)
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise ValueError("scale must be finite and > 0 everywhere")
    if spec.pot_scale:
        s = pot_scale(s)
    if not bool(torch.isfinite(z).all()):
        raise ValueError("zero_point contains NaN or Inf")
    if not bool((z == torch.round(z)).all()):
        raise ValueError("zero_point must hold integer values (the white paper's z is an integer, §2.2)")
    if not bool(((z >= spec.qmin) & (z <= spec.qmax)).all()):
        raise ValueError(f"zero_point must lie on the grid [{spec.qmin}, {spec.qmax}]")

    if spec.axis is None:
        if s.numel() != 1 or z.numel() != 1:
            raise ValueError(
                f"per-tensor quantization (spec.axis=None) needs one scale and one zero_point, got "
                f"{s.numel()} and {z.numel()} values; use spec.per_channel(axis) for per-channel")
        return s.reshape(()), z.reshape(()), None
    axis = normalize_axis(spec.axis, x.ndim, "spec.axis")
    channels = x.shape[axis]
    shape = [1] * x.ndim
    shape[axis] = channels
    out = []
    for name, t in (("scale", s), ("zero_point", z)):
        if t.numel() == 1:
            t = t.reshape(1).expand(channels)
        if t.ndim != 1 or t.numel() != channels:
            raise ValueError(
                f"{name} must be 1-d with one value per channel along axis {axis} ({channels}), "
                f"got shape {tuple(t.shape)}")
        out.append(t.reshape(shape))
    return out[0], out[1], axis


def _bounds(zpf: torch.Tensor, spec: QuantSpec, cdt: torch.dtype):
    """Clamp bounds for the zero-point-free code: [qmin - zp, qmax - zp], floats when uniform."""
    if zpf.ndim == 0 or bool(zpf.min() == zpf.max()):
        # one zero_point for all channels: scalar bounds run ~6x faster than broadcast tensor bounds
        zp = float(zpf.reshape(-1)[0])
        return spec.qmin - zp, spec.qmax - zp
    return (spec.qmin - zpf).to(cdt), (spec.qmax - zpf).to(cdt)


# Elements per block on CPU: a block's temporaries stay in cache between the elementwise passes,
# so memory traffic is about one read of x and one write of the result.
_BLOCK_ELEMENTS = 1 << 17


def _blocks(x: torch.Tensor):
    """Slices of dim 0 of about _BLOCK_ELEMENTS elements each (one slice: small tensors, GPUs)."""
    if x.ndim == 0 or x.numel() <= _BLOCK_ELEMENTS or x.device.type != "cpu":
        return [...]                                   # Ellipsis also indexes 0-d tensors
    rows = max(1, _BLOCK_ELEMENTS // max(1, x.numel() // x.shape[0]))
    return [slice(i, i + rows) for i in range(0, x.shape[0], rows)]


def _quantize_blocks(x, scale_b, zpf, axis, spec, rounding, generator, codes_only, need_mask):
    """The shared kernel of quantize/fake_quant, run block by block over dim 0.

    Per block: v = x * (1/scale) (float32 reciprocal, as PyTorch's kernels), round, clamp the
    zero-point-free code to [qmin - zp, qmax - zp] (equal to PyTorch's
    clamp(round(v) + zp, qmin, qmax) - zp: integers in float are exact below 2^24), then either
    add zp back (codes) or multiply by scale (values). x must be finite (checked by the caller).
    Returns (result, mask or None); mask marks codes that were on the grid before clamping (the
    STE's pass-through set).
    """
    cdt = _compute_dtype(x.dtype)
    inv_scale = torch.reciprocal(scale_b).to(cdt)
    lo, hi = _bounds(zpf, spec, cdt)
    zp_c = zpf.to(cdt)
    out = torch.empty(x.shape, dtype=spec.storage_dtype if codes_only else x.dtype, device=x.device)
    mask = torch.empty(x.shape, dtype=torch.bool, device=x.device) if need_mask else None
    direct = not codes_only and x.dtype == cdt      # the final product can be written into out
    per_row = axis == 0 and scale_b.ndim > 0

    def rows_of(t, rows):
        return t[rows] if per_row and isinstance(t, torch.Tensor) else t

    for rows in _blocks(x):
        v = torch.mul(x[rows].to(cdt), rows_of(inv_scale, rows))   # half * 0-d float32 stays half: cast
        v = v.round_() if rounding == "half_even" else round_to_int(v, rounding, generator)
        blo, bhi = rows_of(lo, rows), rows_of(hi, rows)
        if mask is not None:
            torch.logical_and(v >= blo, v <= bhi, out=mask[rows])
        if isinstance(blo, float):
            v.clamp_(blo, bhi)
        else:
            # maximum/minimum broadcast ~4x faster than clamp with tensor bounds
            torch.minimum(torch.maximum(v, blo, out=v), bhi, out=v)
        if codes_only:
            out[rows] = v.add_(rows_of(zp_c, rows))
        elif direct:
            torch.mul(v, rows_of(scale_b, rows).to(cdt), out=out[rows])
        else:
            out[rows] = _scaled_back(v, rows_of(scale_b, rows), x.dtype)
    return out, mask


def _scaled_back(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes * scale, the exact product rounded once to ``dtype``.

    float32: a float32 product is that single rounding. float16/bfloat16: via float64, where the
    product of a float32 scale and a code below 2^17 is exact. float64: exact as is.
    (torch.fake_quantize_per_tensor_affine rounds float64 results to float32 precision first;
    its per-channel op does not: we follow the per-channel op and the exact product.)
    """
    if dtype in (torch.float16, torch.bfloat16):
        return (codes.to(torch.float64) * scale.to(torch.float64)).to(dtype)
    return codes.mul_(scale.to(codes.dtype))


def quantize(x: torch.Tensor, scale, zero_point, spec: QuantSpec, rounding: str = "half_even",
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Integer codes q = clamp(round(x / scale) + zero_point, qmin, qmax) (white paper eqs. 4-5).

    x: floating tensor, any shape.  scale, zero_point: as returned by ``qparams``.
    Returns an integer tensor of x's shape in ``spec.storage_dtype`` (int8/uint8 up to 8 bits).

    Used in :ref:`ch1-sec-symmetric-and-asymmetric-grids`, :ref:`ch2-sec-the-affine-map`.
    """
    return _codes(x, scale, zero_point, spec, rounding, generator, need_mask=False)[0]


def _codes(x, scale, zero_point, spec, rounding, generator, need_mask):
    """Validated integer codes of x and, when asked, the mask of codes not clipped."""
    check_float_tensor(x, "x")
    check_choice(rounding, "rounding", ROUNDING_MODES)
    scale_b, zpf, axis = broadcast_qparams(x, scale, zero_point, spec)
    with torch.no_grad():
        return _quantize_blocks(x.detach(), scale_b, zpf, axis, spec, rounding, generator,
                                codes_only=True, need_mask=need_mask)


def dequantize(q: torch.Tensor, scale, zero_point, spec: QuantSpec, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """Real values x_hat = scale * (q - zero_point) (white paper eq. 6).

    q: integer tensor of codes on ``spec``'s grid. Returns a tensor of q's shape in ``dtype``.

    Used in :ref:`ch2-sec-the-affine-map`.
    """
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise TypeError(f"q must be an integer tensor (the output of quantize), got {q.dtype}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    if q.numel() == 0:
        raise ValueError("q is empty")
    if int(q.min()) < spec.qmin or int(q.max()) > spec.qmax:
        raise ValueError(f"q has codes outside the grid [{spec.qmin}, {spec.qmax}]")
    scale_b, zpf, _ = broadcast_qparams(q, scale, zero_point, spec)
    codes = q.to(_compute_dtype(dtype)) - zpf.to(_compute_dtype(dtype))
    return _scaled_back(codes, scale_b, dtype)


def in_grid(x: torch.Tensor, scale, zero_point, spec: QuantSpec, rounding: str = "half_even",
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Where round(x / scale) + zero_point lies on the grid [qmin, qmax], i.e. was not clipped.

    Where it is True, fake_quant's STE gradient is 1; where False the value was clipped (white
    paper §2.2) and the gradient is 0. x: floating tensor. Returns a bool tensor of x's shape.
    """
    return _codes(x, scale, zero_point, spec, rounding, generator, need_mask=True)[1]


class _FakeQuantSTE(torch.autograd.Function):
    """x -> x_hat with the straight-through estimator, zero outside the grid (white paper §4.1)."""

    @staticmethod
    def forward(ctx, x, scale_b, zpf, axis, spec, rounding, generator):
        y, mask = _quantize_blocks(x, scale_b, zpf, axis, spec, rounding, generator,
                                   codes_only=False, need_mask=ctx.needs_input_grad[0])
        ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        (mask,) = ctx.saved_tensors
        return grad_out * mask, None, None, None, None, None, None


def fake_quant(x: torch.Tensor, scale, zero_point, spec: QuantSpec, rounding: str = "half_even",
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Simulated quantization x_hat = dequantize(quantize(x)) in x's dtype, with an STE gradient.

    Bit-exact with ``torch.fake_quantize_per_tensor_affine`` / ``_per_channel_affine`` for
    ``rounding="half_even"``. Gradient w.r.t. x: 1 where round(x/scale)+zero_point lies on the
    grid, 0 where it was clipped (white paper §4.1, as torch). scale and zero_point are
    constants here; ``lsq_fake_quant`` learns the step size.

    x: floating tensor (float16/bfloat16/float32/float64), any shape. Returns x's shape and dtype.

    Used in :ref:`ch1-sec-uniform-and-non-uniform-grids`, :ref:`ch2-sec-the-affine-map`,
    :ref:`ch3-sec-the-last-layer-cross-entropy`, :ref:`ch8-sec-the-piecewise-grid`.
    """
    check_float_tensor(x, "x")
    check_choice(rounding, "rounding", ROUNDING_MODES)
    scale_b, zpf, axis = broadcast_qparams(x, scale, zero_point, spec)
    return _FakeQuantSTE.apply(x, scale_b, zpf, axis, spec, rounding, generator)


# --------------------------------------------------------------------------------------------
# Learned step size: LSQ and LSQ+
# --------------------------------------------------------------------------------------------
def lsq_grad_scale(num_elements: int, spec: QuantSpec) -> float:
    """LSQ's step-size gradient scale g = 1 / sqrt(N * Q_P) (Esser et al. 2020, §2.2).

    num_elements: N, the weights of the layer (per channel, for per-channel step sizes) or the
    features of one sample for an activation.
    """
    if num_elements <= 0:
        raise ValueError(f"num_elements must be > 0, got {num_elements}")
    return 1.0 / math.sqrt(num_elements * max(spec.qmax, 1))


class _LSQ(torch.autograd.Function):
    """LSQ / LSQ+ fake quantization with the papers' gradients for x, step size and offset."""

    @staticmethod
    def forward(ctx, x, step_size, offset, spec, grad_scale, axis):
        shape = [1] * x.ndim
        if axis is not None:
            shape[axis] = x.shape[axis]
        cdt = _compute_dtype(x.dtype)
        s = step_size.detach().to(torch.float32).reshape(shape)
        beta = None if offset is None else offset.detach().to(cdt).reshape(shape)
        inv = torch.reciprocal(s).to(cdt)
        xs = x.detach().to(cdt)
        v = (xs - beta if beta is not None else xs) * inv          # (x - beta) / s
        q = torch.clamp(torch.round(v), spec.qmin, spec.qmax)
        inside = (v > spec.qmin) & (v < spec.qmax)               # -Q_N < v/s < Q_P (LSQ eq. 3)
        ctx.save_for_backward(v, q, inside)
        ctx.meta = (spec, grad_scale, axis, step_size.shape, None if offset is None else offset.shape)
        out = _scaled_back(q.clone(), s, x.dtype)
        if beta is not None:
            out = out + beta.to(out.dtype)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        v, q, inside = ctx.saved_tensors
        spec, grad_scale, axis, s_shape, b_shape = ctx.meta
        g = grad_out.to(v.dtype)
        reduce_dims = [d for d in range(v.ndim) if d != axis]

        def per_param(t, shape):
            t = t.sum(dim=reduce_dims) if reduce_dims else t
            return t.reshape(shape)

        grad_x = (g * inside).to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            # LSQ eq. 3: round(v) - v inside the grid, the clipped code (-Q_N or Q_P) outside
            ds = torch.where(inside, q - v, q)
            grad_s = per_param(g * ds, s_shape) * grad_scale
        grad_b = None
        if b_shape is not None and ctx.needs_input_grad[2]:
            # LSQ+ §3.1: the offset passes the gradient only where the value was clipped
            grad_b = per_param(g * (~inside), b_shape) * grad_scale
        return grad_x, grad_s, grad_b, None, None, None


def lsq_fake_quant(x: torch.Tensor, step_size: torch.Tensor, spec: QuantSpec, grad_scale: float = 1.0,
                   offset: torch.Tensor | None = None) -> torch.Tensor:
    """Fake quantization with a learnable step size (LSQ, Esser et al. 2020, eqs. 1-3) and, when
    ``offset`` is given, a learnable offset beta (LSQ+, Bhalgat et al. 2020, §3.1)::

        x_hat = clamp(round((x - beta) / s), qmin, qmax) * s + beta

    Gradients (straight-through for round): dx_hat/dx = 1 inside the grid, 0 outside;
    dx_hat/ds = round(v) - v inside, the clipped code outside (v = (x - beta)/s), times
    ``grad_scale`` (LSQ's g, see ``lsq_grad_scale``); dx_hat/dbeta = 1 outside, 0 inside
    (also times ``grad_scale``).

    x: floating tensor.  step_size (and offset): float tensors, 0-d for per-tensor, 1-d with one
    value per channel along ``spec.axis``. A ``spec.pot_scale`` grid uses ``pot_scale(step_size)``
    (its gradient times 2^round(log2 s)/s). Returns x's shape and dtype.
    """
    check_float_tensor(x, "x")
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if not isinstance(step_size, torch.Tensor) or not step_size.is_floating_point():
        raise TypeError("step_size must be a floating torch.Tensor")
    if not bool(torch.isfinite(step_size).all()) or not bool((step_size > 0).all()):
        raise ValueError("step_size must be finite and > 0 everywhere")
    if not isinstance(grad_scale, (int, float)) or not grad_scale > 0:
        raise ValueError(f"grad_scale must be a positive number, got {grad_scale!r}")
    axis = None
    want = 1
    if spec.axis is not None:
        axis = normalize_axis(spec.axis, x.ndim, "spec.axis")
        want = x.shape[axis]
    for name, t in (("step_size", step_size), ("offset", offset)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor")
        if t.numel() != want or (axis is not None and t.ndim != 1):
            raise ValueError(f"{name} must hold {want} value(s) for spec.axis={spec.axis}, got shape {tuple(t.shape)}")
    if offset is not None and not bool(torch.isfinite(offset).all()):
        raise ValueError("offset contains NaN or Inf")
    if spec.pot_scale:
        step_size = pot_scale(step_size)
    return _LSQ.apply(x, step_size, offset, spec, float(grad_scale), axis)

"""The affine fake quantizer with learnable scale and zero point and its straight-through gradients.

White paper: Nagel et al. 2021, "A White Paper on Neural Network Quantization" (arXiv 2106.08295),
§4.1 "Simulating quantization for backward path": the straight-through estimator (STE) sets
d round(y)/dy := 1, which makes the fake quantizer of eq. 7, ::

    x_hat = s * (clamp(round(x / s) + z, qmin, qmax) - z),

differentiable w.r.t. x, the scale s and the zero point z.

* :func:`ste_derivatives` -- the closed-form local derivatives in the three regions (inside the
  grid, clipped below, clipped above): the one place the formula is written.
* :func:`ste_fake_quant` -- eq. 7 as an autograd function whose backward uses them (the "ste"
  trainable mode of ``refimpl.qmodel``'s quantizers).

``refimpl.qat.ste_gradients`` evaluates the same derivatives for the paper's case split on the
unrounded value; ``refimpl.qat.gradient_check`` checks them against autograd and finite
differences.
"""

from __future__ import annotations

import torch

from .._checks import check_float_tensor, check_positive, normalize_axis
from .functional import pot_scale
from .spec import QuantSpec

__all__ = ["ste_derivatives", "ste_fake_quant"]


def ste_derivatives(u: torch.Tensor, rounded: torch.Tensor, below: torch.Tensor, above: torch.Tensor,
                    scale: torch.Tensor, zero_point: torch.Tensor, qmin: float, qmax: float, *,
                    need_scale: bool = True, need_zero_point: bool = True):
    """Local derivatives of x_hat = s * (clamp(round(x/s) + z, qmin, qmax) - z) under the STE.

    White paper §4.1 (eq. 7 with d round(y)/dy := 1; s as in LSQ, Esser et al. 2020, eq. 3, and
    z as LSQ+'s offset, Bhalgat et al. 2020, with z treated as a real variable)::

        region     d x_hat/dx   d x_hat/ds          d x_hat/dz
        inside         1        round(x/s) - x/s        0
        below          0        qmin - z               -s
        above          0        qmax - z               -s

    (inside: x_hat = s*round(x/s), so d/ds = round(x/s) + s*(-x/s^2) with the STE and z cancels;
    outside: x_hat = s*(qmin - z) or s*(qmax - z), smooth in s and z.) The caller decides the
    regions: the paper's case split is on the unrounded v = x/s + z (``refimpl.qat.ste_gradients``),
    an autograd quantizer masks on the clipped code round(x/s) + z (:func:`ste_fake_quant`).

    u: x/s, a floating tensor of any shape; rounded: round(u), same shape and dtype; below,
    above: disjoint bool masks of u's shape; scale, zero_point: tensors of u's dtype that
    broadcast to u (0-d, or [1, ..., C, ..., 1] per channel); qmin, qmax: the grid's ends.
    Returns (inside, d_scale, d_zero_point): inside, the bool mask of u's shape that is
    d x_hat/dx; d_scale and d_zero_point of u's shape and dtype (None when not ``need_*``).
    """
    if not isinstance(u, torch.Tensor) or not u.is_floating_point():
        raise TypeError(f"u must be a floating torch.Tensor, got {type(u).__name__}")
    for name, mask in (("below", below), ("above", above)):
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool torch.Tensor")
    inside = ~(below | above)
    d_scale = d_zero_point = None
    if need_scale:
        d_scale = torch.where(inside, rounded - u, torch.where(below, qmin - zero_point, qmax - zero_point))
    if need_zero_point:
        d_zero_point = torch.where(inside, torch.zeros_like(u), -scale)
    return inside, d_scale, d_zero_point


def _param_shape(x: torch.Tensor, axis: int | None) -> list[int]:
    """[1, ..., C, ..., 1]: x.ndim ones with x's channel count at ``axis`` (all ones when None)."""
    shape = [1] * x.ndim
    if axis is not None:
        shape[axis] = x.shape[axis]
    return shape


class _AffineSTE(torch.autograd.Function):
    """Eq. 7 with round-to-nearest z and :func:`ste_derivatives` on the clipped code's regions.

    Parameter gradients are summed per channel (over all elements, per tensor) and multiplied by
    ``grad_scale``. Forward in float64 for float64 x, else float32.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, grad_scale):
        """x_hat of x's shape and dtype; saves x/s, its rounding, the clip masks, s and z."""
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
        """(dL/dx of x's dtype, dL/ds of scale's shape, dL/dz of zero_point's shape, None x 4)."""
        v, r, below, above, s, z = ctx.saved_tensors
        qmin, qmax, axis, grad_scale, s_shape, z_shape = ctx.meta
        inside, ds, dz = ste_derivatives(v, r, below, above, s, z, qmin, qmax,
                                         need_scale=ctx.needs_input_grad[1],
                                         need_zero_point=ctx.needs_input_grad[2])
        gc = g.to(v.dtype)
        dims = [d for d in range(v.ndim) if d != axis]

        def reduce(t, shape):
            return (t.sum(dim=dims) if dims else t).reshape(shape) * grad_scale

        gx = (gc * inside).to(g.dtype) if ctx.needs_input_grad[0] else None
        gs = reduce(gc * ds, s_shape) if ds is not None else None
        gz = reduce(gc * dz, z_shape) if dz is not None else None
        return gx, gs, gz, None, None, None, None


def ste_fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec,
                   grad_scale: float = 1.0) -> torch.Tensor:
    """Fake quantization with learnable scale and zero point (white paper §4.1 eq. 7, STE gradients).

    Forward: x_hat = s * (clamp(round(x/s) + z, qmin, qmax) - z) with x/s computed as x * (1/s),
    z rounded to the nearest integer and clamped to the grid. Backward: :func:`ste_derivatives`
    with the regions of the clipped code round(x/s) + z (as torch's fake-quant masks), parameter
    gradients summed per channel (per tensor: over all elements) and multiplied by
    ``grad_scale`` (e.g. LSQ's g, ``refimpl.quant.lsq_grad_scale``).

    x: float16/bfloat16/float32/float64 tensor, any shape (computed in float64 for float64,
    else float32). scale (> 0) and zero_point: real tensors, one value (per-tensor:
    spec.axis None) or x.shape[spec.axis] values (per channel). The scale is not checked for
    positivity here: the caller that learns it keeps it > 0 (``refimpl.qat`` clamps it). A
    ``spec.pot_scale`` grid uses ``pot_scale(scale)`` (straight through log2 s). Returns x_hat with x's shape and dtype.
    """
    check_float_tensor(x, "x")
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    axis = None if spec.axis is None else normalize_axis(spec.axis, x.ndim, "spec.axis")
    count = 1 if axis is None else x.shape[axis]
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if not isinstance(t, torch.Tensor) or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must be a real torch.Tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.numel() != count:
            raise ValueError(f"{name} must hold {count} value(s) for spec.axis={spec.axis}, "
                             f"got shape {tuple(t.shape)}")
    grad_scale = check_positive(grad_scale, "grad_scale")
    if spec.pot_scale:
        scale = pot_scale(scale.to(torch.float32) if not scale.is_floating_point() else scale)
    return _AffineSTE.apply(x, scale, zero_point, float(spec.qmin), float(spec.qmax), axis, grad_scale)

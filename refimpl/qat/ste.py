"""The white paper's straight-through (STE) gradients of the fake quantizer, and their check.

White paper: Nagel et al. 2021, "A White Paper on Neural Network Quantization" (arXiv 2106.08295),
§4.1 "Simulating quantization for backward path".

* :func:`ste_gradients` -- the closed-form local derivatives of x_hat = s * (clamp(round(x/s) + z,
  qmin, qmax) - z) (eq. 7) w.r.t. x, s and z with the paper's case split on the unrounded value
  (the formula itself is ``refimpl.quant.ste_derivatives``).
* :func:`gradient_check` -- those derivatives next to autograd and finite differences (the
  chapter's table).
"""

from __future__ import annotations

import torch

from .._checks import check_float_tensor
from ..quant import QuantSpec, broadcast_qparams, lsq_fake_quant, ste_derivatives

__all__ = ["ste_gradients", "gradient_check"]

# the regions of the case split, in the order of _region's codes 0, 1, 2
REGIONS = ("below", "inside", "above")


def ste_gradients(x: torch.Tensor, scale, zero_point, spec: QuantSpec
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local derivatives of x_hat = s * (clamp(round(x/s) + z, qmin, qmax) - z) under the STE.

    White paper §4.1: the straight-through estimator sets d round(y)/dy := 1; with it the
    derivative of the fake quantizer (eq. 7) w.r.t. its input is 1 on the grid and 0 where
    clipped (the section's gradient equation). Differentiating eq. 7 the same way w.r.t. the
    quantization parameters gives the scale and zero-point gradients used when they are learned
    (§4.1 points to LSQ, Esser et al. 2020, eq. 3, for s; LSQ+, Bhalgat et al. 2020, for the
    offset). With v = x/s + z, the regions are the paper's case split on the *unrounded* value::

        region               d x_hat/dx   d x_hat/ds               d x_hat/dz
        inside  qmin<=v<=qmax     1       round(x/s) - x/s              0
        below   v < qmin          0       qmin - z                     -s
        above   v > qmax          0       qmax - z                     -s

    (inside: x_hat = s*round(x/s), so d/ds = round(x/s) + s*(-x/s^2)*1 with the STE, and z
    cancels; outside: x_hat = s*(qmin - z) or s*(qmax - z), a smooth function of s and z).
    The zero point is treated as a real variable (it is rounded to an integer in the forward
    pass, and the STE passes that rounding too). These are elementwise: the gradient of a loss
    w.r.t. a per-tensor s is sum_i dL/dx_hat_i * d_scale_i (per channel: summed per channel).

    Note: ``refimpl.quant.fake_quant`` (like torch's fake-quant) masks the x gradient with the
    *rounded* code; the two differ only for v within half a step outside [qmin, qmax].

    The table is evaluated by ``refimpl.quant.ste_derivatives`` (shared with the autograd
    quantizer ``refimpl.quant.ste_fake_quant``, which splits on the rounded code instead).

    x: floating tensor, any shape (computed in float64 for float64 x, else float32). scale: > 0,
    zero_point: integer-valued on the grid; numbers or tensors as ``refimpl.quant.broadcast_qparams``
    takes them (one value per tensor, or per channel along spec.axis).
    Returns (d_x, d_scale, d_zero_point), each of x's shape and dtype, on x's device.
    """
    check_float_tensor(x, "x")
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    s, z, _ = broadcast_qparams(x, scale, zero_point, spec, dtype=cdt)
    xs = x.detach().to(cdt)
    # x * (1/s), as fake_quant does: the same codes as the forward pass, bit for bit
    u = xs * torch.reciprocal(s)
    v = u + z
    inside, d_scale, d_zero_point = ste_derivatives(u, torch.round(u), v < spec.qmin, v > spec.qmax, s, z,
                                                    spec.qmin, spec.qmax)
    d_x = inside.to(cdt)
    return d_x.to(x.dtype), d_scale.to(x.dtype), d_zero_point.to(x.dtype)


def _region(v: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """0 below the grid, 1 inside, 2 above (int64, v's shape)."""
    return (v >= spec.qmin).long() + (v > spec.qmax).long()


def _true_quantizer(x, s, z, spec):
    """Eq. 7 with a real-valued z outside the rounding: the staircase actually computed."""
    return s * (torch.clamp(torch.round(x / s) + z, spec.qmin, spec.qmax) - z)


def _surrogate(x, s, z, spec, residual, region):
    """The smooth function whose exact derivatives are the STE gradients at the evaluation point.

    The STE d round(y)/dy := 1 is the same as writing round(y) = y + r with the rounding
    residual r = round(y0) - y0 frozen at the evaluation point y0; the region (which branch of
    the clamp is active) is frozen too, as the paper's case split assumes. So inside the grid
    x_hat ~ s*(x/s + r) = x + s*r, and outside x_hat = s*(qmin - z) or s*(qmax - z).
    """
    inside = x + s * residual
    lo = torch.full_like(inside, s * (spec.qmin - z))
    hi = torch.full_like(inside, s * (spec.qmax - z))
    return torch.where(region == 1, inside, torch.where(region == 0, lo, hi))


def gradient_check(x: torch.Tensor, scale: float, zero_point: int, spec: QuantSpec, h: float = 1e-6) -> dict:
    """The paper's STE derivatives next to autograd and finite differences, per element of x.

    What each column checks (all in float64, per-tensor s and z, elementwise):

    * ``paper``: :func:`ste_gradients`, the closed form (white paper §4.1's STE gradient, and
      the same differentiation for s and z).
    * ``autograd``: torch autograd through ``refimpl.quant.lsq_fake_quant`` with a learned offset
      (LSQ+, Bhalgat et al. 2020) -- an independently written quantizer with hand-written
      backward -- re-parametrised to the paper's (s, z) by beta = -s*z (then
      round((x - beta)/s) = round(x/s) + z for integer z, the same forward values), one step
      size and offset per element so that autograd returns the elementwise derivatives, and
      grad_scale = 1. autograd does the chain rule d/ds|_z = d/ds|_beta - z d/dbeta and
      d/dz = -s d/dbeta. Agreement checks the closed form against LSQ/LSQ+'s gradients.
    * ``fd_surrogate``: central finite differences (step h, relative for s) of the smooth
      surrogate the STE differentiates: eq. 7 with round(y) replaced by y + r, r = round(y0) - y0
      frozen at the point, and the clamp's active branch frozen. Agreement checks that the
      closed form is the derivative of that function (the algebra, including d/ds inside the
      grid = r = round(x/s) - x/s).
    * ``fd_true``: central finite differences of the actual staircase eq. 7 (z real). Where the
      STE is an approximation this differs: inside the grid the true d/dx is 0 (STE: 1) and the
      true d/ds is round(x/s) (STE: round(x/s) - x/s); outside the grid the quantizer is smooth
      and all three derivatives agree with the STE -- except within half a step outside
      [qmin, qmax], where v is outside but round(x/s) + z is not yet clipped, so the staircase
      still behaves as inside.

    Finite differences are meaningful only away from the rounding thresholds (v = k + 1/2) and
    the region boundaries; the caller picks such x (``margin`` in the result tells how far each
    point is, in units of the step, from the nearest of them).

    x: 1-d floating tensor. Returns a dict of float64 tensors of x's shape: "x", "region"
    (int64, 0 below / 1 inside / 2 above), "margin", and for each of "paper", "autograd",
    "fd_surrogate", "fd_true" a dict {"x": ..., "scale": ..., "zero_point": ...}.

    Used in :ref:`ch6-sec-the-straight-through-estimator`.
    """
    check_float_tensor(x, "x")
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if x.ndim != 1:
        raise ValueError(f"x must be 1-d, got shape {tuple(x.shape)}")
    if spec.axis is not None:
        raise ValueError("gradient_check takes a per-tensor spec (spec.axis=None)")
    if not isinstance(h, float) or not 0 < h < 1e-2:
        raise ValueError(f"h must be a float in (0, 0.01), got {h!r}")
    xd = x.detach().to(torch.float64)
    s0 = float(scale)
    z0 = float(zero_point)
    out = {"x": xd.clone()}

    dx, ds, dz = ste_gradients(xd, s0, int(zero_point), spec)
    out["paper"] = {"x": dx, "scale": ds, "zero_point": dz}

    # autograd through LSQ+ with beta = -s*z, one (s, beta) per element
    n = xd.numel()
    xa = xd.clone().requires_grad_(True)
    sa = torch.full((n,), s0, dtype=torch.float64, device=xd.device, requires_grad=True)
    za = torch.full((n,), z0, dtype=torch.float64, device=xd.device, requires_grad=True)
    y = lsq_fake_quant(xa, sa, spec.per_channel(0), grad_scale=1.0, offset=-sa * za)
    y.sum().backward()
    out["autograd"] = {"x": xa.grad, "scale": sa.grad, "zero_point": za.grad}

    v = xd / s0 + z0
    region = _region(v, spec)
    residual = torch.round(xd / s0) - xd / s0
    out["region"] = region
    # distance (in steps) to the nearest rounding threshold and to the region boundaries
    frac = (v - torch.floor(v) - 0.5).abs()
    edge = torch.minimum((v - spec.qmin).abs(), (v - spec.qmax).abs())
    out["margin"] = torch.minimum(frac, edge)

    def fd(fn):
        hs = h * s0
        hx = h * s0
        return {
            "x": (fn(xd + hx, s0, z0) - fn(xd - hx, s0, z0)) / (2 * hx),
            "scale": (fn(xd, s0 + hs, z0) - fn(xd, s0 - hs, z0)) / (2 * hs),
            "zero_point": (fn(xd, s0, z0 + h) - fn(xd, s0, z0 - h)) / (2 * h),
        }

    out["fd_surrogate"] = fd(lambda a, s, z: _surrogate(a, s, z, spec, residual, region))
    out["fd_true"] = fd(lambda a, s, z: _true_quantizer(a, s, z, spec))
    return out

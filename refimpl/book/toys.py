"""Small dynamics on a quantized value that chapter 2 plots: repeated re-quantized updates and
gradient descent through the straight-through estimator."""

from __future__ import annotations

import math

import torch

from .._checks import check_choice, check_float_tensor, check_int
from ..quant import ROUNDING_MODES, QuantSpec, fake_quant

__all__ = ["accumulate_updates", "ste_gradient_descent"]


def _scalar_qparams(scale, spec: QuantSpec):
    if not isinstance(spec, QuantSpec) or spec.axis is not None:
        raise ValueError("needs a per-tensor QuantSpec (spec.axis is None)")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not (0 < scale < math.inf):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    return float(scale), spec.symmetric_zero_point if spec.symmetric else 0


def accumulate_updates(x0: torch.Tensor, increment: float, steps: int, scale: float, spec: QuantSpec,
                       rounding: str = "half_even", generator: torch.Generator | None = None) -> torch.Tensor:
    """Add ``increment`` to a quantized value ``steps`` times, re-quantizing after every update.

    x_{t+1} = fake_quant(x_t + increment) on the grid (scale, zero_point = spec's symmetric zero
    point, or 0), as in training with low-precision weights: with round-to-nearest an increment
    below scale/2 is rounded away every time and x never moves; with stochastic rounding
    E[x_{t+1}] = x_t + increment while no clipping occurs (Gupta et al. 2015, "Deep learning with
    limited numerical precision").
    x0: floating tensor of independent starting values (e.g. one per chain), on the grid or not.
    Returns the trajectory, a tensor of shape ``(steps + 1, *x0.shape)`` in x0's dtype; row 0 is x0.

    Used in :ref:`ch2-sec-stochastic-rounding`.
    """
    check_float_tensor(x0, "x0")
    check_choice(rounding, "rounding", ROUNDING_MODES)
    steps = check_int(steps, "steps", low=0)
    if not isinstance(increment, (int, float)) or isinstance(increment, bool) or not math.isfinite(increment):
        raise ValueError(f"increment must be a finite number, got {increment!r}")
    s, z = _scalar_qparams(scale, spec)
    out = torch.empty((steps + 1, *x0.shape), dtype=x0.dtype)
    x = x0.detach().clone()
    out[0] = x
    with torch.no_grad():
        for t in range(steps):
            x = fake_quant(x + increment, s, z, spec, rounding, generator)
            out[t + 1] = x
    return out


def ste_gradient_descent(w0: float, target: float, scale: float, spec: QuantSpec, lr: float, steps: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient descent on L(w) = (q(w) - target)^2 / 2 with the straight-through estimator.

    q = fake_quant on the grid (scale, zero point as in ``accumulate_updates``); its STE gradient
    is 1 inside the grid, so the update is w <- w - lr * (q(w) - target). When ``target`` lies
    between two grid points the latent weight w oscillates around the rounding threshold between
    them and q(w) flips between the two points (Nagel et al. 2022, "Overcoming oscillations in
    quantization-aware training", ICML 2022). Gradients come from autograd through fake_quant.
    Returns (latent, quantized): float64 tensors of shape (steps + 1,), w_t and q(w_t).

    Used in :ref:`ch2-sec-the-straight-through-estimator`.
    """
    s, z = _scalar_qparams(scale, spec)
    steps = check_int(steps, "steps", low=0)
    for name, v in (("w0", w0), ("target", target), ("lr", lr)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    w = torch.tensor([float(w0)], dtype=torch.float64, requires_grad=True)
    latent = torch.empty(steps + 1, dtype=torch.float64)
    quantized = torch.empty(steps + 1, dtype=torch.float64)
    for t in range(steps + 1):
        q = fake_quant(w, s, z, spec)
        latent[t], quantized[t] = w.detach()[0], q.detach()[0]
        if t == steps:
            break
        loss = 0.5 * (q - target).pow(2).sum()
        (grad,) = torch.autograd.grad(loss, w)
        with torch.no_grad():
            w -= lr * grad
    return latent, quantized

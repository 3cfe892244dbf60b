"""PACT, the parameterized clipping activation (Choi et al. 2018, "PACT: Parameterized Clipping
Activation for Quantized Neural Networks", arXiv 1805.06085), as pure tensor math, with the
signed ranges MQBench (Li et al. 2021) added.

PACT replaces ReLU by a clip at a learned upper bound α (Eq. 1), y = 0.5(abs(x) - abs(x - α) + α) =
clip(x, 0, α), and quantizes y on 2^k levels (Eq. 2), y_q = round(y (2^k - 1)/α) α/(2^k - 1).
With the straight-through estimator for the rounding, the gradient in α is Eq. 3:
∂y_q/∂α = 1 where x >= α, else 0; in x it is 1 inside (0, α) and 0 where clipped. The
dependence of the step α/(2^k - 1) on α is not differentiated (the STE treats y_q as y).

MQBench runs PACT also at signed sites: the symmetric range (-α, α), and the asymmetric range
(β, α) with a second learned bound β (initialised to -6, as α to 6). The lower bound's gradient
is Eq. 3 mirrored: ∂/∂β = 1 where x <= β; for the symmetric range the lower bound is -α, so
∂/∂α collects -1 where x <= -α.
"""

from __future__ import annotations

import numbers

import torch

from .._checks import check_float_tensor, scalar_tensor
from .functional import fake_quant, qparams
from .spec import QuantSpec

__all__ = ["pact_quant", "pact_range"]


def _bound(v, name: str, x: torch.Tensor) -> torch.Tensor:
    """A clipping bound as a 0-d tensor in x's compute dtype (a tensor keeps its graph)."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return scalar_tensor(v, name, x, dt, "PACT's bounds are per tensor")


def pact_range(spec: QuantSpec, alpha, beta=None) -> tuple:
    """PACT's clipping range (lower, upper) for a grid: (0, α) for an unsigned ``spec`` (the paper),
    (-α, α) for a signed spec without ``beta`` (MQBench's symmetric range), (β, α) with ``beta``
    (MQBench's asymmetric range; a signed asymmetric spec only).

    alpha, beta: numbers or one-element tensors (returned as given: the lower bound is 0, -alpha
    or beta). Raises ValueError for alpha <= 0, beta >= alpha, or beta with a grid it does not fit.

    >>> pact_range(QuantSpec(4, signed=False, symmetric=False), 6.0)
    (0.0, 6.0)
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    a = float(alpha.detach().reshape(-1)[0]) if isinstance(alpha, torch.Tensor) else alpha
    if isinstance(a, bool) or not isinstance(a, numbers.Real):
        raise TypeError(f"alpha must be a number or a floating torch.Tensor, got {type(alpha).__name__}")
    if not a > 0:
        raise ValueError(f"alpha must be > 0 (PACT's upper clipping bound), got {a}")
    if beta is None:
        return (-alpha if spec.signed else 0.0), alpha
    if not spec.signed or spec.symmetric:
        raise ValueError(f"beta (the learned lower bound) needs a signed asymmetric spec; got {spec}: "
                         "use beta=None ((0, alpha) unsigned, (-alpha, alpha) signed symmetric)")
    b = float(beta.detach().reshape(-1)[0]) if isinstance(beta, torch.Tensor) else beta
    if isinstance(b, bool) or not isinstance(b, numbers.Real):
        raise TypeError(f"beta must be a number, a floating torch.Tensor or None, got {type(beta).__name__}")
    if not b < a:
        raise ValueError(f"beta must be < alpha (the range (beta, alpha)), got beta={b}, alpha={a}")
    return beta, alpha


def pact_quant(x: torch.Tensor, alpha, spec: QuantSpec, beta=None) -> torch.Tensor:
    """PACT: x clipped to ``pact_range(spec, alpha, beta)`` and fake-quantized on ``spec``'s grid over
    that range (Choi et al. 2018, Eq. 1-3; the signed ranges are MQBench's).

    The grid: (scale, zero_point) = ``qparams(lower, upper, spec)`` of the detached bounds, so an
    unsigned asymmetric k-bit spec gives the paper's Eq. 2, step α/(2^k - 1), zero point 0.
    Gradients (the rounding straight-through): in x, 1 strictly inside the range, 0 where clipped;
    in alpha, Eq. 3, 1 where x >= α (and -1 where x <= -α for the symmetric range); in beta, 1
    where x <= β. x: floating tensor (float16/bfloat16/float32/float64), any shape; alpha (and
    beta): learnable one-element tensors or numbers; spec: a per-tensor QuantSpec. Returns x's
    shape and dtype.

    >>> pact_quant(torch.tensor([-1.0, 1.3, 9.0]), 6.0, QuantSpec(2, signed=False, symmetric=False)).tolist()
    [0.0, 2.0, 6.0]

    Used in :ref:`ch11-sec-the-algorithms`.
    """
    check_float_tensor(x, "x")
    lower, upper = pact_range(spec, alpha, beta)
    if spec.axis is not None:
        raise ValueError(f"spec must be per-tensor (axis None): PACT learns one range per tensor, got axis={spec.axis}")
    hi = _bound(upper, "alpha", x)
    lo = _bound(lower, "beta" if beta is not None else "alpha", x)
    v = x.to(hi.dtype)
    # where(), not clamp: the bound gets the gradient exactly where x reaches it (Eq. 3)
    y = torch.where(v >= hi, hi, torch.where(v <= lo, lo, v))
    scale, zero_point = qparams(lo.detach(), hi.detach(), spec)
    y_q = fake_quant(y.detach(), scale, zero_point, spec)
    return (y_q + (y - y.detach())).to(x.dtype)

"""QIL, quantization-interval learning (Jung et al., CVPR 2019, "Learning to Quantize Deep
Networks by Optimizing Quantization Intervals with Task Loss", arXiv 1808.05779), as pure tensor
math, as MQBench (Li et al. 2021) ran it.

QIL learns an interval of magnitudes by its centre c and half-width d. A transformer maps
values into [0, 1] (activations) or [-1, 1] (weights) and a uniform discretiser rounds them.
With α = 0.5/d and β = -0.5 c/d + 0.5 (so α abs(w) + β is 0 at abs(w) = c - d and 1 at abs(w) = c + d),
the paper's weight transformer is ::

    ŵ = 0                              |w| < c - d      (pruned)
      = sign(w)                        |w| > c + d      (clipped)
      = sign(w) (α|w| + β)^γ           otherwise

with a learned exponent γ (γ = 1: linear), and its activation transformer the same with γ = 1
and no sign: x̂ = 0 below c - d, 1 above c + d, αx + β between. The discretiser is
round(v q_D)/q_D with a straight-through gradient: q_D = 2^(b-1) - 1 levels per sign for
weights, 2^b - 1 levels in [0, 1] for activations. c, d and γ are learned through the
transformer (the discretiser straight-through).

MQBench's variant, which the functions here follow: c and d get the gradient scale
1/sqrt(numel·q_max) of LSQ (``grad_scale``; it replaces the paper's 0.01), γ is not learned by
default ("learning γ will not converge"), and signed activations use the weight transformer
with γ = 1, sign(x) clamp(α|x| + β, 0, 1), on 2^(b-1) - 1 levels per sign.

Units: the outputs are in normalised units ([-1, 1] for weights and signed activations,
[0, 1] for unsigned activations), as the paper defines them, not the input's: a BatchNorm after
the layer absorbs the scale; with statically folded BN there is none and training must learn it
back. The rounding is ``refimpl.quant.fake_quant`` on the grid of a ``QuantSpec``.
"""

from __future__ import annotations

import numbers

import torch

from .._checks import check_float_tensor, check_int, scalar_tensor
from .functional import fake_quant
from .spec import QuantSpec

__all__ = ["qil_transform", "qil_weight", "qil_act"]


def _param(v, name: str, like: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """A QIL parameter (number or one-element floating tensor, graph kept) as a 0-d tensor."""
    return scalar_tensor(v, name, like, dt, "QIL's interval is per tensor")


def _scaled_gradient(t: torch.Tensor, g: float) -> torch.Tensor:
    """t's value (exactly) with its gradient multiplied by g."""
    return t.detach() + (t * g - (t * g).detach())


def _check_grad_scale(grad_scale) -> float:
    if isinstance(grad_scale, bool) or not isinstance(grad_scale, numbers.Real) or not grad_scale > 0:
        raise ValueError(f"grad_scale must be a number > 0, got {grad_scale!r}")
    return float(grad_scale)


def _transform(x, center, distance, gamma, signed, grad_scale):
    """The transformer in x's compute dtype, differentiable in x, c, d and γ."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = _param(center, "center", x, dt)
    d = _param(distance, "distance", x, dt)
    if not bool(d.detach() > 0):
        raise ValueError(f"distance must be > 0 (the interval's half-width d), got {float(d)}")
    fixed_gamma = not isinstance(gamma, torch.Tensor) and gamma == 1
    g = _param(gamma, "gamma", x, dt)
    if not bool(g.detach() > 0):
        raise ValueError(f"gamma must be > 0 (the transformer's exponent), got {float(g)}")
    if not isinstance(signed, bool):
        raise TypeError(f"signed must be a bool, got {signed!r}")
    s = _check_grad_scale(grad_scale)
    if s != 1.0:
        c, d = _scaled_gradient(c, s), _scaled_gradient(d, s)
    alpha = 0.5 / d
    beta = -0.5 * c / d + 0.5
    v = x.to(dt)
    u = torch.clamp(alpha * (v.abs() if signed else v) + beta, 0.0, 1.0)
    if not fixed_gamma:
        # u^γ where u > 0 only: at u = 0 its derivative in u (γ < 1) and in γ (log u) are undefined
        pos = u > 0
        safe = torch.where(pos, u, torch.ones_like(u))
        u = torch.where(pos, safe ** g, torch.zeros_like(u))
    return torch.sign(v) * u if signed else u


def qil_transform(x: torch.Tensor, center, distance, gamma=1.0, *, signed: bool = True,
                  grad_scale: float = 1.0) -> torch.Tensor:
    """QIL's transformer before the discretiser (Jung et al. 2019; module docstring).

    signed=True: sign(x) clamp(α|x| + β, 0, 1)^γ, the paper's weight transformer (MQBench's
    signed activations with γ = 1); signed=False: clamp(αx + β, 0, 1)^γ, the activation
    transformer (γ = 1 in the paper). α = 0.5/d, β = -0.5c/d + 0.5. Differentiable in x, center,
    distance and gamma (autograd); the gradients of center and distance are multiplied by
    ``grad_scale`` (their values are unchanged). x: floating tensor, any shape; center,
    distance (> 0), gamma (> 0): numbers or one-element floating tensors. Returns x's shape and
    dtype (computed in float32, float64 for float64), values in [-1, 1] or [0, 1].

    >>> qil_transform(torch.tensor([-0.5, 1.5, -3.0]), 1.0, 1.0).tolist()
    [-0.25, 0.75, -1.0]
    """
    check_float_tensor(x, "x")
    return _transform(x, center, distance, gamma, signed, grad_scale).to(x.dtype)


def _discretise(v: torch.Tensor, levels: int, spec: QuantSpec) -> torch.Tensor:
    """round(v levels)/levels on spec's grid (fake_quant, scale 1/levels, zero point 0), straight-through."""
    v_q = fake_quant(v.detach(), 1.0 / levels, 0, spec)
    return v_q + (v - v.detach())


def qil_weight(w: torch.Tensor, center, distance, gamma, bits: int, grad_scale: float = 1.0) -> torch.Tensor:
    """QIL's quantized weight: the weight transformer (``qil_transform(..., signed=True)``) then the
    discretiser round(ŵ q_D)/q_D on q_D = 2^(b-1) - 1 levels per sign (Jung et al. 2019).

    The discretiser is ``fake_quant`` on the narrow signed b-bit grid [-q_D, q_D] with scale
    1/q_D, its gradient straight-through; c, d and γ get the transformer's gradients, c and d
    times ``grad_scale`` (MQBench: 1/sqrt(numel q_D), ``lsq_grad_scale``). Output in normalised
    units, [-1, 1]. w: floating tensor, any shape; center, distance (> 0), gamma (> 0): numbers
    or one-element floating tensors; bits: 2..16. Returns w's shape and dtype.

    >>> [round(v, 4) for v in qil_weight(torch.tensor([0.2, 0.9, -1.2, 5.0]), 1.0, 0.5, 1.0, 3).tolist()]
    [0.0, 0.3333, -0.6667, 1.0]

    Used in :ref:`ch11-sec-the-algorithms`.
    """
    check_float_tensor(w, "w")
    bits = check_int(bits, "bits", 2, 16)
    v = _transform(w, center, distance, gamma, True, grad_scale)
    q_d = 2 ** (bits - 1) - 1
    return _discretise(v, q_d, QuantSpec(bits, signed=True, symmetric=True, narrow_range=True)).to(w.dtype)


def qil_act(x: torch.Tensor, center, distance, bits: int, signed: bool = False,
            grad_scale: float = 1.0) -> torch.Tensor:
    """QIL's quantized activation: the activation transformer then the discretiser (Jung et al. 2019).

    signed=False: clamp(αx + β, 0, 1) on 2^b - 1 levels in [0, 1] (the paper's; MQBench's
    released code omits this clamp for unsigned activations, so its values can leave [0, 1]).
    signed=True (MQBench): sign(x) clamp(α|x| + β, 0, 1) on 2^(b-1) - 1 levels per sign.
    Rounding by ``fake_quant`` (scale 1/levels, zero point 0), straight-through; c and d get the
    transformer's gradients times ``grad_scale``. Output in normalised units. x: floating
    tensor, any shape; center, distance (> 0): numbers or one-element floating tensors; bits:
    1..16 (2..16 signed). Returns x's shape and dtype.

    >>> [round(v, 4) for v in qil_act(torch.tensor([0.0, 0.7, 1.2, 4.0]), 1.0, 1.0, 2).tolist()]
    [0.0, 0.3333, 0.6667, 1.0]
    """
    check_float_tensor(x, "x")
    if not isinstance(signed, bool):
        raise TypeError(f"signed must be a bool, got {signed!r}")
    bits = check_int(bits, "bits", 2 if signed else 1, 16)
    v = _transform(x, center, distance, 1.0, signed, grad_scale)
    if signed:
        levels, spec = 2 ** (bits - 1) - 1, QuantSpec(bits, signed=True, symmetric=True, narrow_range=True)
    else:
        levels, spec = 2 ** bits - 1, QuantSpec(bits, signed=False, symmetric=False)
    return _discretise(v, levels, spec).to(x.dtype)

"""AdaRound's pure math: the soft-rounded weight and its rectified sigmoid and regulariser
(Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization", arXiv
2004.10568, eqs. 22-24).

::

    W_soft = scale * (clamp(floor(W / scale) + h + zero_point, qmin, qmax) - zero_point)   (eq. 22)
    h(V)   = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),  zeta = 1.1, gamma = -0.1    (eq. 23)
    f_reg  = sum 1 - |2 h(V) - 1|^beta                                                      (eq. 24)

Used by ``refimpl.qmodel.WeightQuantizer`` (a hard rounding h in {0, 1}) and by the layer-wise
optimisation ``refimpl.ptq.adaround`` (a soft h). Book: chapter 5, "AdaRound".
"""

from __future__ import annotations

import torch

from .spec import QuantSpec

__all__ = ["ZETA", "GAMMA", "soft_rounded_weight", "rectified_sigmoid", "rounding_regularizer", "init_v"]

ZETA, GAMMA = 1.1, -0.1


def soft_rounded_weight(floor: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                        spec: QuantSpec) -> torch.Tensor:
    """eq. 22: scale * (clamp(floor + h + zero_point, qmin, qmax) - zero_point), differentiable in h.

    floor: floor(W / scale), W's shape; h: in [0, 1], W's shape (1 = round up); scale and
    zero_point shaped to broadcast over W (per tensor or per channel). Returns W's shape, in the
    promoted dtype of the inputs (float32 for a float32 floor).
    """
    return (torch.clamp(floor + h + zero_point, spec.qmin, spec.qmax) - zero_point) * scale


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1) (eq. 23); V's shape."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def rounding_regularizer(v: torch.Tensor, beta: float) -> torch.Tensor:
    """``f_reg = sum 1 - |2 h(V) - 1|^beta`` (eq. 24): 0 when every h is 0 or 1. 0-d."""
    return (1.0 - (2.0 * rectified_sigmoid(v) - 1.0).abs().pow(beta)).sum()


def init_v(frac: torch.Tensor) -> torch.Tensor:
    """V such that h(V) = frac, for frac in [0, 1) (the inverse of eq. 23 inside the clip)."""
    p = (frac - GAMMA) / (ZETA - GAMMA)                   # in [1/12, 11/12): no infinities
    return torch.log(p) - torch.log1p(-p)

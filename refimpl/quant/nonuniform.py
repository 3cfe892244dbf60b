"""Non-uniform grids: power-of-two ("logarithmic") levels and nearest-level quantization."""

from __future__ import annotations

import math

import torch

from .._checks import check_float_tensor, check_int

__all__ = ["pow2_levels", "quantize_to_levels"]


def pow2_levels(bits: int, max_abs: float) -> torch.Tensor:
    """The levels of a signed power-of-two ("logarithmic") grid with 2^b - 1 values, sorted.

    One bit is the sign, the other b - 1 bits index 2^(b-1) magnitudes: zero and
    max_abs * 2^-k for k = 0 .. 2^(b-1) - 2 (Miyashita et al. 2016, "Convolutional neural
    networks using logarithmic data representation"; the "PoT" grid of Li et al. 2020, APoT).
    At 4 bits: 0, +-max_abs * {1, 1/2, ..., 1/64}, 15 levels, as many as a narrow 4-bit uniform grid.
    bits: 2..16; max_abs > 0. Returns a float64 1-d tensor of 2^b - 1 increasing levels.

    Used in :ref:`ch1-sec-uniform-and-non-uniform-grids`.
    """
    bits = check_int(bits, "bits", 2, 16)
    if not isinstance(max_abs, (int, float)) or isinstance(max_abs, bool) or not (0 < max_abs < math.inf):
        raise ValueError(f"max_abs must be a finite number > 0, got {max_abs!r}")
    k = torch.arange(2 ** (bits - 1) - 1, dtype=torch.float64)
    mags = float(max_abs) * torch.pow(2.0, -k)
    return torch.cat([-mags, torch.zeros(1, dtype=torch.float64), mags.flip(0)]).sort().values


def quantize_to_levels(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Round every element of x to the nearest of a finite set of levels (any grid, uniform or not).

    Values beyond the outermost levels clip to them; a value exactly halfway between two levels
    goes to the one of smaller magnitude (towards zero). Distances are computed in float64.
    x: floating tensor, any shape; levels: 1-d real tensor, distinct values in increasing order.
    Returns a tensor of x's shape and dtype holding levels.

    Used in :ref:`ch1-sec-uniform-and-non-uniform-grids`, :ref:`ch10-sec-what-a-multiply-costs`.
    """
    check_float_tensor(x, "x")
    check_float_tensor(levels, "levels")
    if levels.ndim != 1:
        raise ValueError(f"levels must be 1-d, got shape {tuple(levels.shape)}")
    lv = levels.detach().double()
    if lv.numel() > 1 and not bool((lv[1:] > lv[:-1]).all()):
        raise ValueError("levels must be distinct and in increasing order")
    if lv.numel() == 1:
        return torch.full_like(x, float(lv[0]))
    v = x.detach().double().reshape(-1)
    hi = torch.searchsorted(lv, v).clamp_(1, lv.numel() - 1)
    # the two neighbouring levels, gathered once (QAT calls this on every activation)
    l_lo, l_hi = lv[hi - 1], lv[hi]
    d_lo, d_hi = v - l_lo, l_hi - v
    # nearest; on a tie prefer the level of smaller magnitude
    take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (l_hi.abs() < l_lo.abs()))
    out = torch.where(take_hi, l_hi, l_lo)
    return out.reshape(x.shape).to(x.dtype)

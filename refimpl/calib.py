"""Quantization range setting: pure functions that choose the range (xmin, xmax) of a quantizer.

The white paper (Nagel et al. 2021, "A White Paper on Neural Network Quantization") §3.1
"Quantization range setting" lists min-max, MSE, cross-entropy and BN-based ranges; to these we
add the running (exponential moving average) min-max of quantization-aware training, percentile
clipping, and the KL-divergence ("entropy") calibration of TensorRT (Migacz 2017, "8-bit
Inference with TensorRT") together with onnxruntime's variant of it.

Every range function returns ``(xmin, xmax)``: float32 tensors on the input's device, 0-d when
``spec.axis is None`` and 1-d (one value per slice along ``spec.axis``) otherwise, ready for
``refimpl.quant.qparams(xmin, xmax, spec)``. Nothing here keeps state between calls: the running
statistics of ``ema_minmax`` are passed in and returned.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from ._checks import all_finite, check_float_tensor, check_int, normalize_axis
from .numerics import sqrt
from .quant.functional import fake_quant, qparams
from .quant.spec import QuantSpec

__all__ = ["minmax", "ema_minmax", "percentile", "mse", "cross_entropy", "kl", "entropy_threshold",
           "bn_based"]

# Breakpoints (kinks) of the piecewise-quadratic MSE handled by one sweep: bounds the sweep's
# memory to ~150 MB; larger searches are cut into several sweeps.
_KINK_BUDGET = 1 << 21
# A whole-range exact search is used while it needs at most this many kinks in total; beyond it
# a grid first narrows the search to the near-optimal region.
_FULL_SEARCH_KINKS = 1 << 21
# Loss evaluations (elements x candidates) that one batched evaluation may hold in memory.
_EVAL_BUDGET = 1 << 22
# Search grid for the near-optimal region: uniform in the scale, plus a geometric tail so that a
# range far below the data's maximum (heavy tails) is still resolved.
_GRID = torch.cat([torch.arange(1, 49, dtype=torch.float64) / 48,
                   torch.logspace(-4, 0, 13, dtype=torch.float64)[:-1]]).unique()
# Zero points searched exactly per channel (asymmetric grids): at most 8 bits the near-optimal
# ones are ~5-20; beyond, the many near-equivalent zero points (which differ only in what they
# clip) are cut to the most promising on the grid.
_MAX_ZERO_POINTS = 64
# onnxruntime's smoothing constant for zero bins (quant_utils.smooth_distribution)
_ORT_EPS = 1e-4
# Counts up to this enter sum (c - e) log(c - e) exactly; larger ones through a series in e / c.
_EXACT_COUNTS = 8


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------
def _check_spec(spec) -> QuantSpec:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    return spec


def _rows(x: torch.Tensor, spec: QuantSpec, name: str = "x") -> torch.Tensor:
    """x as (channels, elements): one row for a per-tensor spec, one per slice along spec.axis."""
    check_float_tensor(x, name)
    x = x.detach()
    if spec.axis is None:
        return x.reshape(1, -1)
    axis = normalize_axis(spec.axis, x.ndim, "spec.axis")
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 widened to float32; float32/float64 as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _result(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec):
    """Per-row ranges as float32, 0-d for a per-tensor spec."""
    lo, hi = lo.to(torch.float32), hi.to(torch.float32)
    if spec.axis is None:
        return lo.reshape(()), hi.reshape(())
    return lo.reshape(-1), hi.reshape(-1)


def _check_real(value, name: str, low=None, high=None, low_open=False) -> float:
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


# --------------------------------------------------------------------------------------------
# Min-max and its running average
# --------------------------------------------------------------------------------------------
def minmax(x: torch.Tensor, spec: QuantSpec):
    """The range [min x, max x] that clips nothing (white paper §3.1, "Min-max").

    x: floating tensor (float16/bfloat16/float32/float64), any shape.
    Returns (xmin, xmax) float32, 0-d, or 1-d with one value per slice along ``spec.axis``.
    """
    _check_spec(spec)
    lo, hi = torch.aminmax(_wide(_rows(x, spec)), dim=1)
    return _result(lo, hi, spec)


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
    _check_spec(spec)
    c = _check_real(averaging_constant, "averaging_constant", 0.0, 1.0, low_open=True)
    # the observers cast the batch to float32 before reducing; rounding is monotone, so
    # reducing first and casting after gives the same values
    lo, hi = torch.aminmax(_rows(x, spec), dim=1)
    lo, hi = _result(lo, hi, spec)
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


# --------------------------------------------------------------------------------------------
# Percentile
# --------------------------------------------------------------------------------------------
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

    Symmetric spec: [-t, t] with t the q-th percentile of |x|. Asymmetric spec: the (100 - q)-th
    and q-th percentiles of x (q >= 50). Percentiles interpolate linearly between order
    statistics, as ``numpy.percentile`` (method="linear"), exactly and for tensors of any size.

    x: floating tensor.  q: in (0, 100]; 100 gives min-max.
    Returns (xmin, xmax) float32, 0-d or 1-d (per slice along ``spec.axis``).
    """
    _check_spec(spec)
    q = _check_real(q, "q", 0.0, 100.0, low_open=True)
    if not spec.symmetric and q < 50.0:
        raise ValueError(f"q must be >= 50 for an asymmetric spec (the range is the (100-q)-th to "
                         f"the q-th percentile), got {q}")
    v = _wide(_rows(x, spec))
    if spec.symmetric:
        t = _quantile(v.abs(), q)
        return _result(-t, t, spec)
    return _result(_quantile(v, 100.0 - q), _quantile(v, q), spec)


# --------------------------------------------------------------------------------------------
# The error of a uniform quantizer as a function of its scale (for mse and cross_entropy)
# --------------------------------------------------------------------------------------------
# For a zero point z the quantizer is x_hat = s * clamp(round(x / s), qmin - z, qmax - z): a value
# of magnitude a = |x| gets the code magnitude m(s) = min(round(a / s), cap), with cap = qmax - z
# for x > 0 and z - qmin for x < 0. m(s) is piecewise constant in s, stepping by one at the
# "kinks" s = a / (k + 1/2); between kinks every code is fixed, so the squared error
# sum (a - s m)^2 is a quadratic in s and a softmax cross-entropy is a smooth convex function of s.
# At a kink the squared error of that value is continuous with a local maximum, so the minimum of
# the MSE lies at the vertex of one of the quadratic pieces: visiting every piece in order of s
# finds it exactly ("sweep").

def _code_magnitudes(a: torch.Tensor, s, cap: torch.Tensor) -> torch.Tensor:
    # floor(v + 1/2): ties (exact half steps) form a set of measure zero and are not special-cased
    return torch.minimum(torch.floor(a / s + 0.5), cap)


def _sides(X: torch.Tensor):
    """Magnitudes of the nonzero values of X (C, n), their row, and which are positive."""
    nz = X != 0
    rows = torch.arange(X.shape[0], device=X.device).unsqueeze(1).expand_as(X)[nz]
    x = X[nz]
    return x.abs(), rows, x > 0


def _caps(positive: torch.Tensor, zp: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Largest code magnitude of each value for zero point(s) zp (float64)."""
    return torch.where(positive, spec.qmax - zp, zp - spec.qmin).to(torch.float64)


def _zero_points(spec: QuantSpec):
    if spec.symmetric:
        return [spec.symmetric_zero_point]
    return list(range(spec.qmin, spec.qmax + 1))


def _cover_scale(X: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per row, the scale above which a larger range only adds rounding error: the scale of the
    min-max range (asymmetric), or the smallest one that clips nothing (symmetric)."""
    zero = torch.zeros((), dtype=X.dtype, device=X.device)
    hi = torch.maximum(X.amax(dim=1), zero)
    lo = torch.minimum(X.amin(dim=1), zero)
    if not spec.symmetric:
        return (hi - lo) / (spec.qmax - spec.qmin)
    z = spec.symmetric_zero_point
    pos, neg = spec.qmax - z, z - spec.qmin
    s = hi / max(pos, 1) if pos > 0 else zero.expand_as(hi)
    s_neg = -lo / max(neg, 1) if neg > 0 else zero.expand_as(lo)
    # the symmetric range [-t, t] of qparams has scale t / ((qmax - qmin) / 2): cover t = max|x| too
    t = torch.maximum(hi, -lo) / ((spec.qmax - spec.qmin) / 2)
    return torch.maximum(torch.maximum(s, s_neg), t)


def _kink_count(a, cap, s_lo, s_hi) -> torch.Tensor:
    """Number of kinks of each value in [s_lo, s_hi] (per value, float64)."""
    return _code_magnitudes(a, s_lo, cap) - _code_magnitudes(a, s_hi, cap)


def _sorted_kinks(a, cap, task, s_lo, s_hi):
    """All kinks inside each value's task range, sorted by task and then by decreasing s.

    Returns the codes at each task's s_hi (per value), then per kink: its s, task, the value's
    magnitude a and the code magnitude m it leaves (the code becomes m + 1 below the kink).
    """
    m_hi = _code_magnitudes(a, s_hi[task], cap)
    counts = (_code_magnitudes(a, s_lo[task], cap) - m_hi).to(torch.int64)
    owner = torch.repeat_interleave(torch.arange(a.numel(), device=a.device), counts)
    first = torch.cumsum(counts, 0) - counts
    m = m_hi[owner] + (torch.arange(owner.numel(), device=a.device) - first[owner])
    s = a[owner] / (m + 0.5)
    t = task[owner]
    order = torch.sort(s, descending=True, stable=True).indices
    order = order[torch.sort(t[order], stable=True).indices]
    return m_hi, s[order], t[order], a[owner][order], m[order]


def _segment_argmin(values: torch.Tensor, segment: torch.Tensor, num: int):
    """Per segment, the smallest value and the first index that attains it."""
    best = torch.full((num,), math.inf, dtype=values.dtype, device=values.device)
    best = best.scatter_reduce(0, segment, values, "amin")
    idx = torch.arange(values.numel(), device=values.device)
    idx = torch.where(values == best[segment], idx, values.numel())
    first = torch.full((num,), values.numel(), dtype=torch.int64, device=values.device)
    return best, first.scatter_reduce(0, segment, idx, "amin")


def _sweep_mse(a, cap, task, s_lo, s_hi):
    """Exact minimum over s in [s_lo[t], s_hi[t]] of L_t(s) = sum over the values of task t of
    (a - s * min(round(a / s), cap))^2, for every task t at once.

    The sums are kept relative to the reference scale r = s_hi of each task, D = a - r m, so
    that L(s) = sum D^2 + 2 (r - s) sum D m + (r - s)^2 sum m^2 involves numbers of the size of
    the error itself (sum a^2 - 2 s sum a m + s^2 sum m^2 would cancel catastrophically at
    many bits).
    a, cap: (E,) float64 magnitudes and code caps; task: (E,) int64; s_lo, s_hi: (T,) float64.
    Returns (s, loss), (T,) float64 each.
    """
    num = s_lo.numel()
    m_hi, s_k, t_k, a_k, m_k = _sorted_kinks(a, cap, task, s_lo, s_hi)
    ref = s_hi[task]
    d = a - ref * m_hi
    zeros = torch.zeros(num, dtype=torch.float64, device=a.device)
    s_dd = zeros.index_add(0, task, d * d)
    s_dm = zeros.index_add(0, task, d * m_hi)
    s_mm = zeros.index_add(0, task, m_hi * m_hi)
    # below a kink the code grows from m to m + 1 and D = a - r m drops by r
    r_k = s_hi[t_k]
    grow = 2 * m_k + 1
    deltas = torch.stack([r_k * (r_k * grow - 2 * a_k), a_k - r_k * grow, grow], 1)
    cum = torch.cumsum(deltas, 0)
    per_task = torch.bincount(t_k, minlength=num)
    before = torch.cumsum(per_task, 0) - per_task
    base = torch.cat([torch.zeros(1, 3, dtype=torch.float64, device=a.device), cum])[before]
    stats = torch.stack([s_dd, s_dm, s_mm], 1)
    after = stats[t_k] + cum - base[t_k]
    # piece below kink k reaches down to the next kink of the task, or to s_lo after its last one
    last = torch.ones_like(t_k, dtype=torch.bool)
    if t_k.numel() > 1:
        last[:-1] = t_k[1:] != t_k[:-1]
    below = torch.where(last, s_lo[t_k], torch.roll(s_k, -1))
    # the piece above the first kink of each task (or the whole range when it has none)
    top_low = s_lo.clone()
    has = per_task > 0
    top_low[has] = s_k[before[has]]
    lo = torch.cat([top_low, below])
    hi = torch.cat([s_hi, s_k])
    dd, dm, mm = torch.cat([stats, after]).unbind(1)
    seg = torch.cat([torch.arange(num, device=a.device), t_k])
    ref = s_hi[seg]
    vertex = torch.where(mm > 0, ref + dm / mm.clamp(min=1), hi)
    s_best = torch.minimum(torch.maximum(vertex, lo), hi)
    delta = ref - s_best
    loss = dd + 2 * delta * dm + delta * delta * mm
    best, idx = _segment_argmin(loss, seg, num)
    return s_best[idx], best


def _expand_tasks(t_row, t_zp, row_start, row_len, mag, positive, spec):
    """The values of each task (its row's nonzero values) with their caps for the task's zero
    point: (a, cap, local task index), all (E,)."""
    device = mag.device
    lens = row_len[t_row]
    owner = torch.repeat_interleave(torch.arange(t_row.numel(), device=device), lens)
    offset = torch.cumsum(lens, 0) - lens
    elem = row_start[t_row][owner] + (torch.arange(owner.numel(), device=device) - offset[owner])
    return mag[elem], _caps(positive[elem], t_zp[owner], spec), owner


def _solve_tasks(t_row, t_zp, t_lo, t_hi, data, spec):
    """Exact minima of the squared error over s in [t_lo, t_hi] for tasks (row, zero point):
    one sweep when the tasks' values and kinks fit the budget, otherwise the tasks are halved,
    and a single oversized task has its range cut at the middle in 1/s (where each value's kinks
    are evenly spaced). Returns (s, loss), (T,) float64 each."""
    a, cap, owner = _expand_tasks(t_row, t_zp, *data, spec)
    size = float(_kink_count(a, cap, t_lo[owner], t_hi[owner]).sum()) + a.numel()
    if size <= 2 * _KINK_BUDGET:
        return _sweep_mse(a, cap, owner, t_lo, t_hi)
    if t_row.numel() > 1:
        h = t_row.numel() // 2
        parts = [_solve_tasks(t_row[sl], t_zp[sl], t_lo[sl], t_hi[sl], data, spec)
                 for sl in (slice(0, h), slice(h, None))]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    # below min a / (cap + 1/2) every code is saturated: no kinks to split there
    floor = float((a / (cap + 0.5)).min()) * 0.999
    lo, hi = float(t_lo[0]), float(t_hi[0])
    mid = 2.0 / (1.0 / hi + 1.0 / max(lo, floor)) if max(lo, floor) > 0 else 0.5 * hi
    if not lo < mid < hi:
        mid = 0.5 * (lo + hi)
    halves = [_solve_tasks(t_row, t_zp, torch.full_like(t_lo, a_), torch.full_like(t_hi, b_), data, spec)
              for a_, b_ in ((lo, mid), (mid, hi))]
    k = 0 if float(halves[0][1][0]) <= float(halves[1][1][0]) else 1
    return halves[k]


def _run_mse_tasks(t_row, t_zp, t_lo, t_hi, data, spec):
    """_solve_tasks over batches of tasks holding at most ~_KINK_BUDGET values each."""
    row_len = data[1]
    s_out, l_out = [], []
    lens = row_len[t_row].tolist()
    start = 0
    while start < len(lens):
        stop, held = start, 0
        while stop < len(lens) and (stop == start or held + lens[stop] <= _KINK_BUDGET):
            held += lens[stop]
            stop += 1
        sl = slice(start, stop)
        s, loss = _solve_tasks(t_row[sl], t_zp[sl], t_lo[sl], t_hi[sl], data, spec)
        s_out.append(s)
        l_out.append(loss)
        start = stop
    return torch.cat(s_out), torch.cat(l_out)


def _grid_mse(X, s_grid, spec):
    """Squared error of every row of X (C, n) at every grid scale s_grid (C, G) for every zero
    point: (C, zps, G).

    For one scale the rounded codes r = round(a / s) of the magnitudes a do not depend on the
    zero point, which only sets each side's cap: a value is clipped when a >= s (cap + 1/2).
    With each side's magnitudes sorted, prefix sums of the unclipped error and of a and a^2 give
    every cap at once: error = sum_{unclipped} (a - s r)^2 + sum_{clipped} (a - s cap)^2.
    """
    zps = torch.tensor(_zero_points(spec), dtype=torch.int64, device=X.device)
    num_rows, n = X.shape
    num_grid = s_grid.shape[1]
    out = torch.zeros(num_rows, zps.numel(), num_grid, dtype=torch.float64, device=X.device)
    for sign, caps in ((1.0, spec.qmax - zps), (-1.0, zps - spec.qmin)):
        v = sign * X
        inside_side = v > 0
        count = inside_side.sum(1, keepdim=True)
        # this side's magnitudes first, ascending; the other values (set to +inf) after them
        A = torch.where(inside_side, v, math.inf).sort(dim=1).values
        A0 = torch.where(torch.isfinite(A), A, 0.0)
        pad = torch.zeros(num_rows, 1, dtype=X.dtype, device=X.device)
        cum_a = torch.cat([pad, torch.cumsum(A0, 1)], 1)
        cum_a2 = torch.cat([pad, torch.cumsum(A0 * A0, 1)], 1)
        c = caps.to(torch.float64).view(1, -1, 1)
        step = max(1, _EVAL_BUDGET // max(num_rows * n, 1))
        for j0 in range(0, num_grid, step):
            s = s_grid[:, j0:j0 + step].unsqueeze(1)                            # (C, 1, g)
            g = s.shape[2]
            r = torch.floor(A0.unsqueeze(2) / s + 0.5)
            cum_err = torch.cumsum((A0.unsqueeze(2) - s * r) ** 2, 1)
            cum_err = torch.cat([torch.zeros_like(cum_err[:, :1]), cum_err], 1)   # (C, n + 1, g)
            thr = (s * (c + 0.5)).reshape(num_rows, -1)                         # (C, Z * g)
            k = torch.minimum(torch.searchsorted(A, thr.contiguous()), count).reshape(num_rows, -1, g)
            flat = k.reshape(num_rows, -1)
            inside = cum_err.gather(1, k)
            n_out = (count.unsqueeze(2) - k).to(torch.float64)
            a_out = (cum_a[:, -1:] - cum_a.gather(1, flat)).reshape(k.shape)
            a2_out = (cum_a2[:, -1:] - cum_a2.gather(1, flat)).reshape(k.shape)
            sc = s * c
            out[:, :, j0:j0 + g] += inside + a2_out - 2 * sc * a_out + sc * sc * n_out
    return out


def _near_optimal_tasks(loss, s_grid, top, tol, max_zero_points=_MAX_ZERO_POINTS):
    """Tasks (row, zero point index, s_lo, s_hi) covering every grid cell whose loss is within
    a relative ``tol`` of its row's best, widened by one grid step on each side (the minimum can
    lie between grid points) and, along the zero point, by one neighbour on each side; at most
    ``max_zero_points`` zero points per row, those with the lowest grid loss (then the nearest to
    the best cell's).
    loss: (R, Z, G); s_grid: (R, G); top, tol: (R,). Returns four (T,) tensors."""
    num_rows, num_zp, num_grid = loss.shape
    best = loss.amin(dim=(1, 2), keepdim=True)
    ok = loss <= best + tol.view(-1, 1, 1) * best.abs() + 1e-300
    span = ok.clone()
    span[:, 1:] |= ok[:, :-1]
    span[:, :-1] |= ok[:, 1:]
    # a zero point added as a neighbour is searched over its neighbours' scales
    cols = ok.any(1, keepdim=True)
    span = span & (cols | ok)
    chosen = span.any(2)
    if num_zp > max_zero_points:
        zi = torch.arange(num_zp, device=loss.device)
        best_zp = torch.argmin(loss.amin(2), dim=1, keepdim=True)
        by_distance = torch.sort((zi - best_zp).abs(), dim=1, stable=True).indices
        score = torch.where(chosen, loss.amin(2), math.inf).gather(1, by_distance)
        ranked = by_distance.gather(1, torch.sort(score, dim=1, stable=True).indices)
        keep = torch.zeros_like(chosen)
        keep.scatter_(1, ranked[:, :max_zero_points], True)
        chosen &= keep
    idx = torch.arange(num_grid, device=loss.device)
    first = torch.where(span, idx, num_grid).amin(2) - 1
    last = torch.where(span, idx, -1).amax(2) + 1
    r, z = torch.nonzero(chosen, as_tuple=True)
    j0, j1 = first[r, z], last[r, z]
    lo = torch.where(j0 >= 0, s_grid[r, j0.clamp(min=0)], torch.zeros_like(top[r]))
    hi = torch.where(j1 < num_grid, s_grid[r, j1.clamp(max=num_grid - 1)], top[r])
    return r, z, lo, hi


def _relative_tolerance(count: torch.Tensor) -> torch.Tensor:
    # The error is a smooth trend plus the fluctuation of the rounding errors, a sum of n bounded
    # terms of relative size ~1/sqrt(n) (measured: a grid cell next to the exact optimum lies up
    # to ~3/sqrt(n) above the best grid value); cells further above cannot hide a better minimum.
    return 6.0 / sqrt(count.clamp(min=1).to(torch.float64)) + 1e-3


def _mse_search(X: torch.Tensor, spec: QuantSpec):
    """Scale and zero point minimising the squared error of every row of X (C, n) float64.
    Returns (s, zp), (C,) each; s = 0 for an all-zero row."""
    device = X.device
    num_rows = X.shape[0]
    zps = torch.tensor(_zero_points(spec), dtype=torch.int64, device=device)
    mag, rows, positive = _sides(X)
    row_len = torch.bincount(rows, minlength=num_rows)
    row_start = torch.cumsum(row_len, 0) - row_len
    data = (row_start, row_len, mag, positive)
    top = _cover_scale(X, spec) * 1.02
    live = torch.nonzero(top > 0).flatten()
    n_pos = torch.bincount(rows[positive], minlength=num_rows).to(torch.float64)
    n_neg = row_len.to(torch.float64) - n_pos
    full = (n_pos[live].unsqueeze(1) * (spec.qmax - zps) + n_neg[live].unsqueeze(1) * (zps - spec.qmin)).sum()
    if float(full) <= _FULL_SEARCH_KINKS:
        # few enough pieces: every zero point over the whole range of scales
        t_row = live.repeat_interleave(zps.numel())
        t_zp = zps.repeat(live.numel())
        t_lo = torch.zeros(t_row.numel(), dtype=torch.float64, device=device)
        t_hi = top[t_row]
    else:
        s_grid = top.unsqueeze(1) * _GRID.to(device).unsqueeze(0)
        loss = _grid_mse(X, s_grid, spec)
        r, zi, t_lo, t_hi = _near_optimal_tasks(loss, s_grid, top, _relative_tolerance(row_len))
        keep = top[r] > 0
        t_row, t_zp, t_lo, t_hi = r[keep], zps[zi[keep]], t_lo[keep], t_hi[keep]
    s_best = torch.zeros(num_rows, dtype=torch.float64, device=device)
    zp_best = torch.full((num_rows,), int(zps[0]) if spec.symmetric else 0, dtype=torch.int64, device=device)
    if t_row.numel():
        s, loss = _run_mse_tasks(t_row, t_zp, t_lo, t_hi, data, spec)
        _, idx = _segment_argmin(loss, t_row, num_rows)
        found = idx < loss.numel()
        s_best[found] = s[idx[found]]
        zp_best[found] = t_zp[idx[found]]
    return s_best, zp_best


def _ranges_from(s: torch.Tensor, zp: torch.Tensor, spec: QuantSpec):
    """(xmin, xmax) that ``qparams`` maps back to scale s and zero point zp (float64 tensors)."""
    if spec.symmetric:
        t = s * ((spec.qmax - spec.qmin) / 2)
        return -t, t
    return (spec.qmin - zp) * s, (spec.qmax - zp) * s


def _polish(s, zp, spec, loss_fn, batch_elements: int = 0):
    """Pick, among float32 ranges within a few ulps of scale s, the one whose actual quantizer
    (qparams + fake_quant) has the lowest loss: the search works with exact real scales, the
    quantizer with float32 ones. loss_fn(lo, hi) -> per-row loss for float32 ranges (C,).

    batch_elements > 0: loss_fn takes (K, C) ranges and returns (K, C) losses, and is called on
    as many candidates at once as keep K * batch_elements under ~4M values (one call instead of
    33 small ones; the same values, chosen in the same order)."""
    factors = [1 + k * 2.0 ** -23 for k in range(-16, 17)]
    if batch_elements > 0:
        chunk = max(1, (1 << 22) // batch_elements)
        cands = []
        for i in range(0, len(factors), chunk):
            f = torch.tensor(factors[i:i + chunk], dtype=s.dtype, device=s.device).unsqueeze(1)
            lo, hi = _ranges_from(s.unsqueeze(0) * f, zp.unsqueeze(0), spec)
            lo, hi = lo.to(torch.float32), hi.to(torch.float32)
            value = loss_fn(lo, hi)
            cands += [(lo[j], hi[j], value[j]) for j in range(len(f))]
    else:
        cands = []
        for f in factors:
            lo, hi = _ranges_from(s * f, zp, spec)
            lo, hi = lo.to(torch.float32), hi.to(torch.float32)
            cands.append((lo, hi, loss_fn(lo, hi)))
    best_lo, best_hi, best = cands[0]
    for lo, hi, value in cands[1:]:
        better = value < best
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
        best = torch.where(better, value, best)
    return best_lo, best_hi


def _row_spec(spec: QuantSpec) -> QuantSpec:
    return spec.per_channel(0)


def mse(x: torch.Tensor, spec: QuantSpec):
    """The range minimising the squared quantization error ||x - fake_quant(x)||^2 (white paper
    §3.1, "Mean squared error (MSE)").

    Symmetric spec: over the clipping threshold t of [-t, t] (one scale, zero point fixed).
    Asymmetric spec: over (xmin, xmax), i.e. over the integer zero point and the scale. For a
    fixed zero point the error is piecewise quadratic in the scale: every piece is visited in
    order of the scale and the best vertex kept, an exact minimum. When there are too many
    pieces for that (more than ~2M: e.g. beyond ~16k values at 8 bits), a grid of 60 scales per
    zero point first keeps the near-optimal scales and zero points; its margin, 6/sqrt(n), is
    twice the largest gap measured between the exact optimum and the grid. For grids of more
    than 256 levels at most 64 zero points per row are searched (the many near-equivalent ones
    differ only in what they clip). A final step picks, among float32 ranges within a few ulps of
    the optimum, the one that ``qparams`` + ``fake_quant`` quantize best. Rows (channels) are
    searched together. Cost: ~1 s for 300k values at 8 bits on a laptop-class CPU core.

    x: floating tensor (computed in float64).
    Returns (xmin, xmax) float32, 0-d or 1-d (per slice along ``spec.axis``); all-zero input
    gives (0, 0).
    """
    _check_spec(spec)
    X = _rows(x, spec).to(torch.float64)
    s, zp = _mse_search(X, spec)
    s, zp = s.to(X.device), zp.to(X.device)
    rspec = _row_spec(spec)

    def loss_fn(lo, hi):
        # (K, C) candidate ranges: the rows of X repeated once per candidate
        k, c = lo.shape
        scale, z = qparams(lo.reshape(-1), hi.reshape(-1), rspec)
        Xk = X.unsqueeze(0).expand(k, *X.shape).reshape(k * c, X.shape[1])
        return ((fake_quant(Xk, scale, z, rspec) - Xk) ** 2).sum(dim=1).reshape(k, c)

    lo, hi = _polish(s, zp, spec, loss_fn, batch_elements=X.numel())
    return _result(lo, hi, spec)


# --------------------------------------------------------------------------------------------
# Cross-entropy of the softmax
# --------------------------------------------------------------------------------------------
def _softmax_ce(P: torch.Tensor, codes: torch.Tensor, s: torch.Tensor):
    """Mean over rows of H(P, softmax(s * codes)) and its first two derivatives in s.

    P: (R, K) target probabilities; codes: (B, R, K); s: (B,).
    Returns (value, d/ds, d2/ds2), each (B,).
    """
    zq = s.view(-1, 1, 1) * codes
    lse = torch.logsumexp(zq, dim=2)
    q = torch.softmax(zq, dim=2)
    ec = (q * codes).sum(2)
    a = (P.unsqueeze(0) * codes).sum(2)
    value = (lse - s.view(-1, 1) * a).mean(1)
    d1 = (ec - a).mean(1)
    d2 = ((q * codes * codes).sum(2) - ec * ec).mean(1)
    return value, d1, d2


def _ce_codes(Z: torch.Tensor, s: torch.Tensor, zp: int, spec: QuantSpec) -> torch.Tensor:
    """Integer codes (minus the zero point) of logits Z (R, K) at scales s (B,): (B, R, K)."""
    v = torch.floor(Z.unsqueeze(0) / s.view(-1, 1, 1) + 0.5)
    return torch.clamp(v, spec.qmin - zp, spec.qmax - zp)


def _ce_batches(num: int, per_item: int):
    step = max(1, _EVAL_BUDGET // max(per_item, 1))
    return [slice(i, min(i + step, num)) for i in range(0, num, step)]


def _ce_at(Z, P, s: torch.Tensor, zp: int, spec) -> torch.Tensor:
    """Cross-entropy at scales s (B,), zero point zp: (B,)."""
    out = []
    for b in _ce_batches(s.numel(), Z.numel()):
        codes = _ce_codes(Z, s[b], zp, spec)
        out.append(_softmax_ce(P, codes, s[b])[0])
    return torch.cat(out)


def _ce_pieces(Z, P, zp, spec, lo, hi):
    """Minimum of the cross-entropy over s in [lo, hi] for zero point zp, visiting every piece
    between kinks (codes fixed, the cross-entropy convex in s). Returns (s, value) floats."""
    a = Z.abs().flatten()
    pos = Z.flatten() > 0
    keep = a > 0
    a, pos = a[keep], pos[keep]
    zp_t = torch.tensor(zp, device=Z.device)
    cap = _caps(pos, zp_t, spec)
    task = torch.zeros(a.numel(), dtype=torch.int64, device=Z.device)
    lo_t = torch.tensor([lo], dtype=torch.float64, device=Z.device)
    hi_t = torch.tensor([hi], dtype=torch.float64, device=Z.device)
    _, s_k, _, _, _ = _sorted_kinks(a, cap, task, lo_t, hi_t)
    s_k = torch.unique(s_k)                     # ascending
    edges = torch.cat([lo_t, s_k[(s_k > lo) & (s_k < hi)], hi_t])
    p_lo, p_hi = edges[:-1], edges[1:]
    wide = p_hi > p_lo
    p_lo, p_hi = p_lo[wide], p_hi[wide]
    best_s, best_v = None, math.inf
    for b in _ce_batches(p_lo.numel(), 3 * Z.numel()):
        l, h = p_lo[b], p_hi[b]
        mid = 0.5 * (l + h)
        mid = torch.where(mid > 0, mid, h)
        codes = _ce_codes(Z, mid, zp, spec)
        f_l, g_l, _ = _softmax_ce(P, codes, l)
        f_h, g_h, _ = _softmax_ce(P, codes, h)
        # convex on the piece: the minimum is at an end unless the slope changes sign inside
        s_star = torch.where(f_l <= f_h, l, h)
        v_star = torch.minimum(f_l, f_h)
        inner = (g_l < 0) & (g_h > 0)
        if bool(inner.any()):
            il, ih, c = l[inner], h[inner], codes[inner]
            s = 0.5 * (il + ih)
            for _ in range(60):                 # safeguarded Newton on the slope
                _, g, g2 = _softmax_ce(P, c, s)
                il = torch.where(g < 0, s, il)
                ih = torch.where(g > 0, s, ih)
                step = s - g / torch.where(g2 > 0, g2, torch.ones_like(g2))
                bisect = 0.5 * (il + ih)
                s_new = torch.where((step > il) & (step < ih) & (g2 > 0), step, bisect)
                done = bool(((s_new - s).abs() <= 1e-15 * s.abs()).all())
                s = s_new
                if done:
                    break
            f_s = _softmax_ce(P, c, s)[0]
            take = f_s < v_star[inner]
            v_star[inner] = torch.where(take, f_s, v_star[inner])
            s_star[inner] = torch.where(take, s, s_star[inner])
        # an end of a piece is a limit of that piece's codes: step just inside it
        s_star = torch.minimum(torch.maximum(s_star, l + 1e-3 * (h - l)), h - 1e-3 * (h - l))
        i = int(torch.argmin(v_star))
        if float(v_star[i]) < best_v:
            best_v, best_s = float(v_star[i]), float(s_star[i])
    return best_s, best_v


def _ce_search(Z: torch.Tensor, spec: QuantSpec):
    """Scale and zero point minimising the softmax cross-entropy for logits Z (R, K) float64."""
    P = torch.softmax(Z, dim=1)
    zps = _zero_points(spec)
    top = float(_cover_scale(Z.reshape(1, -1), spec)[0]) * 1.02
    if top == 0.0:
        return 0.0, zps[len(zps) // 2] if spec.symmetric else 0
    H = float(-(P * torch.log_softmax(Z, dim=1)).sum(1).mean())
    grid = (top * _GRID).to(Z.device)
    # coarse look at every zero point (or every stride-th, for large inputs at many bits)
    stride = max(1, math.ceil(len(zps) * grid.numel() * Z.numel() / (64 * _EVAL_BUDGET)))
    coarse = {zp: _ce_at(Z, P, grid, zp, spec) - H for zp in zps[::stride]}
    if stride > 1:
        best = min(float(v.min()) for v in coarse.values())
        near = [zp for zp, v in coarse.items() if float(v.min()) <= best * 1.25]
        for zp in zps:
            if zp not in coarse and any(abs(zp - n) < stride for n in near):
                coarse[zp] = _ce_at(Z, P, grid, zp, spec) - H
    keys = sorted(coarse)
    kl_grid = torch.stack([coarse[k] for k in keys]).unsqueeze(0)
    if float(kl_grid.min()) <= 1e-15:
        # KL >= 0: a grid point already leaves the softmax unchanged (e.g. constant rows)
        z, j = divmod(int(torch.argmin(kl_grid[0])), grid.numel())
        return float(grid[j]), keys[z]
    tol = _relative_tolerance(torch.tensor([Z.numel()], device=Z.device))
    top_t = torch.tensor([top], dtype=torch.float64, device=Z.device)
    _, zi, t_lo, t_hi = _near_optimal_tasks(kl_grid, grid.unsqueeze(0), top_t, tol)
    best_s, best_zp, best_v = top, keys[0], math.inf
    for z, lo, hi in zip(zi.tolist(), t_lo.tolist(), t_hi.tolist()):
        s, v = _ce_pieces(Z, P, keys[z], spec, lo, hi)
        if s is not None and v < best_v:
            best_s, best_zp, best_v = s, keys[z], v
    return best_s, best_zp


def cross_entropy(logits: torch.Tensor, spec: QuantSpec, class_axis: int = -1):
    """The range minimising the cross-entropy H(softmax(logits), softmax(fake_quant(logits)))
    for a classifier's last layer (white paper §3.1, "Cross entropy").

    Averaged over all softmax rows. For a fixed zero point the quantized logits are s * codes
    with codes piecewise constant in the scale s, so the cross-entropy is a convex function of s
    on each piece between the kinks where a code changes (and jumps at the kinks). A grid picks
    the near-optimal scales and zero points (margin ~1/sqrt(n) for the rounding's fluctuation);
    inside them every piece is minimised exactly (safeguarded Newton on the slope). Then, as in
    ``mse``, the float32 range is chosen among a few ulps around the optimum.

    Each piece costs one pass over the logits: meant for a last layer's logits on a calibration
    batch (up to ~1e5 values), not for large tensors.

    logits: floating tensor (computed in float64) with classes along ``class_axis``.
    spec.axis: None, or another axis than ``class_axis`` (the slices are then separate problems;
    a range per class would couple all classes through the softmax).
    Returns (xmin, xmax) float32, 0-d or 1-d (per slice along ``spec.axis``).
    """
    _check_spec(spec)
    check_float_tensor(logits, "logits")
    if logits.ndim < 1:
        raise ValueError("logits must have a class axis (at least 1 dimension)")
    c_axis = normalize_axis(class_axis, logits.ndim, "class_axis")
    L = logits.detach().to(torch.float64).movedim(c_axis, -1)
    if spec.axis is not None:
        axis = normalize_axis(spec.axis, logits.ndim, "spec.axis")
        if axis == c_axis:
            raise ValueError("spec.axis must differ from class_axis: per-class ranges are coupled "
                             "through the softmax and are not a separable search")
        axis = axis if axis < c_axis else axis - 1
        L = L.movedim(axis, 0)
        groups = L.reshape(L.shape[0], -1, L.shape[-1])
    else:
        groups = L.reshape(1, -1, L.shape[-1])
    s = torch.zeros(groups.shape[0], dtype=torch.float64, device=L.device)
    zp = torch.zeros(groups.shape[0], dtype=torch.int64, device=L.device)
    for c in range(groups.shape[0]):
        s_c, zp_c = _ce_search(groups[c], spec)
        s[c], zp[c] = s_c, zp_c
    rspec = _row_spec(spec)
    P = torch.softmax(groups, dim=-1)

    def loss_fn(lo, hi):
        scale, z = qparams(lo, hi, rspec)
        xq = fake_quant(groups, scale, z, rspec)
        return -(P * torch.log_softmax(xq, dim=-1)).sum(-1).mean(-1)

    lo, hi = _polish(s, zp, spec, loss_fn)
    return _result(lo, hi, spec)


# --------------------------------------------------------------------------------------------
# KL divergence ("entropy") calibration
# --------------------------------------------------------------------------------------------
def _xlogx(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v > 0, v * torch.log(torch.where(v > 0, v, torch.ones_like(v))), torch.zeros_like(v))


def _tensorrt_kl(hist: torch.Tensor, num_quantized_bins: int) -> torch.Tensor:
    """KL(P || Q) of Migacz's entropy calibration for every candidate bin count i (rows of hist).

    hist: (C, B) float64 counts of |x| in B equal bins. Candidate i keeps bins [0, i),
    nqb <= i <= B. P: those bins, with the counts beyond folded into bin i - 1. Q: bins [0, i)
    merged into nqb groups (bin j into group floor(j * nqb / i)), each group's count spread
    evenly over the bins of the group where P is non-zero. KL(P || Q) with 0 log 0 = 0, inf
    where P > 0 and Q = 0. All candidates at once from prefix sums.
    Returns (C, B - nqb + 1) float64.
    """
    C, B = hist.shape
    dev = hist.device
    nqb = num_quantized_bins
    pad = torch.zeros(C, 1, dtype=torch.float64, device=dev)
    H = torch.cat([pad, torch.cumsum(hist, 1)], 1)                        # H[:, j] = sum h[:j]
    Znz = torch.cat([pad, torch.cumsum((hist > 0).to(torch.float64), 1)], 1)
    HL = torch.cat([pad, torch.cumsum(_xlogx(hist), 1)], 1)
    N = H[:, -1:]
    i = torch.arange(nqb, B + 1, device=dev)                                # candidates
    g = torch.arange(nqb + 1, device=dev)
    bounds = (g.unsqueeze(0) * i.unsqueeze(1) + nqb - 1) // nqb               # ceil(g * i / nqb)
    out_count = N - H[:, i]                                                   # beyond bin i - 1
    last_h = hist[:, i - 1]
    last_p = last_h + out_count
    b0, b1 = bounds[:, :-1], bounds[:, 1:]
    group_h = H[:, b1] - H[:, b0]                                             # (C, cand, nqb)
    group_nz = Znz[:, b1] - Znz[:, b0]
    # bin i - 1 (in the last group) is non-zero in P also when only outliers fell there
    group_nz[:, :, -1] += (last_p > 0).to(torch.float64) - (last_h > 0).to(torch.float64)
    group_p = group_h.clone()
    group_p[:, :, -1] += out_count
    sum_plogp = HL[:, i - 1] + _xlogx(last_p)
    filled = (group_h > 0) & (group_nz > 0)
    safe = torch.where(filled, group_h / group_nz.clamp(min=1), torch.ones_like(group_h))
    cross = (group_p * torch.log(safe)).sum(2)
    S = H[:, i]                                                               # sum of Q's counts
    kl = (sum_plogp - cross) / N - torch.log(N) + torch.log(S.clamp(min=1))
    bad = ((group_p > 0) & (group_h == 0)).any(2) | (S == 0)
    return torch.where(bad, torch.full_like(kl, math.inf), kl)


def _abs_histogram(X: torch.Tensor, num_bins: int):
    """Row-wise histograms of |X| over [0, max|X|] in num_bins equal bins: (C, B) float64 counts
    and the rows' maxima (a value on an inner edge goes to the bin above it; max|X| to the last)."""
    A = X.abs()
    amax = A.amax(dim=1)
    width = (amax / num_bins).unsqueeze(1)
    idx = torch.floor(A / torch.where(width > 0, width, torch.ones_like(width)))
    idx = idx.clamp(0, num_bins - 1).to(torch.int64)
    idx = idx + torch.arange(X.shape[0], device=X.device).unsqueeze(1) * num_bins
    counts = torch.bincount(idx.flatten(), minlength=X.shape[0] * num_bins)
    return counts.reshape(X.shape[0], num_bins).to(torch.float64), amax


def kl(x: torch.Tensor, spec: QuantSpec, num_bins: int = 2048, num_quantized_bins: int | None = None,
       ignore_zeros: bool = False):
    """The clipping range minimising the KL divergence between the histogram of x and its
    quantized version: entropy calibration (Migacz 2017, "8-bit Inference with TensorRT").

    Symmetric spec, TensorRT's formulation: a histogram of |x| over [0, max|x|] in ``num_bins``
    bins; for every candidate threshold (bin edge i >= num_quantized_bins) the reference P is
    bins [0, i) with the outliers beyond added to its last bin, and Q merges those bins into
    ``num_quantized_bins`` levels, each level's count spread over its non-zero bins of P; the
    threshold with the smallest KL(P || Q) wins (the smallest on ties) and the range is [-t, t].
    Default num_quantized_bins: the codes on [0, t], qmax - zero_point + 1 (128 for int8).

    Asymmetric spec, onnxruntime's formulation (``HistogramCollector``, method "entropy"):
    the signed histogram of x over [-max|x|, max|x|] (numpy's, on float32 values, so that the
    bins are onnxruntime's), windows grown symmetrically around the zero bin, onnxruntime's
    KL (``entropy_threshold``), then clipped to [min x, max x]. Default num_quantized_bins: the
    grid's levels (256 for 8 bits; onnxruntime's own default is 128, i.e. 7 bits over [-t, t]).

    ignore_zeros: leave exact zeros out of the histogram. Post-ReLU activations are often half
    zeros; in the first bin they dominate P, and Q, which spreads each merged level evenly, can
    only match that spike when the bins are barely merged, so the search settles on a threshold
    near zero. NVIDIA's calibrators suppress that spike too; this option removes it exactly
    (the same as calibrating x[x != 0]; a row of zeros only still gives a zero range).

    x: floating tensor.  num_bins: >= 2 (>= num_quantized_bins).  Rows (``spec.axis``) are
    calibrated one by one. Returns (xmin, xmax) float32, 0-d or 1-d.
    """
    _check_spec(spec)
    check_int(num_bins, "num_bins", 2)
    if not isinstance(ignore_zeros, bool):
        raise TypeError(f"ignore_zeros must be a bool, got {ignore_zeros!r}")
    X = _wide(_rows(x, spec))
    if spec.symmetric:
        default = spec.qmax - spec.symmetric_zero_point + 1
    else:
        default = spec.num_levels
    if num_quantized_bins is None and default > num_bins:
        raise ValueError(f"num_bins must be >= {default}, the default num_quantized_bins for {spec}")
    nqb = default if num_quantized_bins is None else num_quantized_bins
    check_int(nqb, "num_quantized_bins", 1 if spec.symmetric else 2, num_bins)
    if spec.symmetric:
        hist, amax = _abs_histogram(X.to(torch.float64), num_bins)
        if ignore_zeros:                                  # zeros all land in bin 0
            hist[:, 0] -= (X == 0).sum(dim=1).to(torch.float64)
        idx = torch.argmin(_tensorrt_kl(hist, nqb), dim=1) + nqb               # first minimum
        t = amax * idx.to(torch.float64) / num_bins
        return _result(-t, t, spec)
    lows, highs = [], []
    for row in X.to(torch.float32).cpu().numpy():
        if ignore_zeros and (row != 0).any():
            row = row[row != 0]
        lo_v, hi_v = row.min(), row.max()
        t = np.array(max(abs(lo_v), abs(hi_v)), dtype=np.float32)
        hist, edges = np.histogram(row, num_bins, range=(-t, t))
        lo, hi = entropy_threshold(hist, edges, nqb)
        lows.append(max(float(lo), float(lo_v)))
        highs.append(min(float(hi), float(hi_v)))
    lo = torch.tensor(lows, dtype=torch.float64, device=X.device)
    hi = torch.tensor(highs, dtype=torch.float64, device=X.device)
    return _result(lo, hi, spec)


def _check_histogram(hist, edges):
    if not isinstance(hist, np.ndarray) or not isinstance(edges, np.ndarray):
        raise TypeError("hist and edges must be numpy arrays (as numpy.histogram returns)")
    if hist.ndim != 1 or edges.ndim != 1:
        raise ValueError(f"hist and edges must be 1-d, got shapes {hist.shape} and {edges.shape}")
    if hist.size < 2:
        raise ValueError(f"hist must have at least 2 bins, got {hist.size}")
    if edges.size != hist.size + 1:
        raise ValueError(f"edges must have len(hist) + 1 = {hist.size + 1} values, got {edges.size}")
    if hist.dtype.kind not in "iuf" or edges.dtype.kind != "f":
        raise TypeError(f"hist must hold numbers and edges floats, got {hist.dtype} and {edges.dtype}")
    if not np.all(np.isfinite(hist)) or np.any(hist < 0):
        raise ValueError("hist must hold finite, non-negative counts")
    if np.any(hist != np.floor(hist)):
        raise ValueError("hist must hold integer counts")
    if not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
        raise ValueError("edges must be finite and strictly increasing")
    counts = hist.astype(np.int64)
    if counts.sum() == 0:
        raise ValueError("hist has no counts")
    return counts


def _window_sum_phi(hist, lo, hi, e):
    """sum over bins j in [lo, hi) with hist[j] > 0 of (c - e) log(c - e), c = hist[j], for a
    per-window shift e in [0, 1): counts up to _EXACT_COUNTS exactly from per-count prefix sums,
    larger counts by the series (c - e) log(c - e) = c log c - e (1 + log c)
    + sum_{k>=2} e^k / (k (k - 1) c^(k-1))."""
    c = hist.astype(np.float64)

    def window(v):
        prefix = np.concatenate([[0.0], np.cumsum(v)])
        return prefix[hi] - prefix[lo]

    total = np.zeros(lo.shape)
    for value in range(1, _EXACT_COUNTS + 1):
        total += window(c == value) * (value - e) * np.log(value - e)
    big = c > _EXACT_COUNTS
    cb = np.where(big, c, 1.0)
    total += window(np.where(big, cb * np.log(cb), 0.0)) - e * window(np.where(big, 1 + np.log(cb), 0.0))
    # e / c < 1 / (_EXACT_COUNTS + 1): the terms fall geometrically, a few reach double precision
    ratio = float(e.max(initial=0.0)) / (_EXACT_COUNTS + 1)
    power = big.astype(np.float64)
    for k in range(2, 200):
        power = power / cb                                       # c^(1 - k) on the large counts
        total += e ** k / (k * (k - 1)) * window(power)
        if ratio ** k < 1e-18:
            break
    return total


def entropy_threshold(hist: np.ndarray, edges: np.ndarray, num_quantized_bins: int = 128):
    """The (low, high) threshold of onnxruntime's entropy calibration for a symmetric histogram,
    as ``onnxruntime.quantization.calibrate.HistogramCollector.get_entropy_threshold`` returns it
    before its final clip to the data's [min, max] (the caller applies that clip).

    onnxruntime's definition (after Migacz 2017), for a histogram of B bins over [-t, t], zero bin
    z = B // 2 and each i in [nqb // 2, z]: the window is bins [z - i, min(z + i + 1, B)) (2i + 1
    bins, so edges -i*w and (i + 1)*w: one bin more on the positive side); P is the window with
    the counts left and right of it added to its first and last bin; Q merges the window
    (without those outliers) into nqb groups of m = len // nqb bins, the remainder added to the
    last group's count but not spread back; each group's count is floor-divided by the number
    of non-zero bins of P in the group and given to all m bins of the group (zero bins of P too),
    the remainder bins get 0. Both are smoothed (a zero bin gets 1e-4, the non-zero bins lose the
    same total evenly), normalised, and KL(P || Q) = sum P log(P / Q); a window with m = 0 or an
    all-zero Q has KL = inf. The first window with the smallest KL wins; for a float16 histogram
    the KL values are rounded to float16 first, as onnxruntime stores them in the edges' dtype.

    Here every window is evaluated at once: the window and group sums, non-zero counts and
    sum c log c come from prefix sums; the smoothing shift e of the non-zero counts enters
    through sum (c - e) log(c - e), from per-count prefix sums and a series in e (e < 1). The
    divergences are computed in float64 (onnxruntime sums them in float32): when two windows'
    divergences differ by less than that float32 rounding (~1e-7; about 1 histogram in 300 of
    real data), onnxruntime's pick between them is decided by rounding and may differ.

    hist: 1-d non-negative integer counts (numpy); edges: its len(hist) + 1 bin edges.
    num_quantized_bins: nqb in [2, len(hist)].
    Returns (edges[z - i*], edges[min(z + i* + 1, B)]), numpy scalars of the edges' dtype.
    """
    counts = _check_histogram(hist, edges)
    nqb = check_int(num_quantized_bins, "num_quantized_bins", 2, counts.size)
    start, stop, div = _ort_divergences(counts, nqb)
    if edges.dtype == np.float16:
        div = div.astype(np.float16)
    best = int(np.argmin(div))
    return edges[start[best]], edges[stop[best]]


def _ort_divergences(counts: np.ndarray, nqb: int):
    """onnxruntime's KL(P || Q) for every window of a symmetric histogram (see
    ``entropy_threshold``): returns the windows' first and end bins and their divergences."""
    eps = _ORT_EPS
    B = counts.size
    zero = B // 2
    i = np.arange(nqb // 2, zero + 1)
    start = zero - i
    stop = np.minimum(zero + i + 1, B)
    length = stop - start
    m = length // nqb

    H = np.concatenate([[0], np.cumsum(counts)])                 # exact int64 prefix sums
    NZ = np.concatenate([[0], np.cumsum(counts != 0)])
    N = int(H[-1])
    left_out = H[start]
    right_out = N - H[stop]
    first = counts[start] + left_out
    last = counts[stop - 1] + right_out
    first_nz = (first != 0).astype(np.int64)
    last_nz = (last != 0).astype(np.int64)
    h_first_nz = (counts[start] != 0).astype(np.int64)
    h_last_nz = (counts[stop - 1] != 0).astype(np.int64)

    # P: non-zero bins and its smoothing shift e_p
    nnz_p = NZ[stop - 1] - NZ[start + 1] + first_nz + last_nz
    zeros_p = length - nnz_p
    e_p = eps * zeros_p / nnz_p
    if e_p.max() >= 1:
        # onnxruntime's smooth_distribution asserts this shift is < 1 (10^4 zero bins per
        # non-zero one): its calibration fails on such a histogram
        raise ValueError("hist is too sparse for onnxruntime's smoothing (>= 10^4 empty bins per "
                         "non-empty bin in a window)")

    # Q: groups [start + g m, start + (g + 1) m); the last bin of the window lies in a group only
    # when nqb * m == length, otherwise in the remainder
    g = np.arange(nqb)
    g0 = start[:, None] + g[None, :] * m[:, None]
    g1 = g0 + m[:, None]
    group_h = H[g1] - H[g0]
    group_h[:, -1] = H[stop] - H[g0[:, -1]]                      # remainder counted in the last group
    norm = NZ[g1] - NZ[g0]
    norm[:, 0] += first_nz - h_first_nz
    exact = nqb * m == length
    norm[:, -1] += np.where(exact, last_nz - h_last_nz, 0)
    q = np.where(norm > 0, group_h // np.maximum(norm, 1), 0)
    q[m == 0] = 0

    # sums of P over each group and over the remainder
    group_p = (H[g1] - H[g0]).astype(np.float64)
    group_p[:, 0] += left_out
    group_p[:, -1] += np.where(exact, right_out, 0)
    rem_lo = start + nqb * m
    rem_size = length - nqb * m
    rem_p = (H[stop] - H[rem_lo]) + np.where(exact, 0, right_out)
    rem_nz = NZ[stop] - NZ[rem_lo] + np.where(exact, 0, last_nz - h_last_nz)

    nnz_q = m * (q > 0).sum(1)
    valid = (m > 0) & (nnz_q > 0)
    nnz_q_safe = np.maximum(nnz_q, 1)
    e_q = eps * (length - nnz_q) / nnz_q_safe
    sum_q = (m * q.sum(1)).astype(np.float64)

    # smoothed P summed over groups (non-zero bins lose e_p each, zero bins gain eps)
    group_ps = group_p - e_p[:, None] * norm + eps * (m[:, None] - norm)
    rem_ps = rem_p - e_p * rem_nz + eps * (rem_size - rem_nz)
    log_eps = math.log(eps)
    log_q = np.where(q > 0, np.log(np.maximum(q - e_q[:, None], 1e-300)), log_eps)
    cross = (group_ps * log_q).sum(1) + rem_ps * log_eps

    # sum of smoothed P log P: interior bins by prefix sums, the two end bins directly
    inner = _window_sum_phi(counts, start + 1, stop - 1, e_p)
    phi = lambda v, nz: np.where(nz > 0, (v - e_p) * np.log(np.where(nz > 0, v - e_p, 1.0)), 0.0)
    self_term = inner + phi(first, first_nz) + phi(last, last_nz) + zeros_p * eps * log_eps

    with np.errstate(divide="ignore", invalid="ignore"):
        div = (self_term - cross) / N - math.log(N) + np.log(np.where(valid, sum_q, 1.0))
    # exact ties (e.g. P = Q) go to the first window, not to float64 rounding noise
    div = np.where(valid, np.round(div, 12), np.inf)
    return start, stop, div


# --------------------------------------------------------------------------------------------
# Batch-normalization based
# --------------------------------------------------------------------------------------------
def bn_based(bn_weight, bn_bias, spec: QuantSpec, alpha: float = 6.0):
    """The range of a batch-normalised pre-activation from the BN parameters alone, without data
    (white paper §3.1, "Batch normalization based"; the pre-activation is modelled as Gaussian
    with mean beta and standard deviation gamma, as in Nagel et al. 2019's data-free methods):

        xmin = min(beta - alpha * |gamma|),   xmax = max(beta + alpha * |gamma|)

    i.e. alpha standard deviations around each channel's mean (the paper writes gamma; a negative
    gamma gives the same spread, hence |gamma|). Per tensor (spec.axis None): min/max over the
    channels; per channel (spec.axis set, the channel axis of the activation): the channels' own
    values.

    bn_weight: gamma, a 1-d floating tensor (C,), or a ``torch.nn`` BatchNorm module (then
    ``bn_bias`` must be None; a module without affine parameters has gamma = 1, beta = 0).
    bn_bias: beta, a 1-d floating tensor (C,).  alpha: > 0.
    Returns (xmin, xmax) float32, 0-d or 1-d (C,).
    """
    _check_spec(spec)
    alpha = _check_real(alpha, "alpha", 0.0, low_open=True)
    if isinstance(bn_weight, torch.nn.modules.batchnorm._NormBase):
        if bn_bias is not None:
            raise ValueError("bn_bias must be None when bn_weight is a BatchNorm module")
        module = bn_weight
        if module.weight is None:
            device = module.running_mean.device if module.running_mean is not None else None
            gamma = torch.ones(module.num_features, device=device)
            beta = torch.zeros(module.num_features, device=device)
        else:
            gamma, beta = module.weight, module.bias
    else:
        gamma, beta = bn_weight, bn_bias
    check_float_tensor(gamma, "bn_weight")
    check_float_tensor(beta, "bn_bias")
    if gamma.ndim != 1 or beta.shape != gamma.shape:
        raise ValueError(f"bn_weight and bn_bias must be 1-d of the same length, got shapes "
                         f"{tuple(gamma.shape)} and {tuple(beta.shape)}")
    gamma = gamma.detach().to(torch.float64)
    beta = beta.detach().to(device=gamma.device, dtype=torch.float64)
    lo = beta - alpha * gamma.abs()
    hi = beta + alpha * gamma.abs()
    if spec.axis is None:
        lo, hi = lo.min(), hi.max()
    return _result(lo, hi, spec)

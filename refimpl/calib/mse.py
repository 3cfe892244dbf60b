"""The range minimising the squared quantization error: an exact search over the scale (and the
zero point), white paper (Nagel et al. 2021) §3.1, "Mean squared error (MSE)"; book chapter 3.

The error is piecewise quadratic in the scale (see ``refimpl.calib.scale_search``): every piece
is visited in order of the scale ("sweep") and the best vertex kept.
"""

from __future__ import annotations

import math

import torch

from ..quant import QuantSpec
from .common import EVAL_BUDGET, channel_rows, check_spec, fake_quant_at, float32_ranges
from .scale_search import (GRID, code_caps, code_magnitudes, cover_scale, near_optimal_tasks, polish,
                           relative_tolerance, sorted_kinks, zero_points)

__all__ = ["mse"]

# Breakpoints (kinks) of the piecewise-quadratic MSE handled by one sweep: bounds the sweep's
# memory to ~150 MB; larger searches are cut into several sweeps.
_KINK_BUDGET = 1 << 21
# A whole-range exact search is used while it needs at most this many kinks in total; beyond it
# a grid first narrows the search to the near-optimal region.
_FULL_SEARCH_KINKS = 1 << 21


def _sides(X: torch.Tensor):
    """Magnitudes of the nonzero values of X (C, n), their row, and which are positive."""
    nz = X != 0
    rows = torch.arange(X.shape[0], device=X.device).unsqueeze(1).expand_as(X)[nz]
    x = X[nz]
    return x.abs(), rows, x > 0


def _kink_count(a, cap, s_lo, s_hi) -> torch.Tensor:
    """Number of kinks of each value in [s_lo, s_hi] (per value, float64)."""
    return code_magnitudes(a, s_lo, cap) - code_magnitudes(a, s_hi, cap)


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
    m_hi, s_k, t_k, a_k, m_k = sorted_kinks(a, cap, task, s_lo, s_hi)
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
    return mag[elem], code_caps(positive[elem], t_zp[owner], spec), owner


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
    zps = torch.tensor(zero_points(spec), dtype=torch.int64, device=X.device)
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
        step = max(1, EVAL_BUDGET // max(num_rows * n, 1))
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


def _mse_search(X: torch.Tensor, spec: QuantSpec):
    """Scale and zero point minimising the squared error of every row of X (C, n) float64.
    Returns (s, zp), (C,) each; s = 0 for an all-zero row."""
    device = X.device
    num_rows = X.shape[0]
    zps = torch.tensor(zero_points(spec), dtype=torch.int64, device=device)
    mag, rows, positive = _sides(X)
    row_len = torch.bincount(rows, minlength=num_rows)
    row_start = torch.cumsum(row_len, 0) - row_len
    data = (row_start, row_len, mag, positive)
    top = cover_scale(X, spec) * 1.02
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
        s_grid = top.unsqueeze(1) * GRID.to(device).unsqueeze(0)
        loss = _grid_mse(X, s_grid, spec)
        r, zi, t_lo, t_hi = near_optimal_tasks(loss, s_grid, top, relative_tolerance(row_len))
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

    Used in :ref:`ch3-sec-why-the-range-matters-clipping`.
    """
    check_spec(spec)
    X = channel_rows(x, spec).to(torch.float64)
    s, zp = _mse_search(X, spec)
    s, zp = s.to(X.device), zp.to(X.device)

    def loss_fn(lo, hi):
        return ((fake_quant_at(X, lo, hi, spec) - X) ** 2).sum(dim=2)

    lo, hi = polish(s, zp, spec, loss_fn, batch_elements=X.numel())
    return float32_ranges(lo, hi, spec)

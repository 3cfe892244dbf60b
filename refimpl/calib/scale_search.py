"""The error of a uniform quantizer as a function of its scale: what the MSE and cross-entropy
searches share (white paper, Nagel et al. 2021, §3.1; book chapter 3, "Range setting").

For a zero point z the quantizer is x_hat = s * clamp(round(x / s), qmin - z, qmax - z): a value
of magnitude ``a = |x|`` gets the code magnitude m(s) = min(round(a / s), cap), with cap = qmax - z
for x > 0 and z - qmin for x < 0. m(s) is piecewise constant in s, stepping by one at the
"kinks" s = a / (k + 1/2); between kinks every code is fixed, so the squared error
sum (a - s m)^2 is a quadratic in s and a softmax cross-entropy is a smooth convex function of s.
At a kink the squared error of that value is continuous with a local maximum, so the minimum of
the MSE lies at the vertex of one of the quadratic pieces: visiting every piece in order of s
finds it exactly ("sweep").

The grid search that narrows a large search to its near-optimal region and the float32 "polish"
that picks the range the real quantizer scores best are here too.
"""

from __future__ import annotations

import math

import torch

from ..numerics import sqrt
from ..quant import QuantSpec
from .common import EVAL_BUDGET

__all__ = ["GRID", "code_magnitudes", "code_caps", "zero_points", "cover_scale", "sorted_kinks",
           "near_optimal_tasks", "relative_tolerance", "ranges_from", "polish"]

# Search grid for the near-optimal region: uniform in the scale, plus a geometric tail so that a
# range far below the data's maximum (heavy tails) is still resolved.
GRID = torch.cat([torch.arange(1, 49, dtype=torch.float64) / 48,
                  torch.logspace(-4, 0, 13, dtype=torch.float64)[:-1]]).unique()
# Zero points searched exactly per channel (asymmetric grids): at most 8 bits the near-optimal
# ones are ~5-20; beyond, the many near-equivalent zero points (which differ only in what they
# clip) are cut to the most promising on the grid.
_MAX_ZERO_POINTS = 64


def code_magnitudes(a: torch.Tensor, s, cap: torch.Tensor) -> torch.Tensor:
    """Code magnitudes min(round(a / s), cap) of magnitudes a at scale(s) s (float64)."""
    # floor(v + 1/2): ties (exact half steps) form a set of measure zero and are not special-cased
    return torch.minimum(torch.floor(a / s + 0.5), cap)


def code_caps(positive: torch.Tensor, zp: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Largest code magnitude of each value for zero point(s) zp (float64)."""
    return torch.where(positive, spec.qmax - zp, zp - spec.qmin).to(torch.float64)


def zero_points(spec: QuantSpec) -> list[int]:
    """The zero points a search visits: the symmetric one, or every code of an asymmetric grid."""
    if spec.symmetric:
        return [spec.symmetric_zero_point]
    return list(range(spec.qmin, spec.qmax + 1))


def cover_scale(X: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
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


def sorted_kinks(a, cap, task, s_lo, s_hi):
    """All kinks inside each value's task range, sorted by task and then by decreasing s.

    Returns the codes at each task's s_hi (per value), then per kink: its s, task, the value's
    magnitude a and the code magnitude m it leaves (the code becomes m + 1 below the kink).
    """
    m_hi = code_magnitudes(a, s_hi[task], cap)
    counts = (code_magnitudes(a, s_lo[task], cap) - m_hi).to(torch.int64)
    owner = torch.repeat_interleave(torch.arange(a.numel(), device=a.device), counts)
    first = torch.cumsum(counts, 0) - counts
    m = m_hi[owner] + (torch.arange(owner.numel(), device=a.device) - first[owner])
    s = a[owner] / (m + 0.5)
    t = task[owner]
    order = torch.sort(s, descending=True, stable=True).indices
    order = order[torch.sort(t[order], stable=True).indices]
    return m_hi, s[order], t[order], a[owner][order], m[order]


def near_optimal_tasks(loss, s_grid, top, tol, max_zero_points=_MAX_ZERO_POINTS):
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


def relative_tolerance(count: torch.Tensor) -> torch.Tensor:
    """How far (relative) above a grid's best loss a cell may lie and still hide the minimum, for
    ``count`` values: 6 / sqrt(count) + 1e-3, float64."""
    # The error is a smooth trend plus the fluctuation of the rounding errors, a sum of n bounded
    # terms of relative size ~1/sqrt(n) (measured: a grid cell next to the exact optimum lies up
    # to ~3/sqrt(n) above the best grid value); cells further above cannot hide a better minimum.
    return 6.0 / sqrt(count.clamp(min=1).to(torch.float64)) + 1e-3


def ranges_from(s: torch.Tensor, zp: torch.Tensor, spec: QuantSpec):
    """(xmin, xmax) that ``qparams`` maps back to scale s and zero point zp (float64 tensors)."""
    if spec.symmetric:
        t = s * ((spec.qmax - spec.qmin) / 2)
        return -t, t
    return (spec.qmin - zp) * s, (spec.qmax - zp) * s


def polish(s, zp, spec, loss_fn, batch_elements: int = 0):
    """Pick, among float32 ranges within a few ulps of scale s, the one whose actual quantizer
    (qparams + fake_quant) has the lowest loss: the search works with exact real scales, the
    quantizer with float32 ones. loss_fn(lo, hi) -> per-row loss for float32 ranges (C,).

    batch_elements > 0: loss_fn takes (K, C) ranges and returns (K, C) losses, and is called on
    as many candidates at once as keep K * batch_elements under ~4M values (one call instead of
    33 small ones; the same values, chosen in the same order)."""
    factors = [1 + k * 2.0 ** -23 for k in range(-16, 17)]
    if batch_elements > 0:
        chunk = max(1, EVAL_BUDGET // batch_elements)
        cands = []
        for i in range(0, len(factors), chunk):
            f = torch.tensor(factors[i:i + chunk], dtype=s.dtype, device=s.device).unsqueeze(1)
            lo, hi = ranges_from(s.unsqueeze(0) * f, zp.unsqueeze(0), spec)
            lo, hi = lo.to(torch.float32), hi.to(torch.float32)
            value = loss_fn(lo, hi)
            cands += [(lo[j], hi[j], value[j]) for j in range(len(f))]
    else:
        cands = []
        for f in factors:
            lo, hi = ranges_from(s * f, zp, spec)
            lo, hi = lo.to(torch.float32), hi.to(torch.float32)
            cands.append((lo, hi, loss_fn(lo, hi)))
    best_lo, best_hi, best = cands[0]
    for lo, hi, value in cands[1:]:
        better = value < best
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
        best = torch.where(better, value, best)
    return best_lo, best_hi


"""KL-divergence ("entropy") calibration: the clipping range whose quantized histogram loses the
least information, as TensorRT (Migacz 2017, "8-bit Inference with TensorRT") and onnxruntime
(``HistogramCollector``, method "entropy") define it; book chapter 3, "Range setting".

* ``kl_tensorrt`` — symmetric ranges: TensorRT's histogram of ``|x|`` and its KL divergence.
* ``kl_onnxruntime`` — asymmetric ranges: onnxruntime's signed histogram, through
  ``entropy_onnxruntime`` (onnxruntime's threshold for one histogram), clipped to the data.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch

from .._checks import check_int
from ..quant import QuantSpec
from .common import channel_rows, check_spec, float32_ranges, widened

__all__ = ["kl_tensorrt", "kl_onnxruntime", "entropy_onnxruntime", "tensorrt_divergences",
           "onnxruntime_divergences"]

# onnxruntime's smoothing constant for zero bins (quant_utils.smooth_distribution)
_ORT_EPS = 1e-4
# Counts up to this enter sum (c - e) log(c - e) exactly; larger ones through a series in e / c.
_EXACT_COUNTS = 8


def _xlogx(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v > 0, v * torch.log(torch.where(v > 0, v, torch.ones_like(v))), torch.zeros_like(v))


def tensorrt_divergences(hist: torch.Tensor, num_quantized_bins: int) -> torch.Tensor:
    """KL(P || Q) of Migacz's entropy calibration for every candidate bin count i (rows of hist).

    hist: (C, B) float64 counts of ``|x|`` in B equal bins. Candidate i keeps bins [0, i),
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



def _check_kl_args(spec, num_bins, num_quantized_bins, ignore_zeros, default: int, low: int) -> int:
    """Validate the arguments both KL calibrations share; return num_quantized_bins (or its default)."""
    check_int(num_bins, "num_bins", 2)
    if not isinstance(ignore_zeros, bool):
        raise TypeError(f"ignore_zeros must be a bool, got {ignore_zeros!r}")
    if num_quantized_bins is None and default > num_bins:
        raise ValueError(f"num_bins must be >= {default}, the default num_quantized_bins for {spec}")
    nqb = default if num_quantized_bins is None else num_quantized_bins
    return check_int(nqb, "num_quantized_bins", low, num_bins)


def kl_tensorrt(x: torch.Tensor, spec: QuantSpec, num_bins: int = 2048, num_quantized_bins: int | None = None,
                ignore_zeros: bool = False):
    """The symmetric clipping range [-t, t] minimising the KL divergence between the histogram of
    ``|x|`` and its quantized version: TensorRT's entropy calibration (Migacz 2017, "8-bit Inference
    with TensorRT"; white paper §3.1 lists it among the range setters; book chapter 3).

    A histogram of ``|x|`` over [0, max|x|] in ``num_bins`` bins; for every candidate threshold (bin
    edge i >= num_quantized_bins) the reference P is bins [0, i) with the outliers beyond added
    to its last bin, and Q merges those bins into ``num_quantized_bins`` levels, each level's
    count spread over its non-zero bins of P; the threshold with the smallest KL(P || Q) wins
    (the smallest on ties). Default num_quantized_bins: the codes on [0, t], qmax - zero_point +
    1 (128 for int8).

    ignore_zeros: leave exact zeros out of the histogram. Post-ReLU activations are often half
    zeros; in the first bin they dominate P, and Q, which spreads each merged level evenly, can
    only match that spike when the bins are barely merged, so the search settles on a threshold
    near zero. NVIDIA's calibrators suppress that spike too; this option removes it exactly
    (the same as calibrating x[x != 0]; a row of zeros only still gives a zero range).

    x: floating tensor.  spec: symmetric (asymmetric: ``kl_onnxruntime``).  num_bins: >= 2
    (>= num_quantized_bins).  Rows (``spec.axis``) are calibrated one by one.
    Returns (xmin, xmax) float32, 0-d or 1-d.

    Used in :ref:`ch3-sec-weights`.
    """
    check_spec(spec)
    if not spec.symmetric:
        raise ValueError(f"kl_tensorrt needs a symmetric spec (TensorRT's range is [-t, t]), got {spec}; "
                         f"for an asymmetric spec use kl_onnxruntime")
    X = widened(channel_rows(x, spec))
    nqb = _check_kl_args(spec, num_bins, num_quantized_bins, ignore_zeros,
                         spec.qmax - spec.symmetric_zero_point + 1, 1)
    hist, amax = _abs_histogram(X.to(torch.float64), num_bins)
    if ignore_zeros:                                  # zeros all land in bin 0
        hist[:, 0] -= (X == 0).sum(dim=1).to(torch.float64)
    idx = torch.argmin(tensorrt_divergences(hist, nqb), dim=1) + nqb               # first minimum
    t = amax * idx.to(torch.float64) / num_bins
    return float32_ranges(-t, t, spec)


def kl_onnxruntime(x: torch.Tensor, spec: QuantSpec, num_bins: int = 2048, num_quantized_bins: int | None = None,
                   ignore_zeros: bool = False):
    """The clipping range of onnxruntime's entropy calibration (``HistogramCollector``, method
    "entropy", after Migacz 2017) for an asymmetric grid (book chapter 3, "Range setting").

    The signed histogram of x over [-max|x|, max|x|] (numpy's, on float32 values, so that the
    bins are onnxruntime's), windows grown symmetrically around the zero bin, onnxruntime's KL
    (``entropy_onnxruntime``), then clipped to [min x, max x]. Default num_quantized_bins: the
    grid's levels (256 for 8 bits; onnxruntime's own default is 128, i.e. 7 bits over [-t, t]).
    ignore_zeros: leave exact zeros out of the histogram, as ``kl_tensorrt`` does.

    x: floating tensor.  spec: asymmetric (symmetric: ``kl_tensorrt``).  num_bins: >= 2
    (>= num_quantized_bins).  Rows (``spec.axis``) are calibrated one by one.
    Returns (xmin, xmax) float32, 0-d or 1-d.

    Used in :ref:`ch3-sec-activations`.
    """
    check_spec(spec)
    if spec.symmetric:
        raise ValueError(f"kl_onnxruntime needs an asymmetric spec (symmetric=False), got {spec}; "
                         f"for a symmetric spec use kl_tensorrt")
    X = widened(channel_rows(x, spec))
    nqb = _check_kl_args(spec, num_bins, num_quantized_bins, ignore_zeros, spec.num_levels, 2)
    lows, highs = [], []
    for row in X.to(torch.float32).cpu().numpy():
        if ignore_zeros and (row != 0).any():
            row = row[row != 0]
        lo_v, hi_v = row.min(), row.max()
        t = np.array(max(abs(lo_v), abs(hi_v)), dtype=np.float32)
        hist, edges = np.histogram(row, num_bins, range=(-t, t))
        lo, hi = entropy_onnxruntime(hist, edges, nqb)
        lows.append(max(float(lo), float(lo_v)))
        highs.append(min(float(hi), float(hi_v)))
    lo = torch.tensor(lows, dtype=torch.float64, device=X.device)
    hi = torch.tensor(highs, dtype=torch.float64, device=X.device)
    return float32_ranges(lo, hi, spec)


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


def entropy_onnxruntime(hist: np.ndarray, edges: np.ndarray, num_quantized_bins: int = 128):
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
    start, stop, div = onnxruntime_divergences(counts, nqb)
    if edges.dtype == np.float16:
        div = div.astype(np.float16)
    best = int(np.argmin(div))
    return edges[start[best]], edges[stop[best]]


def _ort_windows(counts: np.ndarray, nqb: int) -> SimpleNamespace:
    """The windows of onnxruntime's search (see ``entropy_onnxruntime``) and their reference P:
    bins, prefix sums, outliers folded into the end bins, and P's smoothing shift e_p."""
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
    return SimpleNamespace(start=start, stop=stop, length=length, m=m, H=H, NZ=NZ, N=N, left_out=left_out,
                           right_out=right_out, first=first, last=last, first_nz=first_nz, last_nz=last_nz,
                           h_first_nz=h_first_nz, h_last_nz=h_last_nz, zeros_p=zeros_p, e_p=e_p)


def _ort_cross(w: SimpleNamespace, nqb: int):
    """sum P log Q of every window (smoothed P and Q, unnormalised), whether its Q is usable, and
    the sum of Q's counts: the quantized side of onnxruntime's KL."""
    eps = _ORT_EPS
    start, stop, length, m, H, NZ = w.start, w.stop, w.length, w.m, w.H, w.NZ
    # Q: groups [start + g m, start + (g + 1) m); the last bin of the window lies in a group only
    # when nqb * m == length, otherwise in the remainder
    g = np.arange(nqb)
    g0 = start[:, None] + g[None, :] * m[:, None]
    g1 = g0 + m[:, None]
    group_h = H[g1] - H[g0]
    group_h[:, -1] = H[stop] - H[g0[:, -1]]                      # remainder counted in the last group
    norm = NZ[g1] - NZ[g0]
    norm[:, 0] += w.first_nz - w.h_first_nz
    exact = nqb * m == length
    norm[:, -1] += np.where(exact, w.last_nz - w.h_last_nz, 0)
    q = np.where(norm > 0, group_h // np.maximum(norm, 1), 0)
    q[m == 0] = 0

    # sums of P over each group and over the remainder
    group_p = (H[g1] - H[g0]).astype(np.float64)
    group_p[:, 0] += w.left_out
    group_p[:, -1] += np.where(exact, w.right_out, 0)
    rem_lo = start + nqb * m
    rem_size = length - nqb * m
    rem_p = (H[stop] - H[rem_lo]) + np.where(exact, 0, w.right_out)
    rem_nz = NZ[stop] - NZ[rem_lo] + np.where(exact, 0, w.last_nz - w.h_last_nz)

    nnz_q = m * (q > 0).sum(1)
    valid = (m > 0) & (nnz_q > 0)
    nnz_q_safe = np.maximum(nnz_q, 1)
    e_q = eps * (length - nnz_q) / nnz_q_safe
    sum_q = (m * q.sum(1)).astype(np.float64)

    # smoothed P summed over groups (non-zero bins lose e_p each, zero bins gain eps)
    group_ps = group_p - w.e_p[:, None] * norm + eps * (m[:, None] - norm)
    rem_ps = rem_p - w.e_p * rem_nz + eps * (rem_size - rem_nz)
    log_eps = math.log(eps)
    log_q = np.where(q > 0, np.log(np.maximum(q - e_q[:, None], 1e-300)), log_eps)
    cross = (group_ps * log_q).sum(1) + rem_ps * log_eps
    return cross, valid, sum_q


def onnxruntime_divergences(counts: np.ndarray, nqb: int):
    """onnxruntime's KL(P || Q) for every window of a symmetric histogram (see
    ``entropy_onnxruntime``): returns the windows' first and end bins and their divergences."""
    eps = _ORT_EPS
    w = _ort_windows(counts, nqb)
    cross, valid, sum_q = _ort_cross(w, nqb)
    e_p, N = w.e_p, w.N
    log_eps = math.log(eps)

    # sum of smoothed P log P: interior bins by prefix sums, the two end bins directly
    inner = _window_sum_phi(counts, w.start + 1, w.stop - 1, e_p)
    phi = lambda v, nz: np.where(nz > 0, (v - e_p) * np.log(np.where(nz > 0, v - e_p, 1.0)), 0.0)
    self_term = inner + phi(w.first, w.first_nz) + phi(w.last, w.last_nz) + w.zeros_p * eps * log_eps

    with np.errstate(divide="ignore", invalid="ignore"):
        div = (self_term - cross) / N - math.log(N) + np.log(np.where(valid, sum_q, 1.0))
    # exact ties (e.g. P = Q) go to the first window, not to float64 rounding noise
    div = np.where(valid, np.round(div, 12), np.inf)
    return w.start, w.stop, div

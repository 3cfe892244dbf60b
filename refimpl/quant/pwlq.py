"""Piecewise linear quantization, PWLQ (Fang et al., ECCV 2020, "Post-Training Piecewise Linear
Quantization for Deep Neural Networks", arXiv 2002.00104), as pure tensor math.

The range [-m, m] of a bell-shaped tensor is split at a breakpoint 0 < p < m into a centre
[-p, p], where most values lie, and two tails [-m, -p) and (p, m]; each piece gets its own uniform
grid, so the dense centre gets a fine step and the sparse tails a coarse one. With
uni(r; b, r_l, r_u, z) the uniform quantizer of Eq. 1 (b bits on [r_l, r_u], offset z), the
paper's Eq. 3 reads ::

    pw(r; b, m, p) = sign(r) * uni(|r|; b - 1, 0, p, 0)    for |r| <= p   (centre, R1)
                   = sign(r) * uni(|r|; b - 1, p, m, p)    for |r| >  p   (tails,  R2)

Two schemes (``PWLQ_SCHEMES``):

* ``"signed_centre"`` (default): the authors' released code, ``quant/pwlq.py`` with ``pw_opt=2``
  ("non-overlapping"): the centre is a b-bit *signed* symmetric grid on [-p, p], step
  2p / (2^b - 1), codes -(2^(b-1) - 1) .. 2^(b-1) - 1 (the values that land in the open centre
  never reach the most negative code); each tail a (b-1)-bit affine grid on [p, m] with offset p,
  step (m - p) / (2^(b-1) - 1). The centre's top level is (2^b - 2)/(2^b - 1) p < p, so the
  2^b - 1 centre levels and 2 x 2^(b-1) tail levels are all distinct: 2^(b+1) - 1 levels, as many
  as a (b+1)-bit grid ("b-bit PWLQ has the same number of levels as (b+1)-bit uniform", §3).
* ``"eq3"``: Eq. 3 read literally: the centre's magnitude ``|r|`` on [0, p] gets a (b-1)-bit grid
  of step p / (2^(b-1) - 1) whose top level is p itself, also the tails' first level, so two of
  the 2^(b+1) - 1 codes are wasted (2^(b+1) - 3 distinct levels) and the centre step is
  slightly coarser ((2^b - 1) / (2^b - 2) times the released code's).

Both round to nearest with ties to even (``torch.round``, as the released code) *within* the
piece a value belongs to: a value just inside the centre goes to the nearest centre level even
when the tail's first level p is closer. Values beyond +-m clip to +-m.

The breakpoint (``pwlq_breakpoint``, ``PWLQ_BREAKPOINT_METHODS``):

* ``"search"``: the released code's coarse-to-fine grid search of the quantization MSE over
  p / m (supplementary Algorithm 1);
* ``"gaussian_closed_form"``, ``"laplace_closed_form"``: the paper's one-shot approximations
  (§5.1, supplementary §1) of the optimum of Eq. 4 under a fitted density;
* ``"gaussian_expected_error"``, ``"laplace_expected_error"``: the optimum of the expected error
  of Eq. 4 under the fitted density, found numerically (the paper solves Eq. 5 by gradient
  descent, the released code by bisection).

``pwlq_bias_correction`` is the optional per-channel mean/std correction the paper applies after
quantizing (its "+BC" columns); ``pwlq_decompose`` splits a PWLQ weight into the integer codes
an accelerator multiplies, which shows its inference cost (the paper's Table 1,
"accumulators"). Weights are quantized per output channel (``axis=0``), after folding BN (§5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._checks import check_choice, check_float_tensor, check_int, normalize_axis
from ..numerics import sqrt

__all__ = ["PWLQ_SCHEMES", "PWLQ_BREAKPOINT_METHODS", "pwlq", "pwlq_breakpoint", "pwlq_bias_correction",
           "pwlq_decompose", "PWLQDecomposition"]

PWLQ_SCHEMES = ("signed_centre", "eq3")
"""The PWLQ grids ``pwlq`` offers: the released code's (``pw_opt=2``) and Eq. 3 read literally.

Used in :ref:`ch8-sec-the-piecewise-grid`.
"""

PWLQ_BREAKPOINT_METHODS = ("search", "gaussian_closed_form", "laplace_closed_form",
                           "gaussian_expected_error", "laplace_expected_error")
"""How ``pwlq_breakpoint`` chooses p: MSE search, the paper's closed forms, Eq. 4's optimum.

Used in :ref:`ch8-sec-choosing-the-breakpoint`.
"""

# The released code's fits (find_optimal_breakpoint), printed rounded in §5.1 as
# "ln(0.8614 m + 0.6079)" and "0.8030 sqrt(m) - 0.3167"; both in units of the standard deviation.
_GAUSS_COEF, _GAUSS_INTERCEPT = 0.86143114, 0.607901097496529
_LAPLACE_COEF, _LAPLACE_INTERCEPT = 0.80304483, -0.3166785508381478
# The search runs on p/m in thousandths; closed-form and expected-error breakpoints are kept
# inside [0.001 m, 0.999 m], the search's own range and resolution.
_GRID = 1000
# Elements (channels x candidates x values) per chunk of the batched search: bounds its memory.
_CHUNK_ELEMENTS = 1 << 22


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_bits(bits) -> int:
    return check_int(bits, "bits", 2, 16)


def _rows(x: torch.Tensor, axis) -> tuple[torch.Tensor, int | None]:
    """x as (channels, values) in the compute dtype, and the normalised axis (None: one row)."""
    if axis is None:
        return x.detach().reshape(1, -1).to(_compute_dtype(x.dtype)), None
    axis = normalize_axis(axis, x.ndim, "axis")
    return x.detach().movedim(axis, 0).reshape(x.shape[axis], -1).to(_compute_dtype(x.dtype)), axis


def _from_rows(rows: torch.Tensor, x: torch.Tensor, axis) -> torch.Tensor:
    """The inverse of ``_rows``: back to x's shape (dtype unchanged)."""
    if axis is None:
        return rows.reshape(x.shape)
    moved = list(x.shape)
    moved.insert(0, moved.pop(axis))
    return rows.reshape(moved).movedim(0, axis)


def _per_channel(value, name: str, channels: int, like: torch.Tensor) -> torch.Tensor:
    """A number, a one-element tensor or a (channels,) tensor as a (channels,) tensor like ``like``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a number or a torch.Tensor, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be real, got dtype {value.dtype}")
        t = value.detach().to(device=like.device, dtype=like.dtype)
    else:                                   # a Python float keeps its double precision
        t = torch.tensor(float(value), device=like.device, dtype=like.dtype)
    if t.numel() == 1:
        return t.reshape(1).expand(channels)
    if t.ndim != 1 or t.numel() != channels:
        raise ValueError(f"{name} must be one number or one per channel ({channels} values along axis), "
                         f"got shape {tuple(t.shape)}")
    return t


def _check_breakpoints(m: torch.Tensor, p: torch.Tensor) -> None:
    if not bool(torch.isfinite(m).all() & torch.isfinite(p).all()):
        raise ValueError("m and p must be finite")
    ok = ((p > 0) & (p < m)) | ((m == 0) & (p == 0))
    if not bool(ok.all()):
        bad = int((~ok).nonzero()[0, 0])
        raise ValueError(f"p must satisfy 0 < p < m on every channel (m = p = 0 only for an all-zero "
                         f"channel); channel {bad} has m = {float(m[bad]):.6g}, p = {float(p[bad]):.6g}")


def _pieces(v: torch.Tensor, bits: int, m: torch.Tensor, p: torch.Tensor, scheme: str):
    """The codes and scales of Eq. 3 for values v, broadcasting m and p against v.

    Returns (centre_code, tail_code, tail_sign, scale_centre, scale_tail), the codes as floats
    holding integers: centre_code signed (0 on the tails), tail_code in 0..2^(b-1)-1 and
    tail_sign in {-1, 1} on the tails (both 0 in the centre), such that
    pw(v) = scale_centre * centre_code + tail_sign * (scale_tail * tail_code + p).
    """
    top = 2 ** (bits - 1) - 1              # the largest code of a (b-1)-bit piece
    a = torch.minimum(v.abs(), m)          # |clamp(v, -m, m)|
    sign = torch.sign(v)
    if scheme == "signed_centre":
        scale_centre = 2.0 * p / (2 ** bits - 1)
        tail = a >= p                      # the released code: -p < w < p is the centre
    else:
        scale_centre = p / top
        tail = a > p                       # Eq. 3: R1 = [-p, p] is closed
    scale_tail = (m - p) / top
    # an all-zero channel has m = p = 0: divide by 1 there, every value is 0 anyway
    safe_c = torch.where(scale_centre > 0, scale_centre, torch.ones_like(scale_centre))
    safe_t = torch.where(scale_tail > 0, scale_tail, torch.ones_like(scale_tail))
    zero = torch.zeros((), dtype=v.dtype, device=v.device)
    centre_code = torch.where(tail, zero, sign * torch.clamp(torch.round(a / safe_c), max=top))
    tail_code = torch.where(tail, torch.clamp(torch.round((a - p) / safe_t), 0, top), zero)
    tail_sign = torch.where(tail, sign, zero)
    return centre_code, tail_code, tail_sign, scale_centre, scale_tail


def _assemble(centre_code, tail_code, tail_sign, scale_centre, scale_tail, p):
    return scale_centre * centre_code + tail_sign * (scale_tail * tail_code + p)


def _value(v, bits, m, p, scheme):
    cc, tc, ts, sc, st = _pieces(v, bits, m, p, scheme)
    return _assemble(cc, tc, ts, sc, st, p)


def _prepare(x, bits, m, p, axis, scheme):
    check_float_tensor(x, "x")
    bits = _check_bits(bits)
    check_choice(scheme, "scheme", PWLQ_SCHEMES)
    rows, axis = _rows(x, axis)
    m = _per_channel(m, "m", rows.shape[0], rows)
    p = _per_channel(p, "p", rows.shape[0], rows)
    _check_breakpoints(m, p)
    return rows, bits, m[:, None], p[:, None], axis


def pwlq(x: torch.Tensor, bits: int, m, p, *, axis: int | None = 0, scheme: str = "signed_centre") -> torch.Tensor:
    """x fake-quantized by PWLQ, pw(x; b, m, p) of Eq. 3 with one breakpoint (Fang et al. 2020).

    The centre [-p, p] gets a fine grid, each tail (p, m] a (b-1)-bit grid with offset p,
    sign-symmetric; ``scheme`` "signed_centre" (the released code's ``pw_opt=2``: a b-bit signed
    centre, 2^(b+1) - 1 levels) or "eq3" (Eq. 3 literally: a (b-1)-bit centre magnitude whose top
    level p repeats the tails' first, 2^(b+1) - 3 levels); see the module docstring. Rounding is
    to nearest (ties to even) inside each value's piece; values beyond +-m clip.
    The released code can, by a float32 rounding of w / scale to exactly -(2^b - 1)/2 just
    inside -p, give the centre's unused code -2^(b-1); here the centre codes are symmetric.

    x: floating tensor (float16, bfloat16, float32, float64), any shape, non-empty.
    bits: b, 2..16. m, p: the range and the breakpoint, 0 < p < m (m = p = 0 for an all-zero
    channel, which quantizes to 0); a number, or one per channel along ``axis`` (``axis=None``:
    one (m, p) for the whole tensor). Weights: per output channel, ``axis=0``, with (m, p) from
    :func:`pwlq_breakpoint`. Computed in float32 (float64 for float64 x).
    Returns x's shape and dtype, every value a PWLQ level.

    Used in :ref:`ch8-sec-the-piecewise-grid`, :ref:`ch8-sec-choosing-the-breakpoint`.
    """
    rows, bits, m, p, axis = _prepare(x, bits, m, p, axis, scheme)
    return _from_rows(_value(rows, bits, m, p, scheme), x, axis).to(x.dtype)


# --------------------------------------------------------------------------------------------
# The breakpoint
# --------------------------------------------------------------------------------------------
def _sse(rows: torch.Tensor, bits: int, m: torch.Tensor, ratios: torch.Tensor, scheme: str) -> torch.Tensor:
    """Sum of squared PWLQ errors of each row at p = ratio/1000 * m for each candidate ratio.

    rows (C, K); m (C,); ratios (C, N) integers in thousandths. Returns (C, N); a candidate
    outside (0, 1000) gets +inf. All candidates of a chunk of channels in one batched computation.
    In float64: candidates can differ by less than float32 resolves (two dips of a channel of 3
    weights 5e-7 apart), and which one wins should not depend on the order of a sum.
    """
    rows, m = rows.double(), m.double()
    channels, k = rows.shape
    n = ratios.shape[1]
    valid = (ratios > 0) & (ratios < _GRID)
    p_all = ratios.clamp(1, _GRID - 1).to(rows.dtype) / _GRID * m[:, None]
    out = torch.empty(channels, n, dtype=rows.dtype, device=rows.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, n * k))
    for lo in range(0, channels, step):
        v = rows[lo:lo + step, None, :]                                  # (c, 1, K)
        mm = m[lo:lo + step, None, None]                                  # (c, 1, 1)
        pp = p_all[lo:lo + step, :, None]                                 # (c, N, 1)
        err = _value(v, bits, mm, pp, scheme) - v
        out[lo:lo + step] = (err * err).sum(-1)
    return torch.where(valid, out, torch.full_like(out, math.inf))


def _search(rows: torch.Tensor, bits: int, m: torch.Tensor, scheme: str) -> torch.Tensor:
    """The released code's coarse-to-fine search (pwlq_coarse2fine_grid_search), batched.

    Stage 1: p/m in 0.1, ..., 0.9; stage 2: best - 0.1, ..., best + 0.09 in steps of 0.01;
    stage 3: best - 0.01, ..., best + 0.009 in steps of 0.001 (the half-open ``np.arange``
    ranges of the code; p/m outside (0, 1) skipped). The code keeps a candidate only when its
    error is strictly smaller, so the previous stage's best wins a tie, then the earlier candidate:
    here the previous best is evaluated first and ``argmin`` takes the first minimum.
    Returns p/m of each row in thousandths, (C,) int64. Errors are computed in float64.
    """
    dev = rows.device
    channels = rows.shape[0]
    coarse = torch.arange(100, 1000, 100, device=dev).expand(channels, -1)
    best = coarse.gather(1, _sse(rows, bits, m, coarse, scheme).argmin(1, keepdim=True))
    for step in (10, 1):
        offsets = torch.arange(-10 * step, 10 * step, step, device=dev)
        offsets = torch.cat([offsets.new_zeros(1), offsets[offsets != 0]])
        cand = best + offsets
        best = cand.gather(1, _sse(rows, bits, m, cand, scheme).argmin(1, keepdim=True))
    return best[:, 0]


def _std(rows: torch.Tensor) -> torch.Tensor:
    # the released code's torch.std (unbiased); one value per channel has no spread
    return rows.std(1) if rows.shape[1] > 1 else torch.zeros(rows.shape[0], dtype=rows.dtype, device=rows.device)


def _density(name: str, t: torch.Tensor):
    """(F(t), f(t)) of the zero-mean, unit-variance Gaussian or Laplacian, t >= 0 (float64)."""
    if name == "gaussian":
        return torch.special.ndtr(t), torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
    # Laplace with scale 1/sqrt(2) has variance 1
    e = torch.exp(-math.sqrt(2.0) * t)
    return 1.0 - 0.5 * e, e / math.sqrt(2.0)


def _expected_error(mhat: torch.Tensor, t: torch.Tensor, dist: str) -> torch.Tensor:
    """Eq. 4 divided by C(b-1): (m - p)^2 + m (2p - m) (2 F(p) - 1), in std units."""
    cdf, _ = _density(dist, t)
    return (mhat - t) ** 2 + mhat * (2 * t - mhat) * (2 * cdf - 1)


def _expected_error_slope(mhat: torch.Tensor, t: torch.Tensor, dist: str) -> torch.Tensor:
    """Half the derivative of Eq. 4 / C(b-1) in p: p - 2m + 2m F(p) + m f(p) (2p - m) (Eq. 5)."""
    cdf, pdf = _density(dist, t)
    return t - 2 * mhat + 2 * mhat * cdf + mhat * pdf * (2 * t - mhat)


def _expected_error_optimum(mhat: torch.Tensor, dist: str) -> torch.Tensor:
    """argmin over t in (0, mhat) of Eq. 4, per channel: a grid of 1024 points locates the global
    minimum (Eq. 4 is convex only on (0, m/2), Lemma 1), bisection on the sign of Eq. 5 inside the
    neighbouring grid cells refines it. mhat (C,) float64 > 0; returns (C,) float64."""
    n = 1024
    grid = mhat[:, None] * (torch.arange(1, n, dtype=mhat.dtype, device=mhat.device) / n)
    i = _expected_error(mhat[:, None], grid, dist).argmin(1)
    lo = mhat * i.to(mhat.dtype) / n                # the cells on both sides of the grid minimum
    hi = mhat * (i + 2).to(mhat.dtype) / n
    best = grid.gather(1, i[:, None])[:, 0]
    bracketed = (_expected_error_slope(mhat, lo, dist) < 0) & (_expected_error_slope(mhat, hi, dist) > 0)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        down = _expected_error_slope(mhat, mid, dist) < 0
        lo, hi = torch.where(down, mid, lo), torch.where(down, hi, mid)
    return torch.where(bracketed, 0.5 * (lo + hi), best)


def pwlq_breakpoint(x: torch.Tensor, bits: int, method: str = "search", *, axis: int | None = 0,
                    scheme: str = "signed_centre") -> tuple[torch.Tensor, torch.Tensor]:
    """The range m = max|x| and the breakpoint p of PWLQ, per channel (Fang et al. 2020, §3-5).

    ``method`` (``PWLQ_BREAKPOINT_METHODS``):

    ::

        search:                 minimise the quantization MSE of pwlq(x, bits, m, p, scheme=scheme)
                                over p/m by the released code's coarse-to-fine grid (0.1 .. 0.9,
                                then +-0.1 in 0.01 steps, then +-0.01 in 0.001 steps; supplementary
                                Algorithm 1). All channels and candidates of a stage are evaluated
                                as one batched computation, in float64.
        gaussian_closed_form:   p = std * ln(0.86143114 m/std + 0.60790110)      (§5.1)
        laplace_closed_form:    p = std * (0.80304483 sqrt(m/std) - 0.31667855)   (§5.1)
        gaussian_expected_error, laplace_expected_error:
                                p = std * argmin_t [(m' - t)^2 + m'(2t - m')(2F(t) - 1)], m' = m/std,
                                F the unit-variance Gaussian or Laplace CDF: the minimum of Eq. 4
                                (where Eq. 5, its derivative, vanishes), found numerically.

    The paper prints the closed forms as "p*/m = ...", but in the released code
    (``find_optimal_breakpoint``) the formula's m is max|w|/std(w) and its result is the
    breakpoint in units of std(w), not a ratio p/m: p = result * std (m/std = 4 gives 1.40, which
    could not be a ratio). std is the unbiased standard deviation of the channel, as there.
    Eq. 4 gives both pieces the error C(b-1) Delta^2 of Eq. 2, whatever the scheme, as the released
    code does for ``pw_opt=2``: ``scheme`` matters only to "search". The density methods' p is kept
    in [0.001 m, 0.999 m] (the search's range); a channel of one repeated magnitude (std 0) gets
    p = m/2, an all-zero channel m = p = 0.

    x: floating tensor, non-empty, finite; bits: 2..16; axis: the channel axis (weights: 0, the
    output channel), or None for one (m, p) over the whole tensor.
    Returns (m, p), each (channels,) (0-d for ``axis=None``), float32 (float64 for float64 x), on
    x's device, with 0 < p < m (or m = p = 0).

    Used in :ref:`ch8-sec-choosing-the-breakpoint`, :ref:`ch8-sec-what-pwlq-costs-at-inference`.
    """
    check_float_tensor(x, "x")
    bits = _check_bits(bits)
    check_choice(method, "method", PWLQ_BREAKPOINT_METHODS)
    check_choice(scheme, "scheme", PWLQ_SCHEMES)
    rows, axis = _rows(x, axis)
    m = rows.abs().amax(1)
    if method == "search":
        p = (_search(rows, bits, m, scheme).double() / _GRID * m.double()).to(rows.dtype)
    else:
        std = _std(rows.double())
        m64 = m.double()
        spread = std > 0
        mhat = torch.where(spread, m64 / torch.where(spread, std, torch.ones_like(std)), torch.ones_like(std))
        dist = method.split("_")[0]
        if method.endswith("closed_form"):
            t = (torch.log(_GAUSS_COEF * mhat + _GAUSS_INTERCEPT) if dist == "gaussian"
                 else _LAPLACE_COEF * sqrt(mhat) + _LAPLACE_INTERCEPT)
        else:
            t = _expected_error_optimum(mhat, dist)
        p64 = torch.where(spread, t * std, 0.5 * m64)
        p64 = torch.minimum(torch.maximum(p64, m64 / _GRID), m64 * (_GRID - 1) / _GRID)
        p = p64.to(rows.dtype)
    p = torch.where(m > 0, p, torch.zeros_like(p))
    if axis is None:
        return m[0], p[0]
    return m, p


# --------------------------------------------------------------------------------------------
# Bias correction
# --------------------------------------------------------------------------------------------
def pwlq_bias_correction(x: torch.Tensor, x_q: torch.Tensor, *, axis: int | None = 0) -> torch.Tensor:
    """PWLQ's optional bias correction: x_q shifted and scaled so that each channel has x's mean
    and standard deviation (Fang et al. 2020, §5, the "+BC" columns; after Banner et al. 2019).

    ::

        x_bc = (x_q - mean(x_q)) * std(x) / std(x_q) + mean(x)      per channel

    A separate step after quantizing (``pwlq`` or any other quantizer): x_bc is no longer on the
    PWLQ grid but on an affine transform of it, one scale and one shift per channel, which a
    runtime folds into the channel's scale and bias. The released code (``quant_weights``) computes
    (x_q + mean(x) - mean(x_q)) * std(x) / std(x_q), whose mean is mean(x) * std(x)/std(x_q) rather
    than mean(x); here both moments match. A channel whose x_q is constant is only shifted.

    x, x_q: floating tensors of one shape (x_q e.g. ``pwlq(x, ...)``); axis: the channel axis
    (None: the whole tensor). Computed in float32 (float64 for float64 x_q).
    Returns x_q's shape and dtype.
    """
    check_float_tensor(x, "x")
    check_float_tensor(x_q, "x_q")
    if x.shape != x_q.shape:
        raise ValueError(f"x and x_q must have one shape, got {tuple(x.shape)} and {tuple(x_q.shape)}")
    rows, ax = _rows(x, axis)
    rows_q, _ = _rows(x_q, axis)
    rows = rows.to(rows_q.dtype)
    mean, mean_q = rows.mean(1, keepdim=True), rows_q.mean(1, keepdim=True)
    std, std_q = _std(rows)[:, None], _std(rows_q)[:, None]
    ratio = torch.where(std_q > 0, std / torch.where(std_q > 0, std_q, torch.ones_like(std_q)),
                        torch.ones_like(std_q))
    return _from_rows((rows_q - mean_q) * ratio + mean, x_q, ax).to(x_q.dtype)


# --------------------------------------------------------------------------------------------
# What PWLQ costs at inference
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PWLQDecomposition:
    """A PWLQ weight split into integer codes and per-channel constants (``pwlq_decompose``).

    ::

        w_q = scale_centre * centre_codes + tail_sign * (scale_tail * tail_codes + offset)

    centre_codes (int32; 0 on the tails), tail_codes (int32, 0 .. 2^(b-1) - 1; 0 in the centre)
    and tail_sign (int8, +-1 on the tails, 0 in the centre) have the weight's shape;
    scale_centre, scale_tail and offset (= p) are float tensors shaped to broadcast over it (the
    channel axis kept, 1 elsewhere). A layer y = sum_k w_k x_k then needs, per output, three
    integer sums of the (integer) activations: the centre accumulator sum centre_codes * x, the
    tail accumulator sum tail_sign * tail_codes * x and the offset term sum tail_sign * x (a sum of
    activations over the tail positions, no multiplications), combined once by the three
    constants: the "three accumulators" of the paper's Table 1 for one breakpoint.
    """

    centre_codes: torch.Tensor
    tail_codes: torch.Tensor
    tail_sign: torch.Tensor
    scale_centre: torch.Tensor
    scale_tail: torch.Tensor
    offset: torch.Tensor

    @property
    def tail_mask(self) -> torch.Tensor:
        """Where the weight lies in a tail (bool, the weight's shape)."""
        return self.tail_sign != 0

    def dequantize(self) -> torch.Tensor:
        """w_q from the codes, in the constants' dtype: equal to ``pwlq(x, ...)`` computed in it."""
        dt = self.scale_centre.dtype
        return _assemble(self.centre_codes.to(dt), self.tail_codes.to(dt), self.tail_sign.to(dt),
                         self.scale_centre, self.scale_tail, self.offset)

    def accumulators(self, op) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three accumulators of a layer with this weight (the paper's Table 1, one breakpoint):
        ``op(centre_codes)``, ``op(tail_sign * tail_codes)`` and ``op(tail_sign)``.

        op: the layer as a function of its weight, linear in it, e.g. ``lambda w: F.conv1d(x_int, w,
        stride=2)`` with integer-valued activations ``x_int``; it is called with float64 weights
        holding integers, so the accumulators are exact integers while they stay below 2^53.
        Returns (centre, tail, offset), each op's output shape.

        Used in :ref:`ch8-sec-what-pwlq-costs-at-inference`.
        """
        if not callable(op):
            raise TypeError(f"op must be a callable taking a weight tensor, got {type(op).__name__}")
        f64 = torch.float64
        return (op(self.centre_codes.to(f64)), op((self.tail_sign * self.tail_codes).to(f64)),
                op(self.tail_sign.to(f64)))

    def combine(self, centre: torch.Tensor, tail: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """The layer's output from its three accumulators: scale_centre * centre + scale_tail * tail
        + offset * offset, per output channel, in float64.

        centre, tail, offset: as :meth:`accumulators` returns them, output channels on dim 1
        (convolutions, linear layers; any dim for a per-tensor decomposition). Returns their shape.

        Used in :ref:`ch8-sec-what-pwlq-costs-at-inference`.
        """
        def per_channel(c):
            c = c.double()
            if c.numel() == 1:
                return c.reshape(())
            shape = [1] * centre.ndim
            shape[1] = c.numel()
            return c.reshape(shape)
        return (per_channel(self.scale_centre) * centre.double() + per_channel(self.scale_tail) * tail.double()
                + per_channel(self.offset) * offset.double())


def pwlq_decompose(x: torch.Tensor, bits: int, m, p, *, axis: int | None = 0,
                   scheme: str = "signed_centre") -> PWLQDecomposition:
    """The integer codes and per-channel constants of ``pwlq(x, bits, m, p)`` (Eq. 3), split so
    that an integer kernel can compute with them (Fang et al. 2020, §3 and Table 1).

    Arguments as :func:`pwlq`. Returns a :class:`PWLQDecomposition` whose ``dequantize()`` equals
    ``pwlq(x, bits, m, p, axis=axis, scheme=scheme)`` in float32 (float64 for float64 x) exactly.

    Used in :ref:`ch8-sec-what-pwlq-costs-at-inference`.
    """
    rows, bits, m, p, ax = _prepare(x, bits, m, p, axis, scheme)
    cc, tc, ts, sc, st = _pieces(rows, bits, m, p, scheme)
    shape = [1] * x.ndim
    if ax is not None:
        shape[ax] = x.shape[ax]

    def const(t):
        return t.expand(rows.shape[0], 1).reshape(shape)

    return PWLQDecomposition(
        centre_codes=_from_rows(cc, x, ax).to(torch.int32),
        tail_codes=_from_rows(tc, x, ax).to(torch.int32),
        tail_sign=_from_rows(ts, x, ax).to(torch.int8),
        scale_centre=const(sc), scale_tail=const(st), offset=const(p))

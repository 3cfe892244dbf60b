"""Logarithmic, power-of-two and additive powers-of-two grids, their quantizers and gradients.

Three non-uniform grids that put more levels near zero and turn multiplications into shifts:

* LogQuant (Miyashita, Lee, Murmann 2016, arXiv 1603.01025): x -> sign(x) 2^Clip(Round(log2(abs(x))));
* PoT (Li, Dong, Wang, ICLR 2020, arXiv 1909.13144, "Q^p"): alpha * {0, +-2^-j}, the same set as
  :func:`refimpl.quant.pow2_levels`;
* APoT (the same paper, "Q^a"): every level a sum of n power-of-two terms of k bits each,
  built as the authors' ``build_power_value`` (``yhhhli/APoT_Quantization`` @``c31dd73``,
  ``ImageNet/models/quant_layer.py``).

PoT and APoT quantize with a learnable clipping threshold alpha and the paper's reparameterised
clipping function (RCF); all three pass the gradient of x straight through inside the range.
"""

from __future__ import annotations

import numbers

import torch

from .._checks import check_float_tensor, check_int, check_positive
from ..numerics import sqrt
from .nonuniform import pow2_levels, quantize_to_levels

__all__ = ["log_levels", "log_quant", "bitshift_dot", "pot_levels", "pot_quant", "apot_levels", "apot_quant",
           "apot_terms", "apot_weight_terms", "apot_alpha_search", "weight_norm"]

_FSR_RANGE = (-64, 64)


# --------------------------------------------------------------------------------------------
# LogQuant (Miyashita et al. 2016)
# --------------------------------------------------------------------------------------------
def _check_log_args(bits, fsr) -> tuple[int, int]:
    bits = check_int(bits, "bits", 1, 8)
    fsr = check_int(fsr, "fsr", *_FSR_RANGE)
    return bits, fsr


def log_levels(bits: int, fsr: int) -> torch.Tensor:
    """The levels LogQuant can return: 0 and +-2^e for e = FSR - 2^bitwidth .. FSR, sorted.

    Miyashita et al. 2016, the LogQuant definition (equation numbers not available here): x~ = Clip(Round(log2(abs(x))), FSR - 2^bitwidth, FSR). The
    clip is inclusive at both ends, so 2^bits + 1 exponents per sign (as the definition reads; a
    bits-wide exponent code holds 2^bits of them). The sign is stored apart from the exponent.
    bits: 1..8; fsr: integer -64..64 (log2 of the largest level). Returns a float64 1-d tensor of
    2 (2^bits + 1) + 1 increasing levels.

    Used in :ref:`ch10-sec-logquant`.
    """
    bits, fsr = _check_log_args(bits, fsr)
    mags = torch.pow(2.0, torch.arange(fsr - 2 ** bits, fsr + 1, dtype=torch.float64))
    return torch.cat([-mags.flip(0), torch.zeros(1, dtype=torch.float64), mags])


def log_quant(x: torch.Tensor, bits: int, fsr: int, *, return_codes: bool = False):
    """LogQuant: 0 where x = 0, else sign(x) 2^x~ with x~ = Clip(Round(log2(abs(x))), FSR - 2^bits, FSR).

    Miyashita et al. 2016, the LogQuant definition (the rounding is in the log domain, so the
    boundary between 2^e and 2^(e+1) is 2^(e + 1/2), not their midpoint). Backward: the identity
    straight-through estimator inside the range (``|x| <= 2^FSR``), zero beyond it.
    x: floating tensor, any shape and float dtype (computed in float64; levels beyond the dtype's
    range overflow or flush as a cast does). bits: 1..8 exponent bits; fsr: integer -64..64.
    Returns x's shape and dtype; with ``return_codes`` also (sign, exponent): int8 sign in
    {-1, 0, 1} and int64 exponent x~ (FSR - 2^bits where x = 0), for :func:`bitshift_dot`.

    Used in :ref:`ch10-sec-logquant`.
    """
    check_float_tensor(x, "x")
    bits, fsr = _check_log_args(bits, fsr)
    v = x.detach().double()
    mag = v.abs()
    nonzero = mag > 0
    e = torch.round(torch.log2(torch.where(nonzero, mag, torch.ones_like(mag))))
    e = e.clamp(fsr - 2 ** bits, fsr)
    sign = torch.sign(v)
    q = torch.where(nonzero, sign * torch.pow(2.0, e), torch.zeros_like(v))
    inside = mag <= 2.0 ** fsr
    base = torch.where(inside, x, x.detach())
    out = base + (q.to(x.dtype) - base).detach()
    if not return_codes:
        return out
    exponent = torch.where(nonzero, e, torch.full_like(e, fsr - 2 ** bits)).to(torch.int64)
    return out, (sign.to(torch.int8), exponent)


def bitshift_dot(w_codes, x_int: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The dot product w . x of log-quantized weights and integer inputs, with shifts and adds only.

    Miyashita et al. 2016 (the bitshift dot product the log representation enables): each
    product w_i x_i = s_i 2^(e_i) x_i is x_i shifted by e_i. Shifts are made non-negative by a
    common offset, the smallest exponent e_min: acc = sum_i s_i (x_i << (e_i - e_min)), and
    w . x = acc * 2^e_min exactly (integer arithmetic; ``float(acc) * 2**shift`` is exact while
    ``|acc| < 2^53``).
    w_codes: (sign, exponent) integer tensors of one shape (..., n), as ``log_quant(...,
    return_codes=True)`` gives; x_int: integer tensor broadcasting against them over the last
    dimension. Returns (acc int64 of the broadcast shape without the last dimension, shift int).
    Raises ValueError if the shifted sums could overflow int64.

    Used in :ref:`ch10-sec-logquant`.
    """
    if not (isinstance(w_codes, (tuple, list)) and len(w_codes) == 2):
        raise TypeError("w_codes must be a (sign, exponent) pair of integer tensors")
    sign, exponent = w_codes
    for name, t in (("w_codes sign", sign), ("w_codes exponent", exponent), ("x_int", x_int)):
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer torch.Tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if sign.shape != exponent.shape:
        raise ValueError(f"w_codes sign and exponent must have one shape, got {tuple(sign.shape)} and "
                         f"{tuple(exponent.shape)}")
    if sign.numel() == 0:
        raise ValueError("w_codes is empty")
    if bool((sign.abs() > 1).any()):
        raise ValueError("w_codes sign must hold -1, 0 or 1")
    e = exponent.to(torch.int64)
    shift = int(e.min())
    rel = e - shift
    x = x_int.to(torch.int64)
    n = max(sign.shape[-1] if sign.ndim else 1, x.shape[-1] if x.ndim else 1)
    xmax = int(x.abs().max()) if x.numel() else 0
    # every shifted term and their sum must fit int64
    if xmax and (xmax.bit_length() + int(rel.max()) + n.bit_length()) > 62:
        raise ValueError(f"the shifted products overflow int64 (max |x_int| = {xmax}, exponent spread "
                         f"{int(rel.max())}, n = {n}); use fewer exponent bits or smaller inputs")
    terms = sign.to(torch.int64) * torch.bitwise_left_shift(x, rel)
    return terms.sum(dim=-1), shift


# --------------------------------------------------------------------------------------------
# PoT and APoT grids (Li et al. 2020)
# --------------------------------------------------------------------------------------------
def _check_alpha_value(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__} {alpha!r}")
    return check_positive(alpha, "alpha")


def _apot_magnitudes(mbits: int, k: int) -> torch.Tensor:
    """The authors' ``build_power_value(B=mbits)``, generalised to base bit-width k: sorted, max 1."""
    if k == 2 and mbits % 2:
        # odd B (official code, B = 3, 5): n full 2-bit terms and one 1-bit term, which takes the
        # first exponent of the last round
        n, extra = (mbits - 1) // 2, 1
    elif mbits % k:
        raise ValueError(f"k must divide the magnitude bit-width ({mbits}) or be 2, got k={k}")
    else:
        n, extra = mbits // k, 0
    terms = [[0.0] for _ in range(n + extra)]
    rounds = 2 ** k - 1
    e = 0
    # p_i in {0, 2^-(i+1), 2^-(i+1+n), ...}: exponents are dealt to the terms in turn
    for r in range(rounds):
        order = ([n] if extra and r == rounds - 1 else []) + list(range(n))
        for j in order:
            e += 1
            terms[j].append(2.0 ** -e)
    sums = {0.0}
    for t in terms:
        sums = {s + p for s in sums for p in t}
    v = torch.tensor(sorted(sums), dtype=torch.float64)
    return v / v.max()


def _apot_term_counts(mbits: int, k: int) -> torch.Tensor:
    """Power-of-two terms of each magnitude of :func:`_apot_magnitudes`, in its order.

    Every exponent is dealt to one term only, so a level's terms are the set bits of its
    unnormalised sum: sum * 2^e_max is an integer whose popcount counts them.
    """
    mags = _apot_magnitudes(mbits, k)
    # exponents run 1..e_max, so the sums are integer multiples of the smallest one, 2^-e_max
    ints = torch.round(mags / mags[mags > 0].min()).to(torch.int64)
    return torch.tensor([bin(int(i)).count("1") for i in ints], dtype=torch.int64)


def _signed_grid(mags: torch.Tensor, signed: bool) -> torch.Tensor:
    return torch.cat([-mags[1:].flip(0), mags]) if signed else mags


def apot_levels(bits: int, k: int, alpha: float, *, signed: bool = True) -> torch.Tensor:
    """The APoT grid Q^a(alpha, kn): levels gamma * sum_i p_i, scaled so the top level is alpha.

    Li et al. 2020, the APoT level set Q^a (equation numbers not available here): p_i in {0, 2^-i, 2^-(i+n), ..., 2^-(i+(2^k-2)n)}, i = 0..n-1,
    n = B / k terms of base bit-width k. Built as the authors' ``build_power_value``
    (``yhhhli/APoT_Quantization`` @``c31dd73``, ``ImageNet/models/quant_layer.py``): B = bits - 1
    magnitude bits and a sign for ``signed`` (weights), B = bits for unsigned (activations); an
    odd B with k = 2 adds a 1-bit term that takes the first exponent of the last round (their
    B = 3, 5). k = 1 gives a uniform grid, k = B the PoT grid. 2^B magnitudes (0 included).
    bits: 2..8; k: 1..max(B, 2) dividing B (or 2); alpha > 0. Returns float64 1-d increasing levels:
    2^bits - 1 of them (signed) or 2^bits (unsigned).

    Used in :ref:`ch10-sec-the-grids`.
    """
    bits = check_int(bits, "bits", 2, 8)
    if not isinstance(signed, bool):
        raise TypeError(f"signed must be a bool, got {signed!r}")
    mbits = bits - 1 if signed else bits
    k = check_int(k, "k", 1, max(mbits, 2))
    alpha = _check_alpha_value(alpha)
    return _signed_grid(alpha * _apot_magnitudes(mbits, k), signed)


def apot_terms(bits: int, k: int, *, signed: bool = True) -> torch.Tensor:
    """How many power-of-two terms each level of :func:`apot_levels` (bits, k) is a sum of.

    Li et al. 2020, Q^a: a level gamma * sum_i p_i has one term per nonzero p_i, so multiplying
    an integer x by it costs that many shifts of x and one add fewer (the common factor
    gamma * alpha is applied once per output, as a uniform grid's scale is). k = 1 (the uniform
    grid) counts the set bits of the level's integer code; k = B (PoT, :func:`pot_levels`) gives
    1 for every nonzero level. The sign is not counted (it selects add or subtract).
    bits, k, signed: as :func:`apot_levels`. Returns an int64 1-d tensor, one count per level of
    ``apot_levels(bits, k, alpha, signed=signed)`` in its order (0 for the zero level).

    Used in :ref:`ch10-sec-what-a-multiply-costs`.
    """
    bits = check_int(bits, "bits", 2, 8)
    if not isinstance(signed, bool):
        raise TypeError(f"signed must be a bool, got {signed!r}")
    mbits = bits - 1 if signed else bits
    k = check_int(k, "k", 1, max(mbits, 2))
    counts = _apot_term_counts(mbits, k)
    return torch.cat([counts[1:].flip(0), counts]) if signed else counts


def pot_levels(bits: int, alpha: float, *, signed: bool = True) -> torch.Tensor:
    """The PoT grid Q^p(alpha, b) = alpha * {0, +-2^-j}, the largest level alpha.

    Li et al. 2020, the PoT level set Q^p, as the authors' ``build_power_value(additive=False)`` builds it:
    B = bits - 1 magnitude bits for ``signed`` (B = bits unsigned) give 2^B magnitudes, 0 and
    2^-j for j = 0 .. 2^B - 2. The paper's formula lists one more, 2^-(2^(b-1) - 1), which a
    b-bit code cannot hold; signed, this is :func:`refimpl.quant.pow2_levels` (bits, alpha).
    bits: 2..16 (signed), 2..15 (unsigned); alpha > 0. Returns float64 1-d increasing levels.

    Used in :ref:`ch10-sec-the-grids`.
    """
    if not isinstance(signed, bool):
        raise TypeError(f"signed must be a bool, got {signed!r}")
    bits = check_int(bits, "bits", 2, 16 if signed else 15)
    alpha = _check_alpha_value(alpha)
    if signed:
        return pow2_levels(bits, alpha)
    grid = pow2_levels(bits + 1, alpha)
    return grid[grid >= 0]


class _ClippedLevels(torch.autograd.Function):
    """alpha * Pi(clip(x / alpha, lo, 1)) with STE for x and RCF (or PACT-style) gradient for alpha."""

    @staticmethod
    def forward(ctx, x, alpha, unit_levels, lo, rcf):
        a = alpha.detach().double()
        u = x.detach().double() / a
        c = u.clamp(lo, 1.0)
        q = quantize_to_levels(c, unit_levels)
        inside = (u >= lo) & (u <= 1.0)
        ctx.save_for_backward(inside, q, c)
        ctx.rcf = rcf
        ctx.alpha_shape, ctx.alpha_dtype = alpha.shape, alpha.dtype
        return (a * q).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        inside, q, c = ctx.saved_tensors
        gx = ga = None
        if ctx.needs_input_grad[0]:
            gx = grad * inside.to(grad.dtype)
        if ctx.needs_input_grad[1]:
            # RCF (Li et al. 2020): sign(x) beyond alpha (the clipped value), q(x/a) - x/a inside
            inner = (q - c) if ctx.rcf else torch.zeros_like(q)
            d = torch.where(inside, inner, c)
            ga = (grad.double() * d).sum_to_size(ctx.alpha_shape).to(ctx.alpha_dtype)
        return gx, ga, None, None, None


def _as_alpha(alpha, x: torch.Tensor) -> torch.Tensor:
    if isinstance(alpha, torch.Tensor):
        check_float_tensor(alpha, "alpha")
        if bool((alpha.detach() <= 0).any()):
            raise ValueError("alpha must be > 0")
        return alpha
    return torch.tensor(_check_alpha_value(alpha), dtype=torch.float64, device=x.device)


def _clipped_levels(x, alpha, unit_levels, signed, rcf):
    check_float_tensor(x, "x")
    if not isinstance(rcf, bool):
        raise TypeError(f"rcf must be a bool, got {rcf!r}")
    a = _as_alpha(alpha, x)
    return _ClippedLevels.apply(x, a, unit_levels.to(x.device), -1.0 if signed else 0.0, rcf)


def pot_quant(x: torch.Tensor, bits: int, alpha, *, signed: bool = True, rcf: bool = True) -> torch.Tensor:
    """x on the PoT grid (:func:`pot_levels`), clipped at alpha, nearest level.

    Li et al. 2020, Q^p with the reparameterised clipping function (RCF): alpha * Pi(clip(x / alpha)).
    Backward: gradient 1 for x inside [-alpha, alpha] ([0, alpha] unsigned), 0 outside; for a
    tensor alpha, d/d alpha = sign(x) outside and Pi(x / alpha) - x / alpha inside (``rcf=False``:
    0 inside, clipping without reparameterisation, the paper's Table 3 "RCF" ablation).
    x: floating tensor, any shape and dtype (computed in float64); alpha: number or floating
    tensor > 0 broadcasting against x (learnable). Returns x's shape and dtype.
    """
    return _clipped_levels(x, alpha, pot_levels(bits, 1.0, signed=signed), signed, rcf)


def apot_quant(x: torch.Tensor, bits: int, alpha, k: int = 2, *, signed: bool = True,
               rcf: bool = True) -> torch.Tensor:
    """x on the APoT grid (:func:`apot_levels`), clipped at alpha, nearest level.

    Li et al. 2020, Q^a with the reparameterised clipping function (RCF):
    alpha * Pi_{Q^a(1, b)}(clip(x / alpha)). Backward: gradient 1 for x inside the range, 0
    outside; for a tensor alpha, d/d alpha = sign(x) outside and Pi(x / alpha) - x / alpha inside
    (``rcf=False``: 0 inside). Weights: ``signed=True`` (b - 1 magnitude bits and a sign);
    activations after ReLU: ``signed=False``.
    x: floating tensor, any shape and dtype (computed in float64); alpha: number or floating
    tensor > 0 broadcasting against x; k: base bit-width (default 2, the paper's). Returns x's
    shape and dtype.

    Used in :ref:`ch10-sec-the-grids`.
    """
    return _clipped_levels(x, alpha, apot_levels(bits, k, 1.0, signed=signed), signed, rcf)


def weight_norm(w: torch.Tensor) -> torch.Tensor:
    """Weight normalisation: (w - mean(w)) / std(w), recomputed every forward.

    Li et al. 2020, weight normalisation (the authors' code: ``weight.std()``, the unbiased estimate).
    Differentiable through the mean and the standard deviation. w: floating tensor with at least
    two elements, not constant; computed in float32 for float16/bfloat16. Returns w's shape and dtype.

    Used in :ref:`ch10-sec-the-grids`.
    """
    check_float_tensor(w, "w")
    if w.numel() < 2:
        raise ValueError(f"w needs at least two elements, got {w.numel()}")
    v = w if w.dtype in (torch.float32, torch.float64) else w.float()
    centred = v - v.mean()
    var = (centred * centred).sum() / (v.numel() - 1)
    if not bool(var > 0):
        raise ValueError("w is constant; its standard deviation is 0")
    return (centred / sqrt(var)).to(w.dtype)


def apot_weight_terms(x: torch.Tensor, bits: int, alpha: float, k: int = 2) -> torch.Tensor:
    """How many power-of-two terms the APoT level of each value of x is a sum of (:func:`apot_terms`
    of the level :func:`apot_quant` (x, bits, alpha, k) rounds it to; signed grid).

    Li et al. 2020: the shifts of an integer multiply by that weight (one add fewer). x: floating
    tensor, any shape; alpha > 0; bits, k as :func:`apot_levels`. Returns int64, x's shape.

    Used in :ref:`ch10-sec-what-a-multiply-costs`.
    """
    check_float_tensor(x, "x")
    alpha = _check_alpha_value(alpha)
    levels = apot_levels(bits, k, 1.0)
    terms = apot_terms(bits, k)
    q = quantize_to_levels((x.detach() / alpha).clamp(-1, 1).double(), levels.to(x.device))
    return terms.to(x.device)[torch.searchsorted(levels.to(x.device), q)]


def apot_alpha_search(x: torch.Tensor, bits: int, k: int, alphas) -> tuple[float, float]:
    """The clipping threshold alpha among ``alphas`` with the least squared error of
    ``apot_quant(x, bits, alpha, k)`` (signed grid): (alpha, its sum of squared errors).

    A grid search, as the range setting of chapter 3 but for the non-uniform grids (Li et al. 2020
    learn alpha by RCF instead; this gives each grid its best alpha to compare their errors).
    x: floating tensor; alphas: 1-d tensor or sequence of candidate values > 0. Ties: the first.

    Used in :ref:`ch10-sec-the-grids`.
    """
    check_float_tensor(x, "x")
    alphas = torch.as_tensor(alphas, dtype=torch.float64).flatten()
    if alphas.numel() == 0 or bool((alphas <= 0).any()):
        raise ValueError("alphas must be a non-empty set of values > 0")
    errs = torch.stack([((apot_quant(x, bits, float(a), k) - x) ** 2).sum() for a in alphas])
    i = int(errs.argmin())
    return float(alphas[i]), float(errs[i])

"""Differentiable Soft Quantization, DSQ (Gong et al., ICCV 2019, "Differentiable Soft
Quantization: Bridging Full-Precision and Low-Bit Neural Networks", arXiv 1908.05033), as pure
tensor math.

DSQ replaces the staircase of a b-bit uniform quantizer on a clipping range [l, u] by a soft
staircase made of tanh pieces, one per interval, which hardens as α -> 0. With
Δ = (u - l) / (2^b - 1), interval P_i = [l + iΔ, l + (i + 1)Δ) (i = 0 .. 2^b - 2) and centre
m_i = l + (i + 1/2)Δ, the soft quantizer reads ::

    φ(x)   = s · tanh(k (x - m_i))                        for x in P_i
    s      = 1 / (1 - α),      k = (1 / Δ) · log(2/α - 1)
    Q_S(x) = l                                            for x < l
           = u                                            for x > u
           = l + Δ (i + (φ(x) + 1) / 2)                   for x in P_i

Why φ reaches ±1 at the ends of its interval: at x - m_i = ±Δ/2,
tanh(kΔ/2) = tanh(log(2/α - 1) / 2) = (y - 1)/(y + 1) with y = 2/α - 1 (tanh(log(y)/2) =
(y - 1)/(y + 1)), which is (2/α - 2)/(2/α) = 1 - α; so φ(m_i ± Δ/2) = ±(1 - α)/(1 - α) = ±1,
Q_S is continuous across interval boundaries and equal to the grid point l + iΔ there. α is the
gap between tanh at the interval's end and its asymptote 1: the smaller α, the steeper the tanh
and the closer Q_S is to rounding (as α -> 0, φ -> sign(x - m_i)). The hardening is slow: k grows
like log(2/α), so the mean gap between Q_S and rounding over an interval is about
Δ·ln(2)/log(2/α) (about Δ/20 still at α = 1e-6).

Provenance. The paper's body was not available when this was written; the definitions above are
the ones of the book's issue 14, which match the reimplementation ``ricky40403/DSQ``
(``DSQConv.py``, "Algorithm 1"; s, k, φ and Δ as above) and MQBench's ``dsq`` (k =
log((s + 1)/(s - 1)), the same value since (s + 1)/(s - 1) = 2/α - 1). A secondary transcription
of the paper (a Chinese blog post reposted in the code index, "量化训练之补偿STE：DSQ和QuantNoise")
numbers them: Eq. 1, φ(x) = s·tanh(k(x - m_i)) with s = 1/tanh(kΔ/2); Eq. 2, Q_S; Eq. 3,
α = 1 - tanh(kΔ/2) = 1 - 1/s; Eq. 4, k = (1/Δ)·log(2/α - 1); Eq. 5, φ written with α; Eq. 6,
α learned by minimising the task loss subject to ``||α||_2 < λ`` (λ not given there). Those
numbers are used below, as that source gives them. §3.4 (l, u and α learned by
back-propagation) is the section the issue cites. Here their gradients are the derivatives of
the definition (written out in one backward pass, and tested against autograd through the
definition; the interval index is piecewise constant and has none). The training forward is Q_S itself (the paper's Fig. 1 caption, as quoted by a
review: DSQ is applied during training and "can completely convert to the hard uniform
quantization by sign operation" after it); ``dsq_hard`` is what evaluation uses, and
``dsq_ste`` is MQBench's released variant (hard forward, soft gradient).
"""

from __future__ import annotations

import torch

from .._checks import check_float_tensor, check_int

__all__ = ["dsq", "dsq_hard", "dsq_phi", "dsq_ste"]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # half and bfloat16 lose the tanh's shape near the interval ends; float64 stays float64
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _as_tensor(v, name: str, like: torch.Tensor) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return check_float_tensor(v, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a float torch.Tensor or a number, got {type(v).__name__}")
    # a number follows x's precision (float64 keeps an alpha like 1e-50 from flushing to 0)
    return torch.tensor(float(v), device=like.device,
                        dtype=torch.float64 if like.dtype == torch.float64 else torch.float32)


def _checked(x, lower, upper, bits, levels):
    """(lower, upper, n): the checked range and the number of intervals n = levels - 1."""
    check_float_tensor(x, "x")
    bits = check_int(bits, "bits", 1, 8)
    levels = 2 ** bits if levels is None else check_int(levels, "levels", 2, 2 ** bits)
    lower, upper = _as_tensor(lower, "lower", x), _as_tensor(upper, "upper", x)
    if not bool((lower.detach() < upper.detach()).all()):
        raise ValueError("lower must be < upper everywhere (the clipping range [lower, upper] of DSQ)")
    return lower, upper, levels - 1


def _check_alpha(alpha, x) -> torch.Tensor:
    alpha = _as_tensor(alpha, "alpha", x)
    a = alpha.detach()
    if not bool(((a > 0) & (a < 1)).all()):
        raise ValueError(f"alpha must lie in the open interval (0, 1), got {a.flatten()[:4].tolist()}")
    return alpha


def _interval(x, lower, upper, n):
    """(Δ, i, m_i) of x (already clamped to [l, u]) in the compute dtype; n intervals."""
    delta = (upper - lower) / n
    # floor has zero gradient: the index is piecewise constant in x, l and u
    i = torch.floor((x - lower) / delta).clamp(0, n - 1)
    return delta, i, lower + (i + 0.5) * delta


def dsq_phi(x: torch.Tensor, lower, upper, alpha, bits: int, levels: int | None = None) -> torch.Tensor:
    """DSQ's soft function φ(x) = s·tanh(k(x - m_i)) (Gong et al. 2019, Eq. 1 and 5), in [-1, 1] inside [l, u].

    x: any shape, float dtype; lower, upper, alpha: tensors (or numbers) broadcastable to x, with
    lower < upper and 0 < alpha < 1. x is clamped to [l, u] first (outside, Q_S is l or u and φ is
    not used). ``levels`` as in ``dsq``. Returns x's shape and dtype (computed in float32, or
    float64 for float64 inputs).

    Used in :ref:`ch9-sec-the-soft-staircase`.
    """
    lower, upper, n = _checked(x, lower, upper, bits, levels)
    alpha = _check_alpha(alpha, x)
    dt = _compute_dtype(x, lower, upper, alpha)
    xc, lo, up, al = x.to(dt), lower.to(dt), upper.to(dt), alpha.to(dt)
    xc = torch.minimum(torch.maximum(xc, lo), up)
    return _phi(xc, lo, up, al, n)[0].to(x.dtype)


def _phi(xc, lo, up, al, n):
    delta, i, m = _interval(xc, lo, up, n)
    s = 1 / (1 - al)
    k = torch.log(2 / al - 1) / delta
    return s * torch.tanh(k * (xc - m)), delta, i


def dsq(x: torch.Tensor, lower, upper, alpha, bits: int, levels: int | None = None) -> torch.Tensor:
    """DSQ's soft quantizer Q_S(x) (Gong et al. 2019, Eq. 2 with Eq. 4-5): l below l, u above u, else
    l + Δ(i + (φ(x) + 1)/2) with Δ = (u - l)/(2^b - 1) and φ = s·tanh(k(x - m_i)), s = 1/(1 - α),
    k = log(2/α - 1)/Δ (module docstring).

    x: any shape, float dtype (float16/bfloat16/float32/float64); lower, upper, alpha: tensors
    (learnable; or numbers) broadcastable to x, e.g. shape (C, 1, 1, 1) for per-channel conv
    weights, with lower < upper and 0 < alpha < 1; bits in 1..8. Differentiable in x, lower,
    upper and alpha (§3.4): the derivatives of this definition, written out (equal to autograd
    through it, which tests/test_dsq.py checks; one pass, cheaper in training). ``levels``: the
    number of grid points from l to u, 2^b by default (the paper's); 2^b - 1 for a narrow-range
    grid such as TensorRT's weights [-127, 127], so that Δ = (u - l)/(levels - 1). Returns x's
    shape and dtype (computed in float32, or float64 when any input is float64).

    Used in :ref:`ch9-sec-the-soft-staircase`.
    """
    lower, upper, n = _checked(x, lower, upper, bits, levels)
    alpha = _check_alpha(alpha, x)
    dt = _compute_dtype(x, lower, upper, alpha)
    return _SoftQuantizer.apply(x.to(dt), lower.to(dt), upper.to(dt), alpha.to(dt), n).to(x.dtype)


class _SoftQuantizer(torch.autograd.Function):
    """Q_S with its derivatives written out (one pass instead of autograd's graph of ~20 ops).

    Inside [l, u], with z = k(x - m_i), t = tanh(z), φ = s t and c = (Δ/2) s (1 - t²):
    dQ/dx = c k; dQ/du = (i + (φ + 1)/2)/n + c dz/du, dQ/dl = 1 - (i + (φ + 1)/2)/n + c dz/dl
    with dz/du = -k (x - m_i)/(nΔ) - k (i + 1/2)/n and dz/dl = k (x - m_i)/(nΔ) - k (1 - (i + 1/2)/n)
    (Δ = (u - l)/n, m_i = l + (i + 1/2)Δ, i piecewise constant); dQ/dα = (Δ/2)(s² t + s (1 - t²)
    (x - m_i) dk/dα) with dk/dα = -2/(α (2 - α) Δ). Below l: dQ/dl = 1; above u: dQ/du = 1; the
    rest 0. tests/test_dsq.py checks this against autograd through the definition and against
    finite differences.
    """

    @staticmethod
    def forward(ctx, xf, lo, up, al, n):
        # the soft branch on x clamped into [l, u]; where() then picks l or u outside
        xc = torch.minimum(torch.maximum(xf, lo), up)
        delta = (up - lo) / n
        i = torch.floor((xc - lo) / delta).clamp(0, n - 1)
        d = xc - (lo + (i + 0.5) * delta)
        s = 1 / (1 - al)
        log_term = torch.log(2 / al - 1)
        k = log_term / delta
        t = torch.tanh(k * d)
        inside = lo + delta * (i + (s * t + 1) / 2)
        below, above = xf < lo, xf > up
        out = torch.where(below, lo.expand_as(inside), torch.where(above, up.expand_as(inside), inside))
        ctx.save_for_backward(lo, up, al, delta, i, d, s, k, t, below, above)
        ctx.n = n
        return out

    @staticmethod
    def backward(ctx, g):
        lo, up, al, delta, i, d, s, k, t, below, above = ctx.saved_tensors
        n = ctx.n
        inner = ~(below | above)
        c = 0.5 * delta * s * (1 - t * t)
        level = (i + (s * t + 1) / 2) / n
        grads = [None] * 5
        if ctx.needs_input_grad[0]:
            grads[0] = torch.where(inner, g * c * k, torch.zeros_like(g))
        if ctx.needs_input_grad[1]:
            dz_dl = k * d / (n * delta) - k * (1 - (i + 0.5) / n)
            dl = torch.where(inner, 1 - level + c * dz_dl, below.to(g.dtype))
            grads[1] = (g * dl).sum_to_size(lo.shape)
        if ctx.needs_input_grad[2]:
            dz_du = -k * d / (n * delta) - k * (i + 0.5) / n
            du = torch.where(inner, level + c * dz_du, above.to(g.dtype))
            grads[2] = (g * du).sum_to_size(up.shape)
        if ctx.needs_input_grad[3]:
            dk_da = -2 / (al * (2 - al) * delta)
            da = 0.5 * delta * (s * s * t + s * (1 - t * t) * d * dk_da)
            grads[3] = torch.where(inner, g * da, torch.zeros_like(g)).sum_to_size(al.shape)
        return tuple(grads)


def dsq_hard(x: torch.Tensor, lower, upper, bits: int, levels: int | None = None) -> torch.Tensor:
    """The hard quantizer DSQ deploys (the α -> 0 limit of ``dsq``): l + Δ·round((clip(x, l, u) - l)/Δ),
    Δ = (u - l)/(2^b - 1) (Gong et al. 2019, §3; round half to even).

    x: any shape, float dtype; lower, upper: tensors or numbers broadcastable to x, lower < upper;
    bits in 1..8, ``levels`` as in ``dsq``. Returns x's shape and dtype; no gradient reaches x (round), lower and upper get
    autograd's (evaluation only). On the grid of an integer zero point it equals ``fake_quant``
    except at exact ties (x half-way between levels), where the rounding of (x - l)/Δ decides.

    Used in :ref:`ch9-sec-the-soft-staircase`.
    """
    lower, upper, n = _checked(x, lower, upper, bits, levels)
    dt = _compute_dtype(x, lower, upper)
    xf, lo, up = x.to(dt), lower.to(dt), upper.to(dt)
    delta = (up - lo) / n
    code = torch.round((torch.minimum(torch.maximum(xf, lo), up) - lo) / delta).clamp(0, n)
    return (lo + delta * code.detach()).to(x.dtype)


def dsq_ste(x: torch.Tensor, lower, upper, alpha, bits: int, levels: int | None = None) -> torch.Tensor:
    """DSQ as MQBench's released code trains it: the hard quantizer forward, the soft quantizer's
    gradient backward (``soft + (hard - soft).detach()``).

    MQBench (``mqbench/fake_quantize/dsq.py``, whose DSQ a first author of Gong et al. 2019 maintains)
    rounds Q_S in the code domain with a straight-through round: the value is ``dsq_hard`` (the
    rounded soft code is the nearest code, φ having the sign of x - m_i), the gradient that of
    ``dsq`` (§3.4). The paper's own training forward is the soft Q_S (its Fig. 1: DSQ "converts to
    the hard uniform quantization" after training); this is the released variant, offered because
    it has no train/eval gap. Arguments, shapes and dtypes as ``dsq``; the forward equals
    ``dsq_hard`` up to one float rounding of soft + (hard - soft).

    Used in :ref:`ch9-sec-training-with-dsq`.
    """
    soft = dsq(x, lower, upper, alpha, bits, levels)
    hard = dsq_hard(x.detach(), lower.detach() if isinstance(lower, torch.Tensor) else lower,
                    upper.detach() if isinstance(upper, torch.Tensor) else upper, bits, levels)
    return soft + (hard - soft).detach()

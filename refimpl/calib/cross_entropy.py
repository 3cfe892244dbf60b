"""The range minimising the cross-entropy between a classifier's softmax and that of its
fake-quantized logits (white paper, Nagel et al. 2021, §3.1, "Cross entropy"; book chapter 3).
"""

from __future__ import annotations

import math

import torch

from .._checks import check_float_tensor, normalize_axis
from ..quant import QuantSpec, fake_quant, qparams
from .common import EVAL_BUDGET, check_spec, float32_ranges
from .scale_search import (GRID, code_caps, cover_scale, near_optimal_tasks, polish, relative_tolerance, sorted_kinks,
                           zero_points)

__all__ = ["cross_entropy"]


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
    step = max(1, EVAL_BUDGET // max(per_item, 1))
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
    cap = code_caps(pos, zp_t, spec)
    task = torch.zeros(a.numel(), dtype=torch.int64, device=Z.device)
    lo_t = torch.tensor([lo], dtype=torch.float64, device=Z.device)
    hi_t = torch.tensor([hi], dtype=torch.float64, device=Z.device)
    _, s_k, _, _, _ = sorted_kinks(a, cap, task, lo_t, hi_t)
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
    zps = zero_points(spec)
    top = float(cover_scale(Z.reshape(1, -1), spec)[0]) * 1.02
    if top == 0.0:
        return 0.0, zps[len(zps) // 2] if spec.symmetric else 0
    H = float(-(P * torch.log_softmax(Z, dim=1)).sum(1).mean())
    grid = (top * GRID).to(Z.device)
    # coarse look at every zero point (or every stride-th, for large inputs at many bits)
    stride = max(1, math.ceil(len(zps) * grid.numel() * Z.numel() / (64 * EVAL_BUDGET)))
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
    tol = relative_tolerance(torch.tensor([Z.numel()], device=Z.device))
    top_t = torch.tensor([top], dtype=torch.float64, device=Z.device)
    _, zi, t_lo, t_hi = near_optimal_tasks(kl_grid, grid.unsqueeze(0), top_t, tol)
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

    Used in :ref:`ch3-sec-the-last-layer-cross-entropy`.
    """
    check_spec(spec)
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
    rspec = spec.per_channel(0)
    P = torch.softmax(groups, dim=-1)

    def loss_fn(lo, hi):
        scale, z = qparams(lo, hi, rspec)
        xq = fake_quant(groups, scale, z, rspec)
        return -(P * torch.log_softmax(xq, dim=-1)).sum(-1).mean(-1)

    lo, hi = polish(s, zp, spec, loss_fn)
    return float32_ranges(lo, hi, spec)

"""DoReFa-Net's weight and activation quantizers (Zhou et al. 2016, "DoReFa-Net: Training Low
Bitwidth Convolutional Neural Networks with Low Bitwidth Gradients", arXiv 1606.06160), as pure
tensor math, with the variant MQBench (Li et al. 2021) ran.

The paper's k-bit quantizer of a real r in [0, 1] is quantize_k(r) = round((2^k - 1) r)/(2^k - 1)
with a straight-through gradient. Weights (its Eq. 9) are first squashed and normalised,
t = tanh(w)/max|tanh(w)| in [-1, 1], then w_q = 2 quantize_k(t/2 + 1/2) - 1: 2^k levels
-1 + 2i/(2^k - 1), i = 0 .. 2^k - 1, which have no level at 0 (an even number of levels
symmetric about 0). MQBench keeps the tanh normalisation (per tensor, as the paper) and puts t
on the quantizer's own integer grid instead, with scale and zero point from the min-max of t
recomputed every forward; that is ``dorefa_weight``'s default, the paper's grid is
``paper_grid=True``. Activations are clipped to [0, 1] (the paper's bounded activation) and
quantized with quantize_k; MQBench clips signed activations to [-1, 1] in its hardware settings.

Units: DoReFa's weights are in normalised units, [-1, 1], not the float weight's: a BatchNorm
after the layer absorbs the scale; with statically folded BN there is none, and training must
learn the scale back into the weights the next layer sees. The rounding is always
``refimpl.quant.fake_quant`` on a grid given by a ``QuantSpec``; its gradient is the identity
(straight-through) on the value rounded.
"""

from __future__ import annotations

import torch

from .._checks import check_float_tensor, normalize_axis
from .functional import fake_quant, qparams
from .spec import QuantSpec

__all__ = ["dorefa_normalize", "dorefa_weight", "dorefa_act"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # tanh and the normalisation lose too much in half precision: float32, float64 stays
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_spec(spec) -> QuantSpec:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    return spec


def _straight_through(v: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """``rounded``'s value with the identity gradient to v: v - v.detach() is exactly 0."""
    return rounded + (v - v.detach())


def dorefa_normalize(w: torch.Tensor) -> torch.Tensor:
    """DoReFa's weight normalisation t = tanh(w)/max|tanh(w)| (Zhou et al. 2016, Eq. 9), per tensor.

    Differentiable in w through tanh and the max (autograd: the max passes its gradient to the
    element that attains it). w: floating tensor, any shape; computed in float32 (float64 for
    float64). An all-zero w gives t = 0 (the max is floored at the smallest normal float; MQBench
    adds 1e-5 to it instead, so its abs(t) stays just below 1). Returns w's shape and dtype, values
    in [-1, 1] with max|t| = 1.

    >>> dorefa_normalize(torch.tensor([-2.0, 0.0, 1.0])).abs().max().item()
    1.0
    """
    check_float_tensor(w, "w")
    t = torch.tanh(w.to(_compute_dtype(w)))
    m = t.abs().max().clamp(min=torch.finfo(t.dtype).tiny)
    return (t / m).to(w.dtype)


def dorefa_weight(w: torch.Tensor, spec: QuantSpec, paper_grid: bool = False) -> torch.Tensor:
    """DoReFa's quantized weight: t = ``dorefa_normalize(w)`` on a uniform grid, in [-1, 1].

    ``paper_grid=False`` (MQBench's variant): t on ``spec``'s integer grid with (scale,
    zero_point) = ``qparams(min t, max t, spec)`` (per slice along ``spec.axis`` for a
    per-channel spec; the normalisation stays per tensor), recomputed every call.
    ``paper_grid=True``: the paper's Eq. 9, 2 quantize_k(t/2 + 1/2) - 1 with k = ``spec.bits``
    (2^k levels -1 + 2i/(2^k - 1); signedness, symmetry and axis of ``spec`` are not used).
    Gradient: the rounding is straight-through (identity in t), t is differentiated by autograd.
    Output in normalised units (module docstring). w: floating tensor (float16/bfloat16/float32/
    float64), any shape; spec: a QuantSpec. Returns w's shape and dtype.

    >>> [round(v, 4) for v in dorefa_weight(torch.tensor([-3.0, 0.1, 3.0]), QuantSpec(2), paper_grid=True).tolist()]
    [-1.0, 0.3333, 1.0]

    Used in :ref:`ch11-sec-the-algorithms`.
    """
    check_float_tensor(w, "w")
    _check_spec(spec)
    if not isinstance(paper_grid, bool):
        raise TypeError(f"paper_grid must be a bool, got {paper_grid!r}")
    t = dorefa_normalize(w.to(_compute_dtype(w)))
    if paper_grid:
        n = 2 ** spec.bits - 1
        unit = QuantSpec(spec.bits, signed=False, symmetric=False)
        r = t / 2 + 0.5
        r_q = fake_quant(r.detach(), 1.0 / n, 0, unit)
        return (2 * _straight_through(r, r_q) - 1).to(w.dtype)
    td = t.detach()
    if spec.axis is None:
        lo, hi = td.min(), td.max()
    else:
        axis = normalize_axis(spec.axis, td.ndim, "spec.axis")
        dims = [d for d in range(td.ndim) if d != axis]
        lo, hi = td.amin(dim=dims), td.amax(dim=dims)
    scale, zero_point = qparams(lo, hi, spec)
    return _straight_through(t, fake_quant(td, scale, zero_point, spec)).to(w.dtype)


def dorefa_act(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """DoReFa's activation quantizer: x clipped to [0, 1] (unsigned ``spec``: the paper's bounded
    activation) or [-1, 1] (signed ``spec``: MQBench's hardware setting), on ``spec``'s grid over
    that range (``qparams(lo, hi, spec)``), a fixed grid.

    For an unsigned asymmetric b-bit spec this is the paper's quantize_b(clip(x, 0, 1)) =
    round((2^b - 1) x)/(2^b - 1). Gradient: 1 where lo <= x <= hi, 0 elsewhere (the clip's,
    the rounding straight-through). x: floating tensor, any shape; spec: a per-tensor QuantSpec.
    Returns x's shape and dtype.

    >>> y = dorefa_act(torch.tensor([-0.5, 0.4, 2.0]), QuantSpec(2, signed=False, symmetric=False))
    >>> [round(v, 4) for v in y.tolist()]
    [0.0, 0.3333, 1.0]
    """
    check_float_tensor(x, "x")
    _check_spec(spec)
    if spec.axis is not None:
        raise ValueError(f"spec must be per-tensor (axis None) for activations, got axis={spec.axis}")
    lo = -1.0 if spec.signed else 0.0
    scale, zero_point = qparams(lo, 1.0, spec)
    c = torch.clamp(x.to(_compute_dtype(x)), lo, 1.0)
    return _straight_through(c, fake_quant(c.detach(), scale, zero_point, spec)).to(x.dtype)

"""EasyQuant: scales searched layer by layer to keep the direction of each layer's FP32 output
(Wu, Tang, Zhao, Zhang, Fu, Zhang 2020, "EasyQuant: Post-training Quantization via Scale
Optimization", arXiv 2006.16669).

The paper's quantizer is Q(X, S) = Clip(Round(X * S)) (eq. 1), with S a *multiplier* (codes per
unit; refimpl's ``scale`` is its inverse, the step) and codes clipped to
[-(2^(b-1) - 1), 2^(b-1) - 1]. For layer l with input A_l and weight W_l it maximises (eq. 4)::

    max_{S_w, S_a}  (1/N) sum_i cos(O_l^i, Ô_l^i),   Ô_l = Q(A_l, S_a) * Q(W_l, S_w) / (S_a S_w)

over N calibration samples, where O_l is the FP32 model's output of layer l and A_l comes from
the model whose earlier layers are already quantized and searched (§3.2). The weight scales (one
per output channel) and the activation scale are optimised alternately (§3.2, Algorithm 1), each
over n candidates spaced linearly in [alpha S, beta S] around the max-abs start (§3.2, §4.1:
alpha = 0.5, beta = 2, n = 100, one round, 50 calibration samples).

Two variants (:data:`EASYQUANT_VARIANTS`):

* ``"paper"``: the above. Per layer in network order: the weight scales channel by channel,
  each against the whole-output cosine (eq. 4) with the other channels at their current scales,
  then the scale of the activation the layer reads; ``rounds`` such alternations per layer.
  O_l is the layer's output before its activation function (the "result of the convolution",
  as the first author put it in deepglint/EasyQuant#3).
* ``"released"``: what the authors' released tool ``tools/scale_fine_tuning.py``
  (deepglint/EasyQuant) does, which differs from the paper:

  - it starts from TensorRT-style KL activation ranges (``tools/caffe_quanttable_e2e.py``;
    here :func:`refimpl.calib.kl_tensorrt` with ``ignore_zeros=True``, since that tool drops the
    histogram's first bin, where a ReLU's zeros fall);
  - one pass over all layers' weight scales, then one pass over all activation scales;
  - weight candidates ``np.linspace(1, S, 100)[1:-1]`` (multipliers between 1 and the max-abs
    S: only coarser steps than max-abs), activation candidates ``np.linspace(0.8 S, S,
    200)[1:-1]`` (``n`` and ``2 n`` points here), each beside the current S;
  - the cosine is taken after the layer's ReLU, and for the weights *per output channel*
    (``calcChannelSimilarity``): each channel keeps the candidate with the best mean cosine of
    its own feature map, all channels trying their j-th candidate at once.

Choices made here, where the paper leaves room:

* **Rounding.** Round to nearest (ties to even, as refimpl's quantizers). The paper's §3.1 says
  Round is "ceiling rounding"; we read that as a slip: ceiling shifts every code up by half a
  step on average, a bias no deployed kernel accepts, and the released tool quantizes through
  ncnn, whose ``float2int8`` rounds to nearest (C's ``round``).
* **Grid.** Symmetric and signed, as eq. 1: weights per output channel on
  [-(2^(b-1) - 1), 2^(b-1) - 1]; an activation that is non-negative by construction (after a
  ReLU) on [0, 2^(b-1) - 1], which is the signed grid's non-negative half (refimpl's unsigned
  (b-1)-bit grid), other activations on the signed b-bit grid. :func:`easyquant_config` gives
  this ``QuantConfig``, so that baselines (min-max, MSE, KL) can share it.
* **Which activation scale.** The scale searched with layer l is that of the activation site l
  reads (``refimpl.qmodel.input_sites``). A site read by several layers is searched with the
  first of them in network order; a site that no layer reads (before a residual add, the logits)
  keeps its starting scale; a layer reading several sites searches none.
* **Start.** Max-abs: S_w = (2^(b-1) - 1) / max|W| per channel, S_a = (2^(b-1) - 1) / max|A| over
  the calibration samples in the FP32 model (or KL, ``act_init="kl"``). The current scale is
  always candidate 0 and a candidate must beat the best so far by more than 1e-12 to replace it,
  so a search never lowers a layer's cosine, and ties keep the earlier candidate.
* **Numerics.** Candidates are quantized in the model's dtype exactly as its quantizers will
  quantize them; the layer output and cosines are computed in float64, so that a batched and a
  looped evaluation agree to rounding. A cosine with an all-zero vector is taken after adding
  1e-5 to both vectors (the released tool's ``cosSimilatity``).

Vectorised (``batched=True``): the n candidates of one channel's weight scale are one
convolution with n output channels; the activation candidates are one convolution over n
stacked copies of the input; the released variant's weight candidates of all channels are one
grouped convolution. ``batched=False`` evaluates the same candidates one by one (the reference
that tests/test_easyquant.py and benchmarks/bench_easyquant.py compare against).

Why one module: the two variants share the layer problem, the cosine, the activation search and
the set-up; split in two, one would import the other's private helpers.

Book: the EasyQuant chapter.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_float_tensor, check_int, check_positive
from .._progress import progress_bar
from ..numerics import sqrt
from ..calib import kl_tensorrt
from ..capture import capture_activations
from ..fold import fold_all_bn
from ..graph import BN_LAYERS, activation_kind, fused_relu, nodes_of
from ..qmodel import QuantConfig, act_quantizers, calibrate, input_sites, quant_layers, quantize_model
from ..quant import QuantSpec, fake_quant

__all__ = ["easyquant", "easyquant_config", "easyquant_baseline", "EasyQuantLayer", "EASYQUANT_VARIANTS"]

EASYQUANT_VARIANTS = ("paper", "released")
"""The variants of :func:`easyquant`: the paper's search, and the authors' released tool's."""

_ACT_INITS = (None, "maxabs", "kl")
_TIE = 1e-12            # a candidate must beat the best so far by more than this (float64 noise)
_ZERO_SHIFT = 1e-5      # the released tool's cosine of an all-zero vector
_BUDGET = 1 << 22       # float64 values one batched evaluation may hold
_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


@dataclass
class EasyQuantLayer:
    """What :func:`easyquant` did to one layer.

    ::

        layer:        the layer's name (a Conv/Linear of the BN-folded model).
        site:         the activation site whose scale was searched with it, or None.
        cos_init:     the objective (eq. 4; after the ReLU for "released") at the start of the
                      layer's search: its input from the model as searched so far, its own
                      scales at their starting values.
        cos_final:    the objective at the end of its search.
        weight_ratio: float64 (C,): S_w / S_w0, searched over starting value of the paper's S (a
                      multiplier, 1 / scale): in [alpha, beta] for "paper", in [1 / S_w0, 1]
                      for "released".
        act_ratio:    S_a / S_a0 (in [0.8, 1] for "released"), or None.
        weight_scale: float32 (C,): the searched weight scales (refimpl's step, 1 / S_w).
        act_scale:    the searched activation scale (step), or None.
    """

    layer: str
    site: str | None
    cos_init: float
    cos_final: float
    weight_ratio: torch.Tensor
    act_ratio: float | None
    weight_scale: torch.Tensor
    act_scale: float | None


# --------------------------------------------------------------------------------------------
# Set-up: the grid, the quantized copy, the starting scales
# --------------------------------------------------------------------------------------------
def _folded(model: nn.Module) -> nn.Module:
    """A BN-folded copy of ``model`` in eval mode (a copy even without BatchNorm)."""
    if any(isinstance(m, BN_LAYERS) for m in model.modules()):
        return fold_all_bn(model).eval()
    return copy.deepcopy(model).eval()


def easyquant_config(model: nn.Module, weight_bits: int = 8, act_bits: int = 8) -> QuantConfig:
    """The ``QuantConfig`` of EasyQuant's symmetric grids (eq. 1) for ``model``.

    Weights: per output channel, symmetric, narrow range [-(2^(b-1) - 1), 2^(b-1) - 1].
    Activations: symmetric signed b-bit grids, except at sites that are non-negative by
    construction (after a ReLU), which get [0, 2^(b-1) - 1] (``site_act_bits`` of b - 1 on
    refimpl's unsigned grid): the paper's signed grid restricted to what such a site can hold.
    (A signed activation grid keeps its code -2^(b-1); EasyQuant's scales, (2^(b-1) - 1) / max|A|
    and its search, leave it unused on the calibration data.)
    model: the model to quantize (BatchNorm is folded here to find its sites).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    weight_bits = check_int(weight_bits, "weight_bits", 2, 16)
    act_bits = check_int(act_bits, "act_bits", 2, 16)
    base = QuantConfig(weight_bits=weight_bits, act_bits=act_bits, weight_per_channel=True,
                       weight_symmetric=True, weight_narrow_range=True, act_symmetric=True)
    qm = quantize_model(_folded(model), base)
    unsigned = {name: act_bits - 1 for name, q in act_quantizers(qm).items() if not q.spec.signed}
    return dataclasses.replace(base, site_act_bits=unsigned)


def easyquant_baseline(model: nn.Module, calib_data: torch.Tensor, weight_bits: int = 8, act_bits: int = 8, *,
                       range_method: str = "minmax") -> nn.Module:
    """The baseline EasyQuant is compared with: its grids, scales not searched (Wu et al. 2020, Table 1).

    The BN-folded model quantized on :func:`easyquant_config`'s grids, weights at max-abs per
    output channel, activation ranges by ``range_method`` (``refimpl.qmodel.ACT_RANGES``:
    "minmax", "mse", "percentile", or "kl_tensorrt", the paper's TRT baseline) calibrated on all
    of ``calib_data`` (N, ...). Only the scales differ from :func:`easyquant`'s result.
    Returns the quantized model in eval mode.

    Used in :ref:`ch7-sec-accuracy-against-min-max-kl-and`.
    """
    check_float_tensor(calib_data, "calib_data")
    if calib_data.ndim < 2 or calib_data.shape[0] == 0:
        raise ValueError(f"calib_data must be (N, ...) with N >= 1, got shape {tuple(calib_data.shape)}")
    config = dataclasses.replace(easyquant_config(model, weight_bits, act_bits), act_range_method=range_method)
    qm = quantize_model(_folded(model), config)
    calibrate(qm, calib_data)
    return qm.eval()


def _site_values(qm: nn.Module, x: torch.Tensor) -> dict:
    """{site: the float tensor it receives} with every quantizer off (the FP32 model's values)."""
    aqs, layers = act_quantizers(qm), quant_layers(qm)
    module_name = {m: n for n, m in qm.named_modules()}
    states = {n: q.state for n, q in aqs.items()}
    enabled = {n: layer.weight_quantizer.enabled for n, layer in layers.items()}
    try:
        for q in aqs.values():
            q.set_state("off")
        for layer in layers.values():
            layer.weight_quantizer.enabled = False
        got = capture_activations(qm, x, [module_name[q] for q in aqs.values()], where="input")
    finally:
        for n, q in aqs.items():
            q.set_state(states[n])
        for n, layer in layers.items():
            layer.weight_quantizer.enabled = enabled[n]
    return {n: got[module_name[q]] for n, q in aqs.items()}


def _start_act_scales(qm: nn.Module, x: torch.Tensor, act_init: str) -> None:
    """Set every activation quantizer to its starting scale, (2^(b-1) - 1) / max|A| or the KL
    threshold's, zero point 0, and switch it on."""
    values = _site_values(qm, x)
    for name, q in act_quantizers(qm).items():
        v = values[name].detach().float()
        if act_init == "kl":
            # TensorRT's histogram is of |A| on the paper's signed grid (2^(b-1) levels on [0, t])
            sym = QuantSpec(q.spec.bits + (0 if q.spec.signed else 1), signed=True, symmetric=True)
            t = kl_tensorrt(v, sym, num_bins=max(2048, 2 * (sym.qmax + 1)), ignore_zeros=True)[1]
        else:
            t = v.abs().max()
        scale = torch.clamp(t.float() / q.spec.qmax, min=torch.finfo(torch.float32).eps).reshape(())
        q.set_qparams(scale, torch.zeros_like(scale))
        q.calibrated.fill_(True)
        q.set_state("quantize")


def _site_plan(qm: nn.Module, order: list) -> dict:
    """{layer: the activation site whose scale is searched with it, or None}: the one site a layer
    reads, unless an earlier layer (network order) already claimed it."""
    plan, claimed = {}, set()
    for name in order:
        sites = input_sites(qm, name)
        plan[name] = sites[0] if len(sites) == 1 and sites[0] not in claimed else None
        claimed.update(sites)
    return plan


# --------------------------------------------------------------------------------------------
# One layer's problem: its fixed input and target, its candidates' outputs, cosines
# --------------------------------------------------------------------------------------------
@dataclass
class _Layer:
    """What stays fixed while one layer's scales are searched."""
    name: str
    module: nn.Module                 # a QuantConv1d/2d/3d or QuantLinear
    act: object                       # identity, or the fused ReLU/ReLU6 ("released")
    x: torch.Tensor                   # its input (N, ...), model dtype; float at ``site``
    target: torch.Tensor              # float64 (N, C, M): act(O_l), O_l from the FP32 model
    site: str | None
    quantizer: nn.Module | None       # the ActQuantizer of ``site``
    bias: torch.Tensor | None         # float64


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _activation(qm: nn.Module, name: str):
    """The ReLU/ReLU6 fused into layer ``name`` (refimpl.graph.fused_relu) as a function, else identity."""
    modules = dict(qm.named_modules())
    node = next(n for n in qm.graph.nodes if n.op == "call_module" and n.target == name)
    relu = fused_relu(node, modules)
    if relu is None:
        return _identity
    return F.relu6 if activation_kind(relu, modules) == "relu6" else torch.relu


def _layer_input(qm: nn.Module, x: torch.Tensor, name: str, site: str | None) -> torch.Tensor:
    """Layer ``name``'s input on x in the model as quantized so far, with ``site``'s quantizer off
    (the ops between a site and a layer, max pooling and reshapes, commute with it)."""
    aq = act_quantizers(qm)[site] if site is not None else None
    state = aq.state if aq is not None else None
    try:
        if aq is not None:
            aq.set_state("off")
        return capture_activations(qm, x, [name], where="input", stop=True)[name]
    finally:
        if aq is not None:
            aq.set_state(state)


def _problem(qm, x, name: str, site, target: torch.Tensor, post_act: bool) -> _Layer:
    module = quant_layers(qm)[name]
    if getattr(module, "padding_mode", "zeros") != "zeros":
        raise ValueError(f"layer {name!r} has padding_mode={module.padding_mode!r}: easyquant supports 'zeros'")
    act = _activation(qm, name) if post_act else _identity
    t = act(target.detach().double())
    bias = None if module.bias is None else module.bias.detach().double()
    return _Layer(name, module, act, _layer_input(qm, x, name, site), t.reshape(t.shape[0], t.shape[1], -1),
                  site, act_quantizers(qm)[site] if site is not None else None, bias)


def _zeros(scales: torch.Tensor) -> torch.Tensor:
    return torch.zeros(scales.shape, dtype=torch.int32, device=scales.device)


def _quantized_weight(p: _Layer, scales: torch.Tensor) -> torch.Tensor:
    """Q(W, S_w) / S_w (eq. 1) in float64, per output channel; scales float32 (C,)."""
    w = p.module.weight.detach()
    return fake_quant(w, scales, _zeros(scales), p.module.weight_quantizer.spec).double()


def _quantized_input(p: _Layer, scale) -> torch.Tensor:
    """Q(A, S_a) / S_a (eq. 1) in float64 at the searched site (the input as it is without one)."""
    if p.site is None:
        return p.x.double()
    return fake_quant(p.x, scale, _zeros(scale), p.quantizer.spec).double()


def _forward(p: _Layer, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The layer (its stride, padding, groups) with weight w, float64."""
    if isinstance(p.module, nn.Linear):
        return F.linear(x, w, bias)
    return p.module._conv_forward(x, w, bias)


def _output(p: _Layer, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """act(Ô_l) as (N, C, M) float64 (eq. 4's Ô_l)."""
    y = p.act(_forward(p, x, w, p.bias))
    return y.reshape(y.shape[0], y.shape[1], -1)


def _cos_from_sums(dot, nx, ny, sx, sy, m: int) -> torch.Tensor:
    """cos(x, y) from <x, y>, |x|^2, |y|^2, sum x, sum y over m values; both vectors shifted by
    1e-5 where one of them is all zeros (the released tool's rule)."""
    dot, nx, ny, sx, sy = torch.broadcast_tensors(dot, nx, ny, sx, sy)
    zero = (nx == 0) | (ny == 0)
    if bool(zero.any()):
        e = _ZERO_SHIFT
        dot = torch.where(zero, dot + e * (sx + sy) + e * e * m, dot)
        nx, ny = torch.where(zero, nx + 2 * e * sx + e * e * m, nx), torch.where(zero, ny + 2 * e * sy + e * e * m, ny)
    return dot / sqrt(nx * ny)


def _cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last dimension (broadcast), float64."""
    x, y = torch.broadcast_tensors(x, y)
    return _cos_from_sums((x * y).sum(-1), (x * x).sum(-1), (y * y).sum(-1), x.sum(-1), y.sum(-1), x.shape[-1])


def _objective(p: _Layer, xq: torch.Tensor, wq: torch.Tensor) -> float:
    """Eq. 4: the mean over samples of cos(O_l^i, Ô_l^i) (after act for "released")."""
    return float(_cosine(p.target.flatten(1), _output(p, xq, wq).flatten(1)).mean())


def _first_best(values: torch.Tensor) -> torch.Tensor:
    """Index along the last dim of the first value within _TIE of the largest (ties keep the
    earlier candidate, so the current scale, candidate 0, survives ties)."""
    best = values.max(dim=-1, keepdim=True).values
    return (values >= best - _TIE).to(torch.int32).argmax(dim=-1)


def _chunks(count: int, per_item: int) -> list:
    """Slices of range(count) whose items hold about _BUDGET float64 values in all."""
    step = max(1, _BUDGET // max(1, per_item))
    return [slice(i, min(count, i + step)) for i in range(0, count, step)]


# --------------------------------------------------------------------------------------------
# The searches: weight scales (paper: channel by channel; released: all channels at once) and
# the activation scale, each batched or as a loop over candidates
# --------------------------------------------------------------------------------------------
def _channel_outputs(p: _Layer, xq: torch.Tensor, k: int, cand: torch.Tensor) -> torch.Tensor:
    """act(output channel k) for each candidate scale of its weights: (N, J, M) float64, one
    convolution with J output channels (the group of channel k only)."""
    w = p.module.weight.detach()
    spec = p.module.weight_quantizer.spec.per_channel(0)
    wk = fake_quant(w[k:k + 1].expand(len(cand), *w.shape[1:]), cand, _zeros(cand), spec).double()
    b = None if p.bias is None else p.bias[k].expand(len(cand))
    if isinstance(p.module, nn.Linear):
        y = F.linear(xq, wk, b)
    else:
        m = p.module
        conv = next(fn for cls, fn in _CONV.items() if isinstance(m, cls))
        cin = w.shape[1]
        g = k // (w.shape[0] // m.groups)
        y = conv(xq[:, g * cin:(g + 1) * cin], wk, b, m.stride, m.padding, m.dilation, 1)
    y = p.act(y)
    return y.reshape(y.shape[0], y.shape[1], -1)


def _paper_weight_search(p: _Layer, xq: torch.Tensor, scales: torch.Tensor, grid: torch.Tensor,
                         batched: bool) -> torch.Tensor:
    """Each output channel's scale in turn (others at their current values) maximising eq. 4
    over [current] + grid[k]; scales float32 (C,), grid float32 (C, n). Returns the new scales."""
    scales = scales.clone()
    if not batched:
        for k in range(len(scales)):
            cand = torch.cat([scales[k:k + 1], grid[k]])
            cos = []
            for s in cand:
                trial = scales.clone()
                trial[k] = s
                cos.append(_objective(p, xq, _quantized_weight(p, trial)))
            scales[k] = cand[_first_best(torch.tensor(cos, dtype=torch.float64))]
        return scales
    t = p.target
    y = _output(p, xq, _quantized_weight(p, scales))
    # per sample and channel: <O, Ô>, |Ô|^2, sum Ô; a channel's candidates change only its part
    parts = torch.stack([(t * y).sum(2), (y * y).sum(2), y.sum(2)])          # (3, N, C)
    nx, sx, m = (t * t).sum((1, 2)), t.sum((1, 2)), t[0].numel()
    for k in range(len(scales)):
        cand = torch.cat([scales[k:k + 1], grid[k]])
        yk, tk = _channel_outputs(p, xq, k, cand), t[:, k:k + 1]
        new = torch.stack([(tk * yk).sum(2), (yk * yk).sum(2), yk.sum(2)])   # (3, N, J)
        tot = (parts.sum(2) - parts[:, :, k]).unsqueeze(2) + new
        cos = _cos_from_sums(tot[0], nx[:, None], tot[1], sx[:, None], tot[2], m).mean(0)
        j = int(_first_best(cos))
        scales[k] = cand[j]
        parts[:, :, k] = new[:, :, j]
    return scales


def _released_weight_search(p: _Layer, xq: torch.Tensor, scales: torch.Tensor, grid: torch.Tensor,
                            batched: bool) -> torch.Tensor:
    """Every channel's scale at once, each maximising the mean cosine of its own feature map
    after the ReLU over [current] + grid[k] (the released ``weight_fine_tuning``)."""
    cand = torch.cat([scales[:, None], grid], 1)                              # (C, J)
    C, J = cand.shape
    if batched:
        w = p.module.weight.detach()
        spec = p.module.weight_quantizer.spec.per_channel(0)
        cos = []
        for js in _chunks(J, p.target.numel()):
            c = cand[:, js]
            L = c.shape[1]
            # channel-major stacking keeps each channel's candidates in its own convolution group
            wc = fake_quant(w[:, None].expand(C, L, *w.shape[1:]).reshape(C * L, *w.shape[1:]),
                            c.reshape(-1), _zeros(c.reshape(-1)), spec).double()
            b = None if p.bias is None else p.bias.repeat_interleave(L)
            y = p.act(_forward(p, xq, wc, b)).reshape(xq.shape[0], C, L, -1)
            cos.append(_cosine(p.target[:, :, None], y).mean(0))
        cos = torch.cat(cos, 1)
    else:
        cos = torch.stack([_cosine(p.target, _output(p, xq, _quantized_weight(p, cand[:, j]))).mean(0)
                           for j in range(J)], 1)
    return cand[torch.arange(C, device=cand.device), _first_best(cos)]


def _act_search(p: _Layer, wq: torch.Tensor, current: torch.Tensor, grid: torch.Tensor,
                batched: bool) -> torch.Tensor:
    """The activation scale of ``p.site`` maximising eq. 4 over [current] + grid (float32 (n,)),
    with the weights wq fixed. Returns a 0-d float32 scale."""
    cand = torch.cat([current.reshape(1), grid])
    if batched:
        n = p.x.shape[0]
        spec = p.quantizer.spec.per_channel(0)
        cos = []
        for js in _chunks(len(cand), n * max(p.x[0].numel(), p.target[0].numel())):
            c = cand[js]
            xs = fake_quant(p.x.expand(len(c), *p.x.shape), c, _zeros(c), spec).double()
            y = _output(p, xs.flatten(0, 1), wq)
            cos.append(_cosine(p.target.flatten(1), y.reshape(len(c), n, -1)).mean(1))
        cos = torch.cat(cos)
    else:
        cos = torch.tensor([_objective(p, _quantized_input(p, s), wq) for s in cand], dtype=torch.float64)
    return cand[_first_best(cos)]


# --------------------------------------------------------------------------------------------
# The two variants' drivers
# --------------------------------------------------------------------------------------------
@dataclass
class _Settings:
    variant: str
    alpha: float
    beta: float
    n: int
    rounds: int
    batched: bool


def _grid(start: torch.Tensor, s: _Settings, which: str) -> torch.Tensor:
    """Candidate scales (steps) around the starting ones, float32: start (C,) -> (C, k) for
    weights, start 0-d -> (k,) for the activation. The grids are spaced linearly in the paper's
    multiplier S = 1 / scale: [alpha S, beta S] (paper, §3.2); weights between 1 and S, and
    activations in [0.8 S, S] (released), endpoints of the released grids left out as its code does."""
    mult = 1.0 / start.double().reshape(-1, 1)
    t = torch.linspace(0.0, 1.0, s.n if which == "weight" or s.variant == "paper" else 2 * s.n,
                       dtype=torch.float64, device=start.device)
    if s.variant == "paper":
        cand = mult * (s.alpha + (s.beta - s.alpha) * t)
    elif which == "weight":
        cand = (1.0 + (mult - 1.0) * t)[:, 1:-1]
    else:
        cand = (mult * (0.8 + 0.2 * t))[:, 1:-1]
    scales = (1.0 / cand).float()
    return scales if which == "weight" else scales.reshape(-1)


def _set_scales(p: _Layer, weight_scales: torch.Tensor, act_scale) -> None:
    p.module.weight_quantizer.set_qparams(weight_scales, torch.zeros_like(weight_scales))
    if p.site is not None:
        p.quantizer.set_qparams(act_scale, torch.zeros_like(act_scale))


def _record(name: str, site, w0, w, a0, a, cos_init: float, cos_final: float) -> EasyQuantLayer:
    return EasyQuantLayer(name, site, cos_init, cos_final, w0.double() / w.double(),
                          None if a0 is None else float(a0.double() / a.double()), w.clone(),
                          None if a is None else float(a))


def _paper_layer(p: _Layer, s: _Settings) -> EasyQuantLayer:
    """Alternate the layer's weight scales and its input's scale, ``rounds`` times (§3.2)."""
    w0 = p.module.weight_quantizer.scale.detach().reshape(-1).clone()
    a0 = p.quantizer.scale.detach().clone() if p.site is not None else None
    w_grid = _grid(w0, s, "weight")
    a_grid = _grid(a0, s, "act") if a0 is not None else None
    w, a = w0, a0
    xq = _quantized_input(p, a)
    cos_init = _objective(p, xq, _quantized_weight(p, w))
    for _ in range(s.rounds):
        w = _paper_weight_search(p, xq, w, w_grid, s.batched)
        if a is not None:
            a = _act_search(p, _quantized_weight(p, w), a, a_grid, s.batched)
            xq = _quantized_input(p, a)
    cos_final = _objective(p, xq, _quantized_weight(p, w))
    _set_scales(p, w, a)
    return _record(p.name, p.site, w0, w, a0, a, cos_init, cos_final)


def _search_paper(qm, x, order, plan, targets, s: _Settings, progress: bool) -> list:
    report = []
    bar = progress_bar(order, progress, desc="easyquant", unit="layer")
    for name in bar:
        report.append(_paper_layer(_problem(qm, x, name, plan[name], targets[name], False), s))
        bar.set_postfix(layer=name, cos=f"{report[-1].cos_init:.4f}->{report[-1].cos_final:.4f}")
    return report


def _search_released(qm, x, order, plan, targets, s: _Settings, progress: bool) -> list:
    """``rounds`` times: one pass over every layer's weight scales, then one over every
    activation scale (the released ``weight_fine_tuning`` then ``activation_fine_tuning``)."""
    layers = quant_layers(qm)
    aqs = act_quantizers(qm)
    w0 = {n: layers[n].weight_quantizer.scale.detach().reshape(-1).clone() for n in order}
    a0 = {n: aqs[plan[n]].scale.detach().clone() for n in order if plan[n] is not None}
    cos_init, cos_final = {}, {}
    steps = [(which, n) for _ in range(s.rounds) for which in ("weight", "act") for n in order]
    bar = progress_bar(steps, progress, desc="easyquant (released)", unit="step")
    for which, name in bar:
        p = _problem(qm, x, name, plan[name], targets[name], True)
        w = p.module.weight_quantizer.scale.detach().reshape(-1).clone()
        a = p.quantizer.scale.detach().clone() if p.site is not None else None
        xq = _quantized_input(p, a)
        if name not in cos_init:
            cos_init[name] = _objective(p, xq, _quantized_weight(p, w))
        if which == "weight":
            w = _released_weight_search(p, xq, w, _grid(w0[name], s, "weight"), s.batched)
        elif a is not None:
            a = _act_search(p, _quantized_weight(p, w), a, _grid(a0[name], s, "act"), s.batched)
            xq = _quantized_input(p, a)
        _set_scales(p, w, a)
        cos_final[name] = _objective(p, xq, _quantized_weight(p, w))
        bar.set_postfix(step=which, layer=name)
    return [_record(n, plan[n], w0[n], layers[n].weight_quantizer.scale.detach().reshape(-1), a0.get(n),
                    aqs[plan[n]].scale.detach().clone() if plan[n] is not None else None, cos_init[n], cos_final[n])
            for n in order]


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------
def _check_arguments(model, calib_data, weight_bits, act_bits, variant, alpha, beta, n, rounds, act_init,
                     num_samples, flags: dict) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_float_tensor(calib_data, "calib_data")
    if calib_data.ndim < 2:
        raise ValueError(f"calib_data must be (N, *input_shape), got shape {tuple(calib_data.shape)}")
    check_int(weight_bits, "weight_bits", 2, 16)
    check_int(act_bits, "act_bits", 2, 16)
    check_choice(variant, "variant", EASYQUANT_VARIANTS)
    if check_positive(alpha, "alpha") >= check_positive(beta, "beta"):
        raise ValueError(f"alpha must be < beta (the candidates lie in [alpha S, beta S]), got alpha={alpha}, "
                         f"beta={beta}")
    check_int(n, "n", 1)
    check_int(rounds, "rounds", 1)
    check_choice(act_init, "act_init", _ACT_INITS)
    check_int(num_samples, "num_samples", 1)
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")


def easyquant(model: nn.Module, calib_data: torch.Tensor, weight_bits: int = 8, act_bits: int = 8, *,
              variant: str = "paper", alpha: float = 0.5, beta: float = 2.0, n: int = 100, rounds: int = 1,
              act_init: str | None = None, num_samples: int = 50, batched: bool = True, progress: bool = True,
              return_report: bool = False):
    """Post-training quantization by EasyQuant's scale search (Wu et al. 2020, eq. 4, §3.2,
    Algorithm 1; see the module docstring for the paper, the released tool and our choices).

    model: a float model (BatchNorm is folded first; not modified). calib_data: float
    ``(N, *input_shape)``; its first ``num_samples`` rows are used (the paper: 50 random samples;
    ``DataSplit.x_calib`` is already a random draw), cast to the model's dtype and device.
    weight_bits, act_bits: 2..16, on the grids of :func:`easyquant_config`.
    variant: "paper" or "released" (:data:`EASYQUANT_VARIANTS`). alpha < beta, n: the paper's
    grid, n candidates spaced linearly in [alpha S, beta S] (S: the starting multiplier); the
    released variant's grids are fixed by its code (n weight and 2 n activation points, endpoints
    dropped). rounds: alternations per layer (paper) or pairs of passes (released).
    act_init: the starting activation scales, "maxabs" or "kl" (TensorRT's KL, as the released
    tool); None: "maxabs" for "paper", "kl" for "released". Weights always start at max-abs.
    batched: evaluate a layer's candidates as one batched computation (else a loop, the same
    result). progress: a progress bar over the layers.

    Returns the quantized model (``refimpl.qmodel.quantize_model`` of the BN-folded model, eval
    mode, on the model's device, every quantizer fixed at its searched scale), and with
    ``return_report=True`` also a list of :class:`EasyQuantLayer`, one per layer in network order.

    Used in :ref:`ch7-sec-the-scale-search`.
    """
    _check_arguments(model, calib_data, weight_bits, act_bits, variant, alpha, beta, n, rounds, act_init,
                     num_samples, {"batched": batched, "progress": progress, "return_report": return_report})
    settings = _Settings(variant, float(alpha), float(beta), n, rounds, batched)
    act_init = act_init or ("kl" if variant == "released" else "maxabs")
    fp = _folded(model)
    qm = quantize_model(fp, easyquant_config(fp, weight_bits, act_bits))
    param = next(fp.parameters())
    x = calib_data[:num_samples].detach().to(device=param.device, dtype=param.dtype)
    with torch.no_grad():
        _start_act_scales(qm, x, act_init)
        order = nodes_of(qm, quant_layers(qm))
        plan = _site_plan(qm, order)
        targets = capture_activations(fp, x, order)      # O_l: the FP32 outputs, before activations
        search = _search_paper if variant == "paper" else _search_released
        report = search(qm, x, order, plan, targets, settings, progress)
    qm.eval()
    return (qm, report) if return_report else qm

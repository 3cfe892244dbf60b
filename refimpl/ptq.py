"""Data-free post-training quantization tools: cross-layer equalization, high-bias absorption,
bias correction (DFQ, Nagel et al. 2019, §4 and appendices A-D; white paper, Nagel et al.
2021, arXiv 2106.08295: §3.2 "Cross-layer equalization", eqs. 20-22, with "Absorbing high
biases", eqs. 23-24; §3.3 "Bias correction", eqs. 25-28). The formulas are restated in each
docstring.

* ``cross_layer_equalization`` — per-channel rescaling of consecutive layers so their
  per-channel weight ranges match (DFQ §4.1 and appendix A).
* ``high_bias_absorption`` — moves the part of a layer's bias that always passes the ReLU into
  the next layer's bias (DFQ §4.1, "absorbing high biases").
* ``bias_correction_empirical`` / ``bias_correction_analytic`` — remove the mean output error
  that weight quantization causes (DFQ §4.2 and appendices B-D).
* ``weight_ranges`` — a layer's per-output- or per-input-channel weight range max|W|.

Every function returns a new model; none modifies its inputs. The models are traced with
torch.fx (``refimpl.fold``): layers are found by their qualified names.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ._checks import check_choice, check_int
from .numerics import sqrt
from .fold import _trace, fold_all_bn

__all__ = [
    "cross_layer_equalization", "CLEReport", "CLEPair", "high_bias_absorption",
    "bias_correction_empirical", "bias_correction_analytic", "weight_ranges",
    "relu_mean", "relu6_mean", "find_equalization_chains",
]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_RELU_FUNCS = (F.relu, torch.relu)
_RELU6_FUNCS = (F.relu6,)


# --------------------------------------------------------------------------------------------
# Per-channel geometry of a layer's weight
# --------------------------------------------------------------------------------------------
def _is_layer(m) -> bool:
    return isinstance(m, _LAYERS) and not isinstance(m, nn.modules.conv._ConvTransposeNd)


def _in_channels(layer) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _out_channels(layer) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _input_index(layer) -> torch.Tensor:
    """(C_out, C_in / groups) long tensor: the global input channel that weight[o, i] multiplies.

    For groups g, output channel o belongs to group o // (C_out / g) and its local input i is the
    global channel group * (C_in / g) + i (Linear: g = 1).
    """
    w = layer.weight
    groups = getattr(layer, "groups", 1)
    c_out, c_in_g = w.shape[0], w.shape[1]
    group = torch.arange(c_out, device=w.device) // (c_out // groups)
    return group[:, None] * c_in_g + torch.arange(c_in_g, device=w.device)[None, :]


def weight_ranges(layer: nn.Module, side: str = "out", weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel weight range r_i = max |W| over the entries of channel i (DFQ §4.1).

    side="out": per output channel (C_out,); side="in": per input channel (C_in,) — for a
    grouped/depthwise conv, the entries of all output channels that read input channel i.
    weight: use this tensor (the layer's weight shape) instead of ``layer.weight``.
    Returns a detached tensor in the weight's dtype. (Positive per-channel scaling scales
    max|W| and max-min alike, so CLE equalizes either definition.)
    """
    if not _is_layer(layer):
        raise TypeError(f"layer must be a Conv1d/Conv2d/Conv3d/Linear, got {type(layer).__name__}")
    check_choice(side, "side", ("out", "in"))
    w = (layer.weight if weight is None else weight).detach()
    a = w.abs().reshape(w.shape[0], w.shape[1], -1).amax(-1)  # (C_out, C_in/groups)
    if side == "out":
        return a.amax(1)
    r = torch.zeros(_in_channels(layer), dtype=a.dtype, device=a.device)
    return r.scatter_reduce(0, _input_index(layer).reshape(-1), a.reshape(-1), reduce="amax")


def _scale_out(layer, s: torch.Tensor) -> None:
    """W <- S^-1 W, b <- S^-1 b (per output channel)."""
    w = layer.weight
    shape = (-1,) + (1,) * (w.dim() - 1)
    w.data.div_(s.to(w.dtype).reshape(shape))
    if layer.bias is not None:
        layer.bias.data.div_(s.to(w.dtype))


def _scale_in(layer, s: torch.Tensor) -> None:
    """W <- W S (per input channel, through the group structure)."""
    w = layer.weight
    idx = _input_index(layer)
    w.data.mul_(s.to(w.dtype)[idx].reshape(idx.shape + (1,) * (w.dim() - 2)))


def _add_bias(layer, delta: torch.Tensor) -> None:
    """b <- b + delta, creating a zero bias first when the layer has none."""
    w = layer.weight
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                  requires_grad=w.requires_grad)
    layer.bias.data.add_(delta.to(w.dtype))


def _weight_times_channel_vector(layer, v: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """(C_out,) sum_{i,k} W[o, i, k] v[input channel of i]: the layer's response to a constant input v."""
    w = (layer.weight if weight is None else weight).detach()
    ws = w.reshape(w.shape[0], w.shape[1], -1).sum(-1)  # (C_out, C_in/groups)
    return (ws * v.to(ws.dtype)[_input_index(layer)]).sum(1)


# --------------------------------------------------------------------------------------------
# Graph walking
# --------------------------------------------------------------------------------------------
def _act_kind(node: torch.fx.Node, modules: dict) -> str | None:
    """"relu", "relu6" or None for an activation node."""
    if node.op == "call_module":
        m = modules[node.target]
        if type(m) is nn.ReLU:
            return "relu"
        if type(m) is nn.ReLU6:
            return "relu6"
    elif node.op == "call_function":
        if node.target in _RELU_FUNCS:
            return "relu"
        if node.target in _RELU6_FUNCS:
            return "relu6"
    elif node.op == "call_method" and node.target == "relu":
        return "relu"
    return None


def _call_counts(gm) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            counts[n.target] = counts.get(n.target, 0) + 1
    return counts


def _layer_pairs(gm, acts: tuple[str, ...], allow_none: bool = True):
    """[(layer1 node, activation node or None, layer2 node)] through which channel scaling commutes.

    layer1's output has exactly one user: layer2, or an activation of a kind in ``acts`` whose
    only user is layer2 (as its input); channel counts match; every module is called once.
    A tensor that also feeds a residual add or another consumer ends the chain.
    """
    modules = dict(gm.named_modules())
    counts = _call_counts(gm)
    pairs = []
    for n in gm.graph.nodes:
        if n.op != "call_module" or not _is_layer(modules[n.target]) or counts[n.target] != 1:
            continue
        if len(n.users) != 1:
            continue
        nxt = next(iter(n.users))
        act = None
        kind = _act_kind(nxt, modules)
        if kind is not None:
            if kind not in acts or len(nxt.users) != 1 or len(nxt.args) < 1 or nxt.args[0] is not n:
                continue
            if nxt.op == "call_module" and counts[nxt.target] != 1:
                continue
            act, nxt = nxt, next(iter(nxt.users))
        elif not allow_none:
            continue
        if nxt.op != "call_module" or not _is_layer(modules[nxt.target]) or counts[nxt.target] != 1:
            continue
        src = act if act is not None else n
        if not nxt.args or nxt.args[0] is not src or len(nxt.args) > 1 or nxt.kwargs:
            continue
        if _out_channels(modules[n.target]) != _in_channels(modules[nxt.target]):
            continue
        pairs.append((n, act, nxt))
    return pairs


def _chains(pairs) -> list[list[torch.fx.Node]]:
    """Consecutive pairs joined into maximal chains [layer1, layer2, layer3, ...]."""
    nxt = {p[0]: p[2] for p in pairs}
    has_prev = {p[2] for p in pairs}
    chains = []
    for start in nxt:
        if start in has_prev:
            continue
        chain = [start]
        while chain[-1] in nxt:
            chain.append(nxt[chain[-1]])
        chains.append(chain)
    return chains


def find_equalization_chains(model: nn.Module, relu6: str = "replace") -> list[tuple[str, ...]]:
    """The layer chains ``cross_layer_equalization`` equalizes, as tuples of qualified names.

    Found on ``fold_all_bn(model)``: Conv/Linear -> (ReLU, ReLU6 unless relu6="skip", or no
    activation) -> Conv/Linear where each tensor on the path has exactly one consumer.
    """
    check_choice(relu6, "relu6", ("replace", "skip"))
    gm = fold_all_bn(model)
    acts = ("relu", "relu6") if relu6 == "replace" else ("relu",)
    return [tuple(n.target for n in c) for c in _chains(_layer_pairs(gm, acts))]


# --------------------------------------------------------------------------------------------
# Cross-layer equalization
# --------------------------------------------------------------------------------------------
@dataclass
class CLEPair:
    """Per-channel weight ranges of one equalized pair before and after CLE (1-d tensors, C,).

    ranges1_*: layer1's per-output-channel max|W|; ranges2_*: layer2's per-input-channel max|W|.
    """

    layer1: str
    layer2: str
    activation: str | None
    ranges1_before: torch.Tensor
    ranges2_before: torch.Tensor
    ranges1_after: torch.Tensor = None
    ranges2_after: torch.Tensor = None

    @staticmethod
    def _spread(r: torch.Tensor) -> float:
        r = r[r > 0]
        return float(r.max() / r.min()) if r.numel() else float("nan")

    @property
    def spread1_before(self) -> float:
        """max/min of layer1's per-output-channel ranges before CLE."""
        return self._spread(self.ranges1_before)

    @property
    def spread1_after(self) -> float:
        return self._spread(self.ranges1_after)

    @property
    def spread2_before(self) -> float:
        """max/min of layer2's per-input-channel ranges before CLE."""
        return self._spread(self.ranges2_before)

    @property
    def spread2_after(self) -> float:
        return self._spread(self.ranges2_after)

    @property
    def proportionality_error(self) -> float:
        """max_i |r1_i/R1 - r2_i/R2| after CLE: 0 at DFQ's optimum (§4.1, appendix A)."""
        a = self.ranges1_after / self.ranges1_after.max()
        b = self.ranges2_after / self.ranges2_after.max()
        return float((a - b).abs().max())


@dataclass
class CLEReport:
    """What ``cross_layer_equalization`` did.

    chains: the equalized layer chains; pairs: one ``CLEPair`` per consecutive pair;
    iterations / converged: sweeps over the pairs until max_i |log s_i| < tol;
    relu6_replaced: ReLU6 modules (or functional calls, by node name) replaced by ReLU;
    output_scales: {layer: s} with new output channel i = old output channel i / s_i
    (cumulative over the iterations) — see ``rescale_bn_statistics``.
    """

    chains: list[tuple[str, ...]] = field(default_factory=list)
    pairs: list[CLEPair] = field(default_factory=list)
    iterations: int = 0
    converged: bool = True
    relu6_replaced: list[str] = field(default_factory=list)
    output_scales: dict[str, torch.Tensor] = field(default_factory=dict)

    def rescale_bn_statistics(self, bn_stats: dict) -> dict:
        """``bn_statistics`` of the model before CLE mapped to the equalized model: (beta/s, gamma/s)."""
        out = dict(bn_stats)
        for name, s in self.output_scales.items():
            if name in out:
                beta, gamma = out[name]
                out[name] = (beta / s.to(beta.dtype), gamma / s.to(gamma.dtype))
        return out

    def summary(self) -> str:
        """One line per pair: spread (max/min channel range) of both sides before -> after."""
        lines = [f"CLE: {len(self.pairs)} pairs in {len(self.chains)} chains, {self.iterations} iterations"
                 f"{'' if self.converged else ' (not converged)'}, {len(self.relu6_replaced)} ReLU6 replaced"]
        for p in self.pairs:
            lines.append(f"  {p.layer1} -> {p.layer2}: out-range spread {p.spread1_before:.3g} -> "
                         f"{p.spread1_after:.3g}, in-range spread {p.spread2_before:.3g} -> {p.spread2_after:.3g}")
        return "\n".join(lines)


def cross_layer_equalization(model: nn.Module, iterations: int = 100, tol: float = 1e-6,
                             relu6: str = "replace", return_report: bool = False,
                             progress: bool = False):
    """A new model whose consecutive layers have equal per-channel weight ranges (DFQ §4.1).

    BatchNorm is folded first (``refimpl.fold.fold_all_bn``). Chains are found with torch.fx
    (``find_equalization_chains``): Conv/Linear -> (ReLU | ReLU6 | nothing) -> Conv/Linear where
    each tensor on the path has exactly one consumer — a tensor that also feeds a residual
    add ends the chain, so in a ResNet block only conv1 -> conv2 is equalized; grouped and
    depthwise convs are handled (conv -> depthwise -> conv forms a chain of two pairs).
    For each pair, with r1_i the range of layer1's output channel i and r2_i that of layer2's
    input channel i, s_i = sqrt(r1_i r2_i) / r2_i (DFQ §4.1; white paper eq. 22); W1 <- S^-1 W1, b1 <- S^-1 b1,
    W2 <- W2 S, after which both ranges are sqrt(r1_i r2_i). Because ReLU(x/s) = ReLU(x)/s for
    s > 0 the function is unchanged. Pairs are swept in order until every scale satisfies
    max |log s_i| < tol or ``iterations`` sweeps are done (chains of more than two layers
    need several sweeps; a single pair converges in one). Channels with a zero range keep s=1.

    ReLU6 is not positively homogeneous (min(x/s, 6) != min(x, 6)/s). relu6="replace" (the DFQ
    paper's choice for MobileNetV2) replaces each ReLU6 inside an equalized chain by ReLU before
    equalizing: the function then changes, but only where a ReLU6 input exceeded 6; the
    replaced sites are listed in the report. relu6="skip": a ReLU6 ends the chain.
    Weights are rescaled in their own dtype; the scales are computed in float64.

    Returns the new ``torch.fx.GraphModule`` (eval mode), or (model, CLEReport) when
    ``return_report``. The input model is not modified.
    """
    iterations = check_int(iterations, "iterations", low=1)
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    check_choice(relu6, "relu6", ("replace", "skip"))
    gm = fold_all_bn(model)
    acts = ("relu", "relu6") if relu6 == "replace" else ("relu",)
    pairs_nodes = _layer_pairs(gm, acts)
    report = CLEReport()
    # ReLU6 -> ReLU on the equalized paths, before any scaling.
    for _, act, _ in pairs_nodes:
        if act is not None and _act_kind(act, dict(gm.named_modules())) == "relu6":
            if act.op == "call_module":
                parent, _, leaf = act.target.rpartition(".")
                setattr(gm.get_submodule(parent) if parent else gm, leaf, nn.ReLU())
                report.relu6_replaced.append(act.target)
            else:
                act.target = F.relu
                act.kwargs = {k: v for k, v in act.kwargs.items() if k == "inplace"}
                report.relu6_replaced.append(act.name)
    if report.relu6_replaced:
        gm.recompile()
    chains = _chains(pairs_nodes)
    report.chains = [tuple(n.target for n in c) for c in chains]
    ordered = [(c[i], c[i + 1]) for c in chains for i in range(len(c) - 1)]
    act_of = {(p[0], p[2]): p[1] for p in pairs_nodes}
    mods = [(gm.get_submodule(a.target), gm.get_submodule(b.target)) for a, b in ordered]
    for (a, b), (l1, l2) in zip(ordered, mods):
        act = act_of[(a, b)]
        report.pairs.append(CLEPair(a.target, b.target, None if act is None else "relu",
                                    weight_ranges(l1, "out").clone(), weight_ranges(l2, "in").clone()))
        report.output_scales[a.target] = torch.ones(_out_channels(l1), dtype=torch.float64,
                                                    device=l1.weight.device)
    report.converged = not mods
    with torch.no_grad():
        for it in tqdm(range(iterations), desc="CLE", unit="sweep", disable=not progress):
            worst = 0.0
            for (a, _), (l1, l2) in zip(ordered, mods):
                r1 = weight_ranges(l1, "out").double()
                r2 = weight_ranges(l2, "in").double()
                ok = (r1 > 0) & (r2 > 0)
                s = torch.where(ok, sqrt(r1 * r2) / torch.where(ok, r2, 1.0), torch.ones_like(r1))
                _scale_out(l1, s)
                _scale_in(l2, s)
                report.output_scales[a.target] *= s
                worst = max(worst, float(s.log().abs().max()))
            report.iterations = it + 1
            if worst < tol:
                report.converged = True
                break
    for p, (l1, l2) in zip(report.pairs, mods):
        p.ranges1_after = weight_ranges(l1, "out").clone()
        p.ranges2_after = weight_ranges(l2, "in").clone()
    gm.eval()
    return (gm, report) if return_report else gm


# --------------------------------------------------------------------------------------------
# High-bias absorption
# --------------------------------------------------------------------------------------------
def _check_stats(bn_stats) -> None:
    if not isinstance(bn_stats, dict):
        raise TypeError(f"bn_stats must be a dict {{layer name: (beta, gamma)}} as returned by "
                        f"refimpl.fold.bn_statistics, got {type(bn_stats).__name__}")
    for k, v in bn_stats.items():
        if not (isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(t, torch.Tensor) for t in v)):
            raise TypeError(f"bn_stats[{k!r}] must be a (beta, gamma) pair of tensors")


def high_bias_absorption(model: nn.Module, bn_stats: dict, n_sigma: float = 3.0,
                         return_stats: bool = False):
    """A new model with the always-active part of each ReLU layer's bias moved on (DFQ §4.1,
    "absorbing high biases").

    For every Conv/Linear layer1 -> ReLU -> Conv/Linear layer2 path (each tensor with one
    consumer; found as in CLE, ReLU only) where layer1 has BN statistics (beta, gamma) — its
    pre-activation is ~N(beta, gamma^2), ``refimpl.fold.bn_statistics``, rescaled with
    ``CLEReport.rescale_bn_statistics`` after CLE — c = max(0, beta - n_sigma * gamma) per
    channel; b1 <- b1 - c; b2 <- b2 + W2 c, for a conv summed over the input
    channels and kernel taps. ReLU(z - c) = ReLU(z) - c whenever z >= c, so the
    function is exactly preserved for inputs whose pre-activations are all >= c, except at
    positions where layer2's kernel overlaps zero padding (those taps saw 0 and still see 0,
    yet the bias added W2 c for them). BN is folded first if present.

    Returns the new GraphModule (eval mode), or (model, stats) when ``return_stats`` with
    stats = bn_stats where each absorbed layer's beta is replaced by beta - c.
    """
    _check_stats(bn_stats)
    if not (isinstance(n_sigma, (int, float)) and n_sigma >= 0):
        raise ValueError(f"n_sigma must be a number >= 0, got {n_sigma!r}")
    gm = fold_all_bn(model)
    new_stats = dict(bn_stats)
    with torch.no_grad():
        for a, _, b in _layer_pairs(gm, ("relu",), allow_none=False):
            if a.target not in bn_stats:
                continue
            l1, l2 = gm.get_submodule(a.target), gm.get_submodule(b.target)
            beta, gamma = bn_stats[a.target]
            if beta.shape != (_out_channels(l1),):
                raise ValueError(f"bn_stats[{a.target!r}] has {tuple(beta.shape)} channels, the layer "
                                 f"{_out_channels(l1)}")
            c = torch.clamp(beta.detach() - n_sigma * gamma.detach().abs(), min=0).to(l1.weight.device)
            _add_bias(l1, -c)
            _add_bias(l2, _weight_times_channel_vector(l2, c))
            new_stats[a.target] = (beta - c.to(beta.dtype), gamma)
    gm.eval()
    return (gm, new_stats) if return_stats else gm


# --------------------------------------------------------------------------------------------
# Bias correction
# --------------------------------------------------------------------------------------------
def _std_normal_pdf(x):
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _std_normal_cdf(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def relu_mean(beta: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """E[ReLU(z)] for z ~ N(beta, gamma^2): gamma phi(beta/gamma) + beta Phi(beta/gamma) (DFQ appendix C,
    clipped normal distribution).

    gamma = 0 gives ReLU(beta). Elementwise; float tensors of broadcastable shapes.
    """
    g = gamma.abs()
    safe = torch.where(g > 0, g, torch.ones_like(g))
    t = beta / safe
    m = g * _std_normal_pdf(t) + beta * _std_normal_cdf(t)
    return torch.where(g > 0, m, torch.clamp(beta, min=0))


def relu6_mean(beta: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """E[ReLU6(z)] = E[clip(z, 0, 6)] for z ~ N(beta, gamma^2).

    clip(z, 0, 6) = ReLU(z) - ReLU(z - 6), so E = relu_mean(beta, gamma) - relu_mean(beta - 6, gamma).
    """
    return relu_mean(beta, gamma) - relu_mean(beta - 6, gamma)


def _quant_layers(qmodel) -> dict[str, nn.Module]:
    return {n: m for n, m in qmodel.named_modules()
            if n and _is_layer(m) and callable(getattr(m, "quantized_weight", None))}


def _is_passthrough(m) -> bool:
    """Modules that leave a tensor's mean (approximately) unchanged: activation quantizers, Identity, Dropout."""
    return type(m).__name__ == "ActQuantizer" or isinstance(m, (nn.Identity, nn.Dropout))


class _QuantLeafTracer(torch.fx.Tracer):
    """Keeps quantized layers (``.quantized_weight()``) and activation quantizers as single nodes."""

    def is_leaf_module(self, m, qualname):
        return (callable(getattr(m, "quantized_weight", None)) or _is_passthrough(m)
                or super().is_leaf_module(m, qualname))


def _source_of_input(node, modules):
    """(layer name, activation kind) feeding ``node``'s input through one optional ReLU/ReLU6 and
    any pass-through modules (activation quantizers); None if the input is anything else."""
    cur = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    kind = None
    while cur is not None:
        if cur.op == "call_module" and _is_layer(modules[cur.target]):
            return cur.target, kind or "none"
        k = _act_kind(cur, modules)
        if k is not None:
            if kind is not None:
                return None
            kind = k
        elif not (cur.op == "call_module" and _is_passthrough(modules[cur.target])):
            return None
        cur = cur.args[0] if cur.args and isinstance(cur.args[0], torch.fx.Node) else None
    return None


def bias_correction_analytic(qmodel: nn.Module, bn_stats: dict, return_corrections: bool = False):
    """A copy of ``qmodel`` whose biases cancel the expected weight-quantization error (DFQ §4.2).

    For each quantized layer (a module with ``.quantized_weight()``, as ``refimpl.qmodel``
    makes) whose input comes from a layer P with BN statistics (beta, gamma) through ReLU,
    ReLU6 or no activation (activation quantizers in between are ignored), the expected input
    is E[x_c] = E[act(z_c)], z_c ~ N(beta_c, gamma_c^2): ``relu_mean`` (DFQ appendix C),
    ``relu6_mean``, or beta. The expected output error is E[y~ - y] = (W~ - W) E[x]
    (DFQ §4.2; for convs summed over kernel taps as in appendix B; zero padding is ignored),
    and the bias becomes b - (W~ - W) E[x]. Layers without such a predecessor (the first layer, layers after a
    residual add or a pooling) are left unchanged. bn_stats: ``refimpl.fold.bn_statistics``
    of the unfolded model, rescaled after CLE/absorption.

    Activation-quantizer ranges are copied as they are: recalibrate
    (``refimpl.qmodel.calibrate``) if the corrected outputs should set them.
    Returns a new model (deep copy; ``qmodel`` is not modified), or (model, {layer: correction
    subtracted}) when ``return_corrections``.
    """
    _check_stats(bn_stats)
    out = copy.deepcopy(qmodel)
    gm = _trace(out, _QuantLeafTracer())
    modules = dict(gm.named_modules())
    qlayers = _quant_layers(out)
    if not qlayers:
        raise ValueError("qmodel has no quantized layer (a Conv/Linear with .quantized_weight()); "
                         "build it with refimpl.qmodel.quantize_model")
    corrections = {}
    with torch.no_grad():
        for n in gm.graph.nodes:
            if n.op != "call_module" or n.target not in qlayers:
                continue
            src = _source_of_input(n, modules)
            if src is None or src[0] not in bn_stats:
                continue
            layer = qlayers[n.target]
            beta, gamma = (t.detach().to(layer.weight.device, torch.float64) for t in bn_stats[src[0]])
            if beta.shape != (_in_channels(layer),):
                raise ValueError(f"bn_stats[{src[0]!r}] has {tuple(beta.shape)} channels, layer "
                                 f"{n.target!r} reads {_in_channels(layer)}")
            ex = {"relu": relu_mean, "relu6": relu6_mean}.get(src[1], lambda b, g: b)(beta, gamma)
            dw = layer.quantized_weight().detach().double() - layer.weight.detach().double()
            corr = _weight_times_channel_vector(layer, ex, weight=dw)
            _add_bias(layer, -corr)
            corrections[n.target] = corr.to(layer.weight.dtype)
    return (out, corrections) if return_corrections else out


def _channel_sum(layer, t):
    """(per-channel sum of t, values per channel): channels on dim 1 for a conv, last dim for Linear."""
    cdim = t.dim() - 1 if isinstance(layer, nn.Linear) else 1
    red = [d for d in range(t.dim()) if d != cdim]
    return t.sum(red), t.numel() // t.shape[cdim]


def _device_of(model):
    p = next(iter(model.parameters()), None)
    return None if p is None else p.device


def _layer_output_means(model, names, x, batch_size):
    """{name: per-channel mean of the named layers' outputs over x}, float64."""
    mods = dict(model.named_modules())
    sums = {n: None for n in names}
    count = {n: 0 for n in names}

    def hook(name):
        def fn(m, inp, outp):
            t = outp.detach().double()
            s, k = _channel_sum(m, t)
            sums[name] = s if sums[name] is None else sums[name] + s
            count[name] += k
        return fn

    handles = [mods[n].register_forward_hook(hook(n)) for n in names]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = _device_of(model)
            for i in range(0, x.shape[0], batch_size):
                model(x[i:i + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return {n: sums[n] / count[n] for n in names}


def _layer_output_error_means(qmodel, fp_layers, names, x, batch_size):
    """{name: per-channel mean of layer_q(x_q) - layer_fp(x_q)} with x_q the qmodel's layer input."""
    mods = dict(qmodel.named_modules())
    sums = {n: None for n in names}
    count = {n: 0 for n in names}

    def hook(name):
        def fn(m, inp, outp):
            t = (outp.detach() - fp_layers[name](inp[0].detach())).double()
            s, k = _channel_sum(m, t)
            sums[name] = s if sums[name] is None else sums[name] + s
            count[name] += k
        return fn

    handles = [mods[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            device = _device_of(qmodel)
            for i in range(0, x.shape[0], batch_size):
                qmodel(x[i:i + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / count[n] for n in names}


def bias_correction_empirical(qmodel: nn.Module, fp_model: nn.Module, x: torch.Tensor,
                              batch_size: int = 256, reference: str = "fp_model",
                              progress: bool = False, return_corrections: bool = False):
    """A copy of ``qmodel`` whose layer biases cancel the mean output error measured on ``x``
    (empirical bias correction, DFQ §4.2 and appendix D).

    Layers are corrected one at a time in graph order, each measured with all earlier
    corrections in place (so later layers see corrected inputs). For quantized layer L (a
    module with ``.quantized_weight()`` in ``qmodel``), over all samples of x and all spatial
    positions, per output channel:

    * reference="fp_model" (default): error = E[L_q(x_q)] - E[L_fp(x_fp)], where x_q is L's
      input in the quantized model run on x (with its activation quantizers) and L_fp(x_fp) is
      the output of the layer of the same name in ``fp_model`` run on x. This removes the
      whole mean shift of L's output, including the shift inherited from earlier layers and
      from activation quantization ("compare the activations of the quantized and full
      precision model").
    * reference="same_input": error = E[L_q(x_q) - L_fp(x_q)] = (W~ - W) E[x_q], the FP32
      weights of L applied to the same input x_q: only the weight-quantization error of L
      (DFQ §4.2, with E[x] measured instead of derived from BN statistics).

    The bias becomes b - error (a zero bias is created if the layer had none). Layer outputs
    are taken before any following activation/quantizer. fp_model: the FP32 model ``qmodel``
    was made from (BN folded, same layer names). x: calibration inputs, batched by
    ``batch_size``. Returns a new model (deep copy; qmodel and fp_model are not modified),
    or (model, {layer: error subtracted}) when ``return_corrections``.
    """
    check_choice(reference, "reference", ("fp_model", "same_input"))
    batch_size = check_int(batch_size, "batch_size", low=1)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(fp_model, nn.Module):
        raise TypeError(f"fp_model must be an nn.Module, got {type(fp_model).__name__}")
    out = copy.deepcopy(qmodel)
    qlayers = _quant_layers(out)
    if not qlayers:
        raise ValueError("qmodel has no quantized layer (a Conv/Linear with .quantized_weight()); "
                         "build it with refimpl.qmodel.quantize_model")
    fp_modules = dict(fp_model.named_modules())
    missing = [n for n in qlayers if n not in fp_modules or not _is_layer(fp_modules[n])]
    if missing:
        raise ValueError(f"fp_model has no Conv/Linear layer named {missing}: give the FP32 model "
                         "qmodel was quantized from (after fold_all_bn)")
    gm = _trace(out, _QuantLeafTracer())
    order = [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target in qlayers]
    was = out.training
    out.eval()
    if reference == "fp_model":
        fp_was = fp_model.training
        try:
            fp_means = _layer_output_means(fp_model, order, x, batch_size)
        finally:
            fp_model.train(fp_was)
    corrections = {}
    with torch.no_grad():
        for name in tqdm(order, desc="bias correction", unit="layer", disable=not progress):
            layer = qlayers[name]
            if reference == "fp_model":
                err = _layer_output_means(out, [name], x, batch_size)[name] - fp_means[name]
            else:
                fp_layer = copy.deepcopy(fp_modules[name]).eval()
                err = _layer_output_error_means(out, {name: fp_layer}, [name], x, batch_size)[name]
            err = err.to(layer.weight.device)
            _add_bias(layer, -err)
            corrections[name] = err.to(layer.weight.dtype)
    out.train(was)
    return (out, corrections) if return_corrections else out

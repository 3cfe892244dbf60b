"""Cross-layer equalization and high-bias absorption (DFQ, Nagel et al. 2019, §4.1 and appendix A;
white paper, Nagel et al. 2021, arXiv 2106.08295, §3.2 "Cross-layer equalization", eqs. 20-22,
with "Absorbing high biases", eqs. 23-24). The formulas are restated in each docstring.

* ``cross_layer_equalization`` — per-channel rescaling of consecutive layers so their
  per-channel weight ranges match.
* ``high_bias_absorption`` — moves the part of a layer's bias that always passes the ReLU into
  the next layer's bias.
* ``find_equalization_chains`` — the layer chains CLE works on (``refimpl.graph.layer_pairs``).

Every function returns a new model; none modifies its inputs. Book: chapter 5, "Cross-layer
equalization".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .._api import renamed
from .._checks import check_choice, check_int
from .._progress import progress_bar
from ..fold import fold_all_bn
from ..graph import activation_kind, chains, layer_pairs, out_channels
from ..numerics import sqrt
from .channels import add_bias, response_to_constant_input, scale_input_channels, scale_output_channels, weight_ranges

__all__ = ["cross_layer_equalization", "CLEReport", "CLEPair", "high_bias_absorption", "find_equalization_chains",
           "check_bn_stats"]


def find_equalization_chains(model: nn.Module, relu6: str = "replace") -> list[tuple[str, ...]]:
    """The layer chains ``cross_layer_equalization`` equalizes, as tuples of qualified names.

    Found on ``fold_all_bn(model)``: Conv/Linear -> (ReLU, ReLU6 unless relu6="skip", or no
    activation) -> Conv/Linear where each tensor on the path has exactly one consumer.
    """
    check_choice(relu6, "relu6", ("replace", "skip"))
    gm = fold_all_bn(model)
    acts = ("relu", "relu6") if relu6 == "replace" else ("relu",)
    return [tuple(n.target for n in c) for c in chains(layer_pairs(gm, acts))]


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
        """``max_i |r1_i/R1 - r2_i/R2|`` after CLE: 0 at DFQ's optimum (§4.1, appendix A)."""
        a = self.ranges1_after / self.ranges1_after.max()
        b = self.ranges2_after / self.ranges2_after.max()
        return float((a - b).abs().max())


@dataclass
class CLEReport:
    """What ``cross_layer_equalization`` did.

    chains: the equalized layer chains; pairs: one ``CLEPair`` per consecutive pair;
    iterations / converged: sweeps over the pairs until ``max_i |log s_i| < tol``;
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
                             progress: bool = True):
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
    ``max |log s_i| < tol`` or ``iterations`` sweeps are done (chains of more than two layers
    need several sweeps; a single pair converges in one). Channels with a zero range keep s=1.

    ReLU6 is not positively homogeneous (min(x/s, 6) != min(x, 6)/s). relu6="replace" (the DFQ
    paper's choice for MobileNetV2) replaces each ReLU6 inside an equalized chain by ReLU before
    equalizing: the function then changes, but only where a ReLU6 input exceeded 6; the
    replaced sites are listed in the report. relu6="skip": a ReLU6 ends the chain.
    Weights are rescaled in their own dtype; the scales are computed in float64.

    Returns the new ``torch.fx.GraphModule`` (eval mode), or (model, CLEReport) when
    ``return_report``. The input model is not modified.

    Used in :ref:`ch5-sec-per-tensor-weights-and-the`.
    """
    iterations = check_int(iterations, "iterations", low=1)
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    check_choice(relu6, "relu6", ("replace", "skip"))
    gm = fold_all_bn(model)
    acts = ("relu", "relu6") if relu6 == "replace" else ("relu",)
    pairs_nodes = layer_pairs(gm, acts)
    report = CLEReport()
    # ReLU6 -> ReLU on the equalized paths, before any scaling.
    for _, act, _ in pairs_nodes:
        if act is not None and activation_kind(act, dict(gm.named_modules())) == "relu6":
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
    found = chains(pairs_nodes)
    report.chains = [tuple(n.target for n in c) for c in found]
    ordered = [(c[i], c[i + 1]) for c in found for i in range(len(c) - 1)]
    act_of = {(p[0], p[2]): p[1] for p in pairs_nodes}
    mods = [(gm.get_submodule(a.target), gm.get_submodule(b.target)) for a, b in ordered]
    for (a, b), (l1, l2) in zip(ordered, mods):
        act = act_of[(a, b)]
        report.pairs.append(CLEPair(a.target, b.target, None if act is None else "relu",
                                    weight_ranges(l1, "out").clone(), weight_ranges(l2, "in").clone()))
        report.output_scales[a.target] = torch.ones(out_channels(l1), dtype=torch.float64,
                                                    device=l1.weight.device)
    report.converged = not mods
    with torch.no_grad():
        for it in progress_bar(range(iterations), progress, desc="CLE", unit="sweep"):
            worst = 0.0
            for (a, _), (l1, l2) in zip(ordered, mods):
                r1 = weight_ranges(l1, "out").double()
                r2 = weight_ranges(l2, "in").double()
                ok = (r1 > 0) & (r2 > 0)
                s = torch.where(ok, sqrt(r1 * r2) / torch.where(ok, r2, 1.0), torch.ones_like(r1))
                scale_output_channels(l1, s)
                scale_input_channels(l2, s)
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
def check_bn_stats(bn_stats) -> None:
    """TypeError unless bn_stats is {layer name: (beta, gamma) tensors} (``refimpl.fold.bn_statistics``)."""
    if not isinstance(bn_stats, dict):
        raise TypeError(f"bn_stats must be a dict {{layer name: (beta, gamma)}} as returned by "
                        f"refimpl.fold.bn_statistics, got {type(bn_stats).__name__}")
    for k, v in bn_stats.items():
        if not (isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(t, torch.Tensor) for t in v)):
            raise TypeError(f"bn_stats[{k!r}] must be a (beta, gamma) pair of tensors")


@renamed(return_stats="return_report")
def high_bias_absorption(model: nn.Module, bn_stats: dict, n_sigma: float = 3.0,
                         return_report: bool = False):
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

    Returns the new GraphModule (eval mode), or (model, stats) when ``return_report`` with
    stats = bn_stats where each absorbed layer's beta is replaced by beta - c.
    """
    check_bn_stats(bn_stats)
    if not (isinstance(n_sigma, (int, float)) and n_sigma >= 0):
        raise ValueError(f"n_sigma must be a number >= 0, got {n_sigma!r}")
    gm = fold_all_bn(model)
    new_stats = dict(bn_stats)
    with torch.no_grad():
        for a, _, b in layer_pairs(gm, ("relu",), allow_none=False):
            if a.target not in bn_stats:
                continue
            l1, l2 = gm.get_submodule(a.target), gm.get_submodule(b.target)
            beta, gamma = bn_stats[a.target]
            if beta.shape != (out_channels(l1),):
                raise ValueError(f"bn_stats[{a.target!r}] has {tuple(beta.shape)} channels, the layer "
                                 f"{_out_channels(l1)}")
            c = torch.clamp(beta.detach() - n_sigma * gamma.detach().abs(), min=0).to(l1.weight.device)
            add_bias(l1, -c)
            add_bias(l2, response_to_constant_input(l2, c))
            new_stats[a.target] = (beta - c.to(beta.dtype), gamma)
    gm.eval()
    return (gm, new_stats) if return_report else gm

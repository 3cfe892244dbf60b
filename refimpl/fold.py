"""Batch-normalization folding: BN merged into the Conv/Linear layer before it.

* ``fold_bn`` — one eval-mode BatchNorm folded into one Conv1d/Conv2d/Linear (white paper,
  Nagel et al. 2021, §2.3.1, batch normalization folding, eqs. 9-12).
* ``fold_all_bn`` — every foldable Conv/Linear -> BatchNorm pair of an fx-traceable model.
* ``bn_statistics`` — the (beta, gamma) of the BatchNorm after each layer: the pre-activation
  of that layer is ~N(beta, gamma^2) per channel (DFQ, Nagel et al. 2019, §4.1 and §4.2),
  used by high-bias absorption and analytic bias correction (``refimpl.ptq``).
* ``reestimate_bn`` — BatchNorm running statistics recomputed on data with the model's current
  (e.g. quantized, after QAT) weights (BN re-estimation, Nagel et al. 2022).

Nothing here modifies its inputs, except ``reestimate_bn``, which updates BN statistics in place.
"""

from __future__ import annotations

import copy

import torch
import torch.fx
from torch import nn

from .graph import BN_LAYERS, call_counts, is_weight_layer, out_channels, trace

__all__ = ["fold_bn", "check_foldable", "fold_all_bn", "bn_statistics", "bn_scale_shift", "reestimate_bn", "FOLDABLE_PAIRS"]

# (layer class, BatchNorm class) pairs that fold. Linear -> BatchNorm1d assumes the Linear
# output is (N, features), as torch.nn.utils.fusion.fuse_linear_bn_eval does.
FOLDABLE_PAIRS = (
    (nn.Conv1d, nn.BatchNorm1d),
    (nn.Conv2d, nn.BatchNorm2d),
    (nn.Conv3d, nn.BatchNorm3d),
    (nn.Linear, nn.BatchNorm1d),
)


def check_foldable(layer, bn) -> None:
    """Raise TypeError/ValueError unless ``bn`` can be folded into ``layer``: a Conv1d/2d/3d or
    Linear and the matching BatchNorm of ``FOLDABLE_PAIRS``, same channel count, running statistics.
    Used by :func:`fold_bn` and ``refimpl.qmodel.fuse_layer_bn``."""
    if not is_weight_layer(layer):
        raise TypeError(f"layer must be a Conv1d/Conv2d/Conv3d/Linear, got {type(layer).__name__}")
    if not isinstance(bn, BN_LAYERS):
        raise TypeError(f"bn must be a BatchNorm1d/2d/3d, got {type(bn).__name__}")
    if not any(isinstance(layer, lt) and type(bn) is bt for lt, bt in FOLDABLE_PAIRS):
        raise TypeError(f"cannot fold {type(bn).__name__} into {type(layer).__name__}: "
                        f"allowed pairs are {[(a.__name__, b.__name__) for a, b in FOLDABLE_PAIRS]}")
    if bn.num_features != out_channels(layer):
        raise ValueError(f"bn.num_features={bn.num_features} does not match the layer's "
                         f"{out_channels(layer)} output channels")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn has no running statistics (track_running_stats=False): "
                         "an eval-mode BatchNorm needs running_mean/running_var to fold")


def bn_scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as y = a * x + c per channel: a = gamma / sqrt(var + eps), c = beta - a * mean
    (white paper §2.3.1, eq. 11). bn: a BatchNorm with running statistics; returns two detached
    (C,) tensors in its dtype. Used by :func:`fold_bn` and ``refimpl.qmodel.merge_bn``."""
    var, mean = bn.running_var.detach(), bn.running_mean.detach()
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(mean)
    a = gamma * torch.rsqrt(var + bn.eps)
    return a, beta - a * mean


def fold_bn(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A new layer computing bn(layer(x)) with bn in eval mode (white paper §2.3.1).

    W_fold = W * gamma / sqrt(var + eps) per output channel, b_fold = beta + (b - mean) * gamma /
    sqrt(var + eps) (b = 0 when the layer has no bias; the result always has a bias).
    layer: Conv1d/Conv2d/Conv3d (any groups, including depthwise) or Linear; bn: the matching
    BatchNorm (BatchNorm1d for Linear and Conv1d) whose num_features equals the layer's output
    channels. The result is a copy of ``layer`` (same class, dtype, device, requires_grad) with
    new weight/bias parameters; neither input is modified. Equal to
    ``torch.nn.utils.fusion.fuse_conv_bn_eval`` / ``fuse_linear_bn_eval``.

    Used in :ref:`ch5-sec-folding-batchnorm`.
    """
    check_foldable(layer, bn)
    a, c = bn_scale_shift(bn)
    w = layer.weight.detach()
    # The output channel is dim 0 of the weight for Conv (any groups) and Linear alike.
    shape = (-1,) + (1,) * (w.dim() - 1)
    b = layer.bias.detach() if layer.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    new_w = (w * a.reshape(shape).to(w.dtype)).to(w.dtype)
    new_b = (b * a + c).to(w.dtype)
    fused = copy.deepcopy(layer)
    req = layer.weight.requires_grad
    fused.weight = nn.Parameter(new_w, requires_grad=req)
    fused.bias = nn.Parameter(new_b, requires_grad=req)
    return fused


def _foldable_pairs(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """(layer node, bn node) pairs in graph order where the layer's only user is a matching BN.

    A layer whose output has another consumer (a residual branch reading the pre-BN tensor)
    is not folded: the other consumer would see the BN-scaled tensor. A layer or BN module
    called at several sites (shared weights) is not folded either.
    """
    modules = dict(gm.named_modules())
    calls = call_counts(gm)
    pairs = []
    for n in gm.graph.nodes:
        if n.op != "call_module" or not isinstance(modules[n.target], BN_LAYERS):
            continue
        if not n.args or not isinstance(n.args[0], torch.fx.Node):
            continue
        prev = n.args[0]
        if prev.op != "call_module" or not is_weight_layer(modules[prev.target]):
            continue
        layer, bn = modules[prev.target], modules[n.target]
        if len(prev.users) != 1 or calls[prev.target] != 1 or calls[n.target] != 1:
            continue
        if not any(isinstance(layer, lt) and type(bn) is bt for lt, bt in FOLDABLE_PAIRS):
            continue
        if bn.num_features != out_channels(layer) or bn.running_mean is None:
            continue
        pairs.append((prev, n))
    return pairs


def fold_all_bn(model: nn.Module) -> torch.fx.GraphModule:
    """A new eval-mode GraphModule with every foldable Conv/Linear -> BatchNorm pair folded.

    The model is traced with ``torch.fx.symbolic_trace`` (``refimpl.graph.trace``: ValueError if
    it cannot be). A pair is
    folded when a Conv1d/2d/3d or Linear node's only user is a BatchNorm of matching dimension
    (Conv1d/Linear -> BatchNorm1d, Conv2d -> BatchNorm2d, Conv3d -> BatchNorm3d) and
    num_features; the folded layer (``fold_bn``) keeps the conv's qualified name (e.g.
    "blocks.0.conv1") and the BatchNorm node and submodule are removed. Not folded (left as
    they are): a layer whose output also feeds another consumer besides the BN, a BN after
    anything else, modules called at several sites, BNs without running statistics.
    Outputs equal ``model.eval()(x)`` up to float rounding. The input model is not modified.

    Used in :ref:`ch5-sec-folding-batchnorm`, :ref:`ch6-sec-where-w4a4-loses-the-first-and`,
    :ref:`ch8-sec-pwlq`, :ref:`ch10-sec-training-with-the-grids`, :ref:`ch11-sec-where-the-quantizers-sit`,
    :ref:`ch12-sec-deployment`.
    """
    gm = trace(model)
    for layer_node, bn_node in _foldable_pairs(gm):
        layer, bn = gm.get_submodule(layer_node.target), gm.get_submodule(bn_node.target)
        fused = fold_bn(layer, bn)
        _set_submodule(gm, layer_node.target, fused)
        bn_node.replace_all_uses_with(layer_node)
        gm.graph.erase_node(bn_node)
        gm.delete_submodule(bn_node.target)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.eval()


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def bn_statistics(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer name: (beta, gamma)} of the BatchNorm that follows each Conv/Linear in ``model``.

    DFQ (Nagel et al. 2019) §4.1/§4.2: after folding, the pre-activation output of the layer
    is ~N(beta, gamma^2) per output channel. The pairs are those ``fold_all_bn`` folds, and
    the names are the layer's qualified names (as kept by ``fold_all_bn``). gamma is returned as
    ``|gamma|``, the standard deviation (a negative BN weight flips the sign, not the spread); a BN
    without affine parameters gives beta = 0, gamma = 1. Tensors are detached copies, shape
    (C_out,), in the BN's dtype and device. The model is not modified.
    """
    gm = trace(model)
    out = {}
    for layer_node, bn_node in _foldable_pairs(gm):
        bn = gm.get_submodule(bn_node.target)
        c = bn.num_features
        ref = bn.running_mean
        gamma = bn.weight.detach().abs().clone() if bn.weight is not None else torch.ones(c, dtype=ref.dtype, device=ref.device)
        beta = bn.bias.detach().clone() if bn.bias is not None else torch.zeros(c, dtype=ref.dtype, device=ref.device)
        out[layer_node.target] = (beta, gamma)
    return out


@torch.no_grad()
def reestimate_bn(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> int:
    """Recompute every BatchNorm's running mean and variance on ``x``, in place (BN re-estimation).

    Nagel et al. 2022, "Overcoming Oscillations in Quantization-Aware Training" (ICML): weights
    that oscillate between two grid points during QAT leave "wrongly estimated batch-normalization
    statistics" (their abstract) -- the exponential running averages describe weights the model
    no longer has -- so after training the statistics are recomputed with the final quantized
    weights on training data. Here each BN's statistics are reset and replaced by the cumulative average over all
    batches of ``x`` (``momentum=None``), the rest of the model in eval mode (quantizers fixed);
    every module's train/eval flag and each BN's momentum are restored afterwards.

    x: (N, ...) inputs on the model's device, any float dtype the model accepts. Returns the
    number of BatchNorm layers re-estimated (0: the model has none, nothing changes).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating torch.Tensor, got {type(x).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an int >= 2 (a batch variance needs two samples), got {batch_size!r}")
    if len(x) < 2:
        raise ValueError(f"x must hold at least 2 samples to estimate a variance, got {len(x)}")
    bns = [m for m in model.modules() if isinstance(m, BN_LAYERS)]
    if not bns:
        return 0
    missing = [type(m).__name__ for m in bns if m.running_mean is None]
    if missing:
        raise ValueError("a BatchNorm without running statistics (track_running_stats=False) cannot be re-estimated")
    flags = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in bns}
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None          # cumulative moving average: every batch counts equally
            m.train()
        # a last batch of one sample would make train-mode BN fail: fold it into the one before
        starts = list(range(0, len(x), batch_size))
        if len(starts) > 1 and len(x) - starts[-1] < 2:
            starts.pop()
        for i, start in enumerate(starts):
            stop = starts[i + 1] if i + 1 < len(starts) else len(x)
            model(x[start:stop])
    finally:
        for m, flag in flags.items():
            m.train(flag)
        for m, mom in momenta.items():
            m.momentum = mom
    return len(bns)

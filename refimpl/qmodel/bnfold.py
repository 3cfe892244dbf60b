"""BatchNorm folding during QAT: a quantized Conv/Linear fused with the BatchNorm after it.

MQBench (Li et al., NeurIPS 2021, arXiv 2111.03759) compares five ways of treating BN during QAT;
its paper-era code (``ModelTC/mqbench-paper``, ``prototype/quantization/bn_fold.py``) numbers them
-1..4 (:data:`BN_FOLDS`). Two of them need nothing new here: "keep" (-1) is
``quantize_model(model, config, keep_bn=True)`` then ``merge_bn``; "static" (0) is
``quantize_model(refimpl.fold.fold_all_bn(model), config)``. The other four fold BN into the
weight *while* training, so that the weight quantizer sees the folded weight W * gamma / sigma
that the deployed integer layer uses (white paper, Nagel et al. 2021, §4.2):

* "freeze" (1): the running statistics only, never updated (gamma, beta still learn);
* "naive" (2): Jacob et al. 2018 (integer-only inference, arXiv 1712.05877, its BN-folding
  section): a float pass gives the batch statistics, which are folded into W and b before the
  quantized pass;
* "white_paper" (3): Krishnamoorthi 2018 (arXiv 1806.08342, its BN-folding section): the weight
  is folded with the running std, and the output corrected by sigma_running / sigma_batch;
* "torch" (4): PyTorch's ``torch.ao.nn.intrinsic.qat.ConvBn2d``: the quantized folded conv is
  divided back by gamma / sigma_running and a real BN (batch statistics) follows.

:func:`fuse_bn` turns a keep-BN quantized model into one with fused modules
(:class:`QuantConvBN2d`, ...), :func:`unfuse_bn` turns them, after training, into plain quantized
layers with the folded weight and the same weight quantizer. Whether batch statistics are used is
decided by the BN submodule's own train flag, so ``refimpl.fold.reestimate_bn`` (which puts the
model in eval mode and only the BNs in train mode) re-estimates the statistics of naive,
white_paper and torch.

>>> import torch
>>> from refimpl.models import ResNetCNN
>>> from refimpl.qmodel import QuantConfig, quantize_model
>>> model = ResNetCNN(1, 10, width=4, num_blocks=1).eval()
>>> qm = fuse_bn(quantize_model(model, QuantConfig(weight_bits=4, act_bits=None), keep_bn=True), "torch")
>>> type(qm.stem.conv).__name__, BN_FOLDS[qm.stem.conv.strategy]
('QuantConvBN2d', 4)
>>> x = torch.randn(4, 1, 8, 8)
>>> bool(torch.equal(unfuse_bn(qm)(x), qm(x)))      # eval mode: the same function, BN folded away
True
"""

from __future__ import annotations

import copy

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice
from ..fold import check_foldable
from ..graph import BN_LAYERS, bn_after, call_counts
from .layers import QuantConv1d, QuantConv2d, QuantConv3d, QuantLayer, QuantLinear

__all__ = ["BN_FOLDS", "QuantLayerBN", "QuantConvBN1d", "QuantConvBN2d", "QuantConvBN3d", "QuantLinearBN",
           "FUSED_CLASSES", "fuse_layer_bn", "fuse_bn", "unfuse_bn"]

BN_FOLDS = {"keep": -1, "static": 0, "freeze": 1, "naive": 2, "white_paper": 3, "torch": 4}
"""Strategy name -> MQBench's number for it (``bnfold`` in its configs, ``search_fold_bn``).

Used in :ref:`ch11-sec-folding-batchnorm-during-qat`.
"""

_FUSED = tuple(n for n, code in BN_FOLDS.items() if code >= 1)


def _channels(t: torch.Tensor, axis: int) -> list[int]:
    """A shape broadcasting a (C,) vector along ``axis`` of a tensor shaped like ``t``."""
    shape = [1] * t.dim()
    shape[axis] = -1
    return shape


def _affine(bn: nn.Module, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gamma, beta) of bn, ones/zeros when it has no affine parameters (not detached)."""
    gamma = bn.weight if bn.weight is not None else torch.ones_like(ref)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(ref)
    return gamma, beta


class QuantLayerBN(QuantLayer):
    """Mixin: a quantized layer and the BatchNorm after it, trained with a folding ``strategy``.

    Holds the layer's ``weight`` W, ``bias`` b (or None), ``weight_quantizer`` Q, the BatchNorm as
    ``bn`` (a real ``nn.BatchNorm1d/2d/3d``) and ``strategy`` (one of "freeze", "naive",
    "white_paper", "torch"; see :data:`BN_FOLDS`). With a = gamma / sqrt(var + eps) per output
    channel, "folding" (mean, var) gives the weight W * a and the bias a * b + beta - a * mean.

    Batch statistics are used when ``bn.training`` is True (training, or
    ``refimpl.fold.reestimate_bn``), except by "freeze", which always uses the running ones.
    Without batch statistics every strategy computes layer(x, Q(W * a_run), folded running bias):
    :meth:`quantized_weight`, :meth:`folded_bias`, exactly what :func:`unfuse_bn` keeps. Input
    and output as the layer's; any float dtype, on the parameters' device.

    Used in :ref:`ch11-sec-folding-batchnorm-during-qat`.
    """

    def _op(self, x, weight, bias):
        raise NotImplementedError

    def fold_scale(self, var: torch.Tensor | None = None) -> torch.Tensor:
        """a = gamma * rsqrt(var + eps), (C,), differentiable in gamma; var: the running variance
        when None."""
        var = self.bn.running_var if var is None else var
        gamma, _ = _affine(self.bn, var)
        return gamma * torch.rsqrt(var + self.bn.eps)

    def folded_weight(self, var: torch.Tensor | None = None) -> torch.Tensor:
        """W * a per output channel (dim 0), the weight's shape and dtype."""
        a = self.fold_scale(var)
        return (self.weight * a.reshape(_channels(self.weight, 0)).to(self.weight.dtype)).to(self.weight.dtype)

    def folded_bias(self, mean: torch.Tensor | None = None, var: torch.Tensor | None = None) -> torch.Tensor:
        """a * b + beta - a * mean, (C,) (b = 0 without a bias); running statistics when None."""
        mean = self.bn.running_mean if mean is None else mean
        a = self.fold_scale(var)
        _, beta = _affine(self.bn, mean)
        b = self.bias if self.bias is not None else torch.zeros_like(a)
        return (b * a + (beta - a * mean)).to(self.weight.dtype)

    def quantized_weight(self) -> torch.Tensor:
        """Q(W * a_run): the folded weight with the running statistics, fake-quantized."""
        return self.weight_quantizer(self.folded_weight())

    def forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The folded layer (running statistics) with a given folded weight."""
        return self._op(x, weight, self.folded_bias())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strategy == "freeze" or not self.bn.training:
            return self.forward_with_weight(x, self.quantized_weight())
        if self.strategy == "torch":
            return self._forward_torch(x)
        # naive and white_paper: batch statistics of the float layer's output
        y = self._op(x, self.weight, self.bias)
        mean, var = self._batch_stats(y)
        if self.strategy == "naive":
            return self._op(x, self.weight_quantizer(self.folded_weight(var)), self.folded_bias(mean, var))
        # white_paper: weight folded with the running std (updated by this batch, as MQBench does),
        # the output rescaled by sigma_running / sigma_batch per channel
        run_var = self.bn.running_var
        out = self._op(x, self.quantized_weight(), None)
        ratio = torch.rsqrt(var + self.bn.eps) / torch.rsqrt(run_var + self.bn.eps)
        shape = _channels(out, 1)
        return out * ratio.reshape(shape).to(out.dtype) + self.folded_bias(mean, var).reshape(shape)

    def _forward_torch(self, x):
        """PyTorch's fold: Q(W * a_run) convolved, divided by a_run, plus b, through the real BN."""
        a = self.fold_scale()
        out = self._op(x, self.weight_quantizer(self.folded_weight()), None)
        shape = _channels(out, 1)
        out = out / a.reshape(shape).to(out.dtype)
        if self.bias is not None:
            out = out + self.bias.reshape(shape)
        return self.bn(out)

    def _batch_stats(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (dim 1) mean and biased variance of y (differentiable); the running
        statistics updated as the BN would (momentum, unbiased variance, cumulative if None)."""
        dims = [0] + list(range(2, y.dim()))
        mean = y.mean(dims)
        var = ((y - mean.reshape(_channels(y, 1))) ** 2).mean(dims)
        bn = self.bn
        n = y.numel() // y.shape[1]
        if n < 2:
            raise ValueError(f"batch statistics need more than 1 value per channel, got input {tuple(y.shape)}")
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            f = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.mul_(1 - f).add_(mean.detach().to(bn.running_mean.dtype), alpha=f)
            bn.running_var.mul_(1 - f).add_(var.detach().to(bn.running_var.dtype) * (n / (n - 1)), alpha=f)
        return mean, var

    def unfused(self) -> QuantLayer:
        """A plain quantized layer (its class before fusing) with weight W * a_run, the folded
        running bias and a copy of the same weight quantizer: the same eval-mode function."""
        with torch.no_grad():
            w, b = self.folded_weight().clone(), self.folded_bias().clone()
        plain = copy.deepcopy(self)
        del plain.bn
        del plain.strategy
        plain.__class__ = _PLAIN[type(self)]
        plain.weight = nn.Parameter(w, requires_grad=self.weight.requires_grad)
        plain.bias = nn.Parameter(b, requires_grad=self.weight.requires_grad)
        return plain

    def extra_repr(self) -> str:
        return super().extra_repr() + f", strategy={self.strategy!r}"


class _ConvBN(QuantLayerBN):
    def _op(self, x, weight, bias):
        return self._conv_forward(x, weight, bias)


class QuantConvBN1d(_ConvBN, QuantConv1d):
    """QuantConv1d fused with its BatchNorm1d (MQBench's BN folding, see :class:`QuantLayerBN`)."""


class QuantConvBN2d(_ConvBN, QuantConv2d):
    """QuantConv2d fused with its BatchNorm2d (MQBench's BN folding, see :class:`QuantLayerBN`)."""


class QuantConvBN3d(_ConvBN, QuantConv3d):
    """QuantConv3d fused with its BatchNorm3d (MQBench's BN folding, see :class:`QuantLayerBN`)."""


class QuantLinearBN(QuantLayerBN, QuantLinear):
    """QuantLinear (output (N, C)) fused with its BatchNorm1d (see :class:`QuantLayerBN`)."""

    def _op(self, x, weight, bias):
        return F.linear(x, weight, bias)


FUSED_CLASSES = {QuantConv1d: QuantConvBN1d, QuantConv2d: QuantConvBN2d, QuantConv3d: QuantConvBN3d,
                 QuantLinear: QuantLinearBN}
"""Quantized layer class -> its fused conv+BN class (:func:`fuse_layer_bn` swaps the copy's class)."""

_PLAIN = {v: k for k, v in FUSED_CLASSES.items()}


def fuse_layer_bn(layer: nn.Module, bn: nn.Module, strategy: str) -> QuantLayerBN:
    """A fused copy of a quantized layer and its BatchNorm, trained with ``strategy`` (MQBench §4,
    :data:`BN_FOLDS` 1-4).

    layer: a ``QuantConv1d/2d/3d`` or ``QuantLinear`` (with its ``weight_quantizer``); bn: the
    matching BatchNorm (``refimpl.fold.FOLDABLE_PAIRS``) with running statistics. The weight
    quantizer's range is re-set from the folded weight W * gamma / sigma_running (its range method),
    as the quantizer now sees folded weights. The result is in ``layer``'s train/eval mode; the
    inputs are not modified.
    """
    check_choice(strategy, "strategy", _FUSED)
    if type(layer) not in FUSED_CLASSES or not hasattr(layer, "weight_quantizer"):
        raise TypeError(f"layer must be a QuantConv1d/2d/3d or QuantLinear (from quantize_model), "
                        f"got {type(layer).__name__}")
    check_foldable(layer, bn)
    fused = copy.deepcopy(layer)
    fused.__class__ = FUSED_CLASSES[type(layer)]
    fused.bn = copy.deepcopy(bn)
    fused.strategy = strategy
    fused.train(layer.training)
    with torch.no_grad():
        fused.weight_quantizer.set_range(fused.folded_weight())
    return fused


def _pairs(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """(quantized layer node, BN node) for every BatchNorm call of gm; ValueError naming a BN that
    does not directly follow a quantized layer (as its only user)."""
    modules = dict(gm.named_modules())
    calls = call_counts(gm)
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), BN_LAYERS):
            continue
        prev = node.args[0] if node.args else None
        is_layer = (isinstance(prev, torch.fx.Node) and prev.op == "call_module"
                    and isinstance(modules.get(prev.target), QuantLayer)
                    and not isinstance(modules.get(prev.target), QuantLayerBN))
        if not is_layer or bn_after(prev, modules) is not node or calls[prev.target] != 1 or calls[node.target] != 1:
            what = prev.target if isinstance(prev, torch.fx.Node) and prev.op == "call_module" else getattr(
                prev, "name", prev)
            raise ValueError(f"BatchNorm {node.target!r} does not directly follow a quantized layer as its only "
                             f"user (it reads {what!r}): fold it or remove it before fuse_bn")
        pairs.append((prev, node))
    return pairs


def fuse_bn(qmodel: torch.fx.GraphModule, strategy: str) -> torch.fx.GraphModule:
    """A copy of a ``quantize_model(model, config, keep_bn=True)`` model whose (quantized layer,
    BatchNorm) pairs are fused modules training with ``strategy`` (MQBench's BN folding, §4).

    Each pair becomes a :class:`QuantLayerBN` under the layer's qualified name (built by
    :func:`fuse_layer_bn`: the weight quantizer's range is re-set from the folded weight) and the
    BN node and submodule are removed; activation quantizers are unchanged (their sites already
    follow the BN). strategy: a name of :data:`BN_FOLDS`. "keep" returns ``qmodel`` itself (the BN
    stays as it is: ``merge_bn`` after training). "static" is refused: it folds before quantizing,
    ``quantize_model(refimpl.fold.fold_all_bn(model), config)``. ValueError if qmodel has no
    BatchNorm, or one that does not directly follow a quantized layer (named). The input is not
    modified; the result keeps its train/eval mode.

    Used in :ref:`ch11-sec-folding-batchnorm-during-qat`.
    """
    if not isinstance(qmodel, torch.fx.GraphModule):
        raise TypeError(f"qmodel must be a GraphModule from quantize_model(..., keep_bn=True), "
                        f"got {type(qmodel).__name__}")
    check_choice(strategy, "strategy", tuple(BN_FOLDS))
    if strategy == "keep":
        return qmodel
    if strategy == "static":
        raise ValueError('strategy "static" folds BN before quantization: use '
                         "quantize_model(refimpl.fold.fold_all_bn(model), config) instead of fuse_bn")
    gm = copy.deepcopy(qmodel)
    pairs = _pairs(gm)
    if not pairs:
        raise ValueError("qmodel has no BatchNorm to fuse: build it with quantize_model(model, config, "
                         "keep_bn=True) from a model with BatchNorm layers")
    for layer_node, bn_node in pairs:
        fused = fuse_layer_bn(gm.get_submodule(layer_node.target), gm.get_submodule(bn_node.target), strategy)
        _set_submodule(gm, layer_node.target, fused)
        bn_node.replace_all_uses_with(layer_node)
        gm.graph.erase_node(bn_node)
        gm.delete_submodule(bn_node.target)
    gm.graph.lint()
    gm.recompile()
    return gm


def unfuse_bn(qmodel: nn.Module) -> nn.Module:
    """A copy of qmodel with every :class:`QuantLayerBN` replaced by its plain quantized layer
    (:meth:`QuantLayerBN.unfused`: weight W * gamma / sigma_running, the folded bias, the same
    weight quantizer), after QAT with a fused strategy (MQBench §4; white paper §4.2).

    The eval-mode output is unchanged (bit for bit), and the state_dict has the structure of
    ``quantize_model(refimpl.fold.fold_all_bn(model), config)``. A model without fused modules
    comes back as an unchanged copy. The input is not modified; the result keeps its mode.
    """
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"qmodel must be an nn.Module (from fuse_bn), got {type(qmodel).__name__}")
    gm = copy.deepcopy(qmodel)
    for name, m in list(gm.named_modules()):
        if isinstance(m, QuantLayerBN):
            _set_submodule(gm, name, m.unfused())
    return gm


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)

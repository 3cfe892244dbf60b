"""Access to a quantized model's quantizers and their switches: calibration, on/off, QAT modes,
and merging a kept BatchNorm after QAT (white paper §3.1, §3.7, §4.1, §4.2)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .._checks import check_choice, check_float_tensor, check_int
from ..capture import run_batches
from ..fold import bn_scale_shift
from ..graph import bn_after
from .layers import QuantLayer
from .quantizers import ActQuantizer, WeightQuantizer, quantizer_kinds

__all__ = ["quant_layers", "weight_quantizers", "act_quantizers", "calibrate", "set_quant_state",
           "set_trainable", "set_kind_options", "freeze", "merge_bn"]


def _check_qmodel(qmodel):
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"qmodel must be an nn.Module (from quantize_model), got {type(qmodel).__name__}")


def quant_layers(qmodel: nn.Module) -> dict:
    """{layer name: QuantConv1d/2d/3d or QuantLinear module} in module order.

    Used in :ref:`ch5-sec-where-the-quantizers-go`, :ref:`ch8-sec-choosing-the-breakpoint`,
    :ref:`ch11-sec-folding-batchnorm-during-qat`.
    """
    _check_qmodel(qmodel)
    return {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)}


def weight_quantizers(qmodel: nn.Module) -> dict:
    """{layer name: WeightQuantizer}.

    Used in :ref:`ch8-sec-post-training-quantization-with`.
    """
    return {n: m.weight_quantizer for n, m in quant_layers(qmodel).items()}


def act_quantizers(qmodel: nn.Module) -> dict:
    """{site name: ActQuantizer} in graph (topological) order; site names as ``quantize_model`` gives them.

    Used in :ref:`ch5-sec-where-the-quantizers-go`, :ref:`ch11-sec-where-the-quantizers-sit`,
    :ref:`ch12-sec-the-whole-model`.
    """
    _check_qmodel(qmodel)
    return {m.site: m for m in qmodel.modules() if isinstance(m, ActQuantizer)}


@torch.no_grad()
def calibrate(qmodel: nn.Module, x: torch.Tensor, batch_size: int = 256) -> None:
    """Set every activation quantizer's range from calibration inputs x (N, ...) (white paper §3.1).

    One pass over x in batches with the weights as currently quantized and all activation
    quantizers observing (passing float activations through), then each site's range is set by
    its range method (``QuantConfig.act_range_method``). Afterwards the sites quantize (those
    that were "off" stay off).

    Used in :ref:`ch5-sec-the-results-table`, :ref:`ch8-sec-post-training-quantization-with`,
    :ref:`ch11-sec-folding-batchnorm-during-qat`, :ref:`ch12-sec-deployment`.
    """
    _check_qmodel(qmodel)
    check_float_tensor(x, "x")
    batch_size = check_int(batch_size, "batch_size", 1)
    aqs = act_quantizers(qmodel)
    if not aqs:
        return
    before = {n: q.state for n, q in aqs.items()}
    try:
        for q in aqs.values():
            q.set_state("observe")
        run_batches(qmodel, x, batch_size)
        for q in aqs.values():
            q.compute_range()
    finally:
        for n, q in aqs.items():
            q.set_state("off" if before[n] == "off" else "quantize")


def set_quant_state(qmodel: nn.Module, weights: bool = True, acts: bool = True, layers=None) -> None:
    """Enable/disable weight and activation quantization (the white paper's debugging flow, §3.7).

    layers=None: every quantizer. Otherwise an iterable of layer names and/or site names: a layer
    name switches its weight quantizer and its output site (same name); a site name (e.g.
    "input", "blocks.0.relu2", "pool") its activation quantizer. Quantizers not named are left
    as they are.
    """
    _check_qmodel(qmodel)
    if not isinstance(weights, bool) or not isinstance(acts, bool):
        raise TypeError("weights and acts must be bools")
    wqs, aqs = weight_quantizers(qmodel), act_quantizers(qmodel)
    if layers is None:
        names_w, names_a = list(wqs), list(aqs)
    else:
        if isinstance(layers, str):
            layers = [layers]
        layers = list(layers)
        unknown = [n for n in layers if n not in wqs and n not in aqs]
        if unknown:
            raise ValueError(f"layers {unknown} are neither quantized layers {list(wqs)} nor sites {list(aqs)}")
        names_w = [n for n in layers if n in wqs]
        names_a = [n for n in layers if n in aqs]
    for n in names_w:
        wqs[n].enabled = weights
    for n in names_a:
        aqs[n].set_state("quantize" if acts else "off")


def set_trainable(qmodel: nn.Module, mode: str, weights: bool = True, acts: bool = True) -> list:
    """Switch quantizers to a quantizer kind (``quantizer_kinds()``): "ste" (learned scale and zero
    point, white paper §4.1), "lsq" (learned step size, Esser et al. 2020), "dsq" (learned clipping
    range and α of DSQ, Gong et al. 2019), "pot"/"apot", "pact", "dorefa", "qil" (MQBench's
    algorithms, ``refimpl.qmodel.learned_kinds``), any registered kind, or back to "fixed" (zero
    points rounded).

    Returns the list of quantizer parameters (for the optimizer). A checkpoint saved in a
    trainable mode loads into ``quantize_model(...)`` after the same ``set_trainable`` call, or
    call ``set_trainable(qmodel, "fixed")`` before saving.

    Used in :ref:`ch11-sec-folding-batchnorm-during-qat`.
    """
    _check_qmodel(qmodel)
    if mode == "none":
        raise ValueError('mode "none" is now spelled "fixed" (the quantizer kind of a fixed grid)')
    check_choice(mode, "mode", quantizer_kinds())
    qs = (list(weight_quantizers(qmodel).values()) if weights else []) + \
         (list(act_quantizers(qmodel).values()) if acts else [])
    params = []
    for q in qs:
        if mode != "fixed" and isinstance(q, WeightQuantizer) and q.rounding.numel():
            raise ValueError("a weight quantizer uses AdaRound rounding: set_rounding(None) before QAT")
        q.set_kind(mode)
        params += list(q.parameters(recurse=False))
    return params


def _selected(qmodel, weights, acts) -> list:
    if not isinstance(weights, bool) or not isinstance(acts, bool):
        raise TypeError("weights and acts must be bools")
    return (list(weight_quantizers(qmodel).values()) if weights else []) + \
        (list(act_quantizers(qmodel).values()) if acts else [])


def set_kind_options(qmodel: nn.Module, options: dict, weights: bool = True, acts: bool = True) -> None:
    """Set quantizer-kind options (e.g. APoT's ``rcf``, ``weight_normalization``, ``apot_k``) on
    every selected quantizer whose current kind has them (``Quantizer.set_option``).

    options: {name: value}. ValueError for an option that no selected quantizer's kind has
    (naming the options they do have); TypeError for a value of the wrong type.
    """
    _check_qmodel(qmodel)
    if not isinstance(options, dict):
        raise TypeError(f"options must be a dict {{name: value}}, got {type(options).__name__}")
    qs = _selected(qmodel, weights, acts)
    known = {n for q in qs for n in q.kind_impl.options(q)}
    unknown = sorted(set(options) - known)
    if unknown:
        kinds = sorted({q.kind for q in qs})
        raise ValueError(f"options {unknown} belong to none of the selected quantizers' kinds {kinds}; "
                         f"their options: {sorted(known)}")
    for q in qs:
        for name, value in options.items():
            if name in q.kind_impl.options(q):
                q.set_option(name, value)


def freeze(qmodel: nn.Module) -> None:
    """After QAT: switch every quantizer whose kind has an affine grid (``QuantizerKind.affine``) to
    "fixed", the deployable (scale, integer zero point) grid; quantizers of a non-uniform kind (PoT,
    APoT, PWLQ) keep their kind and what it learned. Parameters stay in the model; put it in eval mode.
    """
    _check_qmodel(qmodel)
    for q in _selected(qmodel, True, True):
        if q.kind_impl.affine:
            q.set_kind("fixed")


def _merge_one(gm, modules, node, bn_node) -> int:
    """Merge BN ``bn_node`` into the per-channel weight scales of layer ``node``; the number of
    weight codes clamped."""
    layer, bn, wq = modules[node.target], modules[bn_node.target], modules[node.target].weight_quantizer
    if wq.kind != "fixed":
        raise ValueError(f"{node.target}: freeze the quantizers first (set_trainable(qmodel, 'fixed'))")
    if wq.spec.axis is None or not wq.spec.symmetric:
        raise ValueError(f"{node.target}: merging BN needs per-channel symmetric weight quantization "
                         f"(QuantConfig(weight_per_channel=True, weight_symmetric=True)); got {wq.spec}")
    if bn.running_mean is None:
        raise ValueError(f"{bn_node.target} has no running statistics to merge")
    if not wq.enabled:
        raise ValueError(f"{node.target}: its weight quantizer is disabled")
    w = layer.weight
    s, _ = wq.qparams_like(w)
    s = s.to(w.dtype)
    q = torch.round(wq(w) / s)
    a, c = bn_scale_shift(bn)      # the same per-channel affine form fold_bn folds
    shape = s.shape
    q_new = q * torch.sign(a).reshape(shape)
    clamped = int(((q_new < wq.spec.qmin) | (q_new > wq.spec.qmax)).sum())
    q_new = q_new.clamp(wq.spec.qmin, wq.spec.qmax)
    s_new = wq.scale * a.abs().to(wq.scale.dtype)
    layer.weight.data = (q_new * s_new.reshape(shape).to(w.dtype)).to(w.dtype)
    bias = layer.bias if layer.bias is not None else torch.zeros_like(a)
    new_bias = (a * bias + c).to(w.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias)
    else:
        layer.bias.data = new_bias
    wq.set_qparams(s_new, torch.zeros_like(s_new))
    wq.set_rounding(None)
    bn_node.replace_all_uses_with(node)
    gm.graph.erase_node(bn_node)
    parent, _, leaf = bn_node.target.rpartition(".")
    delattr(gm.get_submodule(parent) if parent else gm, leaf)
    return clamped


@torch.no_grad()
def merge_bn(qmodel: torch.fx.GraphModule, return_report: bool = False):
    """A BN-free copy of a ``quantize_model(..., keep_bn=True)`` model: each BatchNorm merged into
    the per-channel weight scales of the quantized layer before it (white paper §4.2, Table 7,
    "keep original BN (per-channel)").

    Eval-mode BN is y = a * z + c per channel (a = gamma / sqrt(var + eps), c = beta - a * mean).
    With per-channel symmetric weights W_hat = s * q (codes q, zero point 0), a * W_hat =
    ``(s * |a|) * (sign(a) * q)``: the merged layer has the same integer codes up to sign, scale
    ``s * |a|`` and bias a * b + c, so it computes the same function -- except where a < 0 and a
    code equals qmin, whose negation -qmin = qmax + 1 is off the grid and clamps to qmax (one
    step off; a narrow-range grid avoids it). The weights become their quantized values
    (the float latent weights of QAT are not needed after training); activation quantizers are
    unchanged. Quantizers must be frozen (``set_trainable(qmodel, "fixed")``).

    Returns the new GraphModule (eval mode; the input is not modified), and with
    ``return_report=True`` also {layer name: number of codes clamped}.
    """
    if not isinstance(qmodel, torch.fx.GraphModule):
        raise TypeError(f"qmodel must be a GraphModule from quantize_model, got {type(qmodel).__name__}")
    gm = copy.deepcopy(qmodel)
    modules = dict(gm.named_modules())
    report = {}
    for node in list(gm.graph.nodes):
        if not (node.op == "call_module" and isinstance(modules.get(node.target), QuantLayer)):
            continue
        bn_node = bn_after(node, modules)
        if bn_node is not None:
            report[node.target] = _merge_one(gm, modules, node, bn_node)
    gm.graph.lint()
    gm.recompile()
    gm.eval()
    return (gm, report) if return_report else gm

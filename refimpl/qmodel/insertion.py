"""Quantizer insertion: a simulated-quantization copy of a model, built on its torch.fx graph.

White paper (Nagel et al. 2021, arXiv 2106.08295) §2.3 "Quantization simulation", Fig. 4: every
quantized layer computes with fake-quantized weights, and its output is fake-quantized where a
deployed integer kernel would requantize it; §2.3.1: a ReLU/ReLU6 that follows a layer is fused
into it, so the quantizer sits after the activation ("no quantizer between a conv and its ReLU").
The graph rules (what a layer, a ReLU, an add is) are ``refimpl.graph``'s.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .._checks import check_int
from ..graph import bn_after, device_of, fused_relu, is_add, is_avg_pool, is_pool, is_relu, keeps_sign, passes_values, trace
from .config import QuantConfig
from .control import act_quantizers, quant_layers
from .layers import QUANT_CLASSES
from .quantizers import ActQuantizer, WeightQuantizer

__all__ = ["quantize_model", "input_sites", "first_last_bits"]


def quantize_model(model: nn.Module, config: QuantConfig | None = None, keep_bn: bool = False
                   ) -> torch.fx.GraphModule:
    """A simulated-quantization copy of a BN-free FP32 model (white paper §2.3, Fig. 4).

    Traces the model (``refimpl.graph.trace``) and returns a ``GraphModule`` in which

    * every ``nn.Conv1d/2d/3d`` / ``nn.Linear`` not in ``config.keep_fp`` becomes a
      ``QuantConv1d/2d/3d`` / ``QuantLinear`` (a subclass of its class, same qualified name, same
      ``weight``/``bias``) with a ``weight_quantizer`` (``WeightQuantizer``) whose range is set
      from the weight now (static ranges, ``config.weight_range_method``);
    * ``ActQuantizer`` modules (in the ``act_quant`` ModuleDict), inserted uncalibrated (run
      ``calibrate`` before using them), sit at these *sites*:

        - the model input (``"input"``; ``"input_<arg>"`` for several inputs), unless only
          kept-in-float layers read it;
        - the output of every quantized layer (site name = the layer's name), after the
          ReLU/ReLU6 that is its only user if there is one (fused activation);
        - the output of a residual addition of two tensors, after its ReLU/ReLU6 if that is the
          add's only user (site name = that ReLU module's name, or the fx node name, "add_1");
        - the output of average pooling, which leaves the input's grid.

      Max pooling, flatten/reshape/view, dropout, identity and every other op pass through
      unquantized: their inputs carry the quantizers of their producers. A site whose tensor is
      non-negative by construction (a ReLU output, an add or average of such tensors) gets an
      unsigned grid (unless ``config.act_adaptive_sign`` is False); other sites a signed one.

      That is ``config.insertion=3``, MQBench's third pattern (the whole graph in integers). The
      other two put one quantizer on each tensor that a quantized layer reads (pattern 1,
      academic: "only the input and the weight of a convolutional or linear layer") or that a
      quantized layer, a residual addition or a pooling op reads (pattern 2, TensorRT); the site
      is named after the node producing the tensor ("input", "blocks.0.relu2", "flatten"), and
      other readers of that tensor (a residual branch under pattern 1) keep the float value.

    keep_bn: keep each BatchNorm that directly follows a quantized layer (its only user) as a
    float BN after the quantized weights, the layer's output site moving after the BN (and its
    fused ReLU): QAT's "keep original BN" option (white paper §4.2, Table 7), merged after
    training by :func:`refimpl.qmodel.merge_bn`. Any other BatchNorm is a ValueError.

    The input model is not modified; the result is in eval mode, on the model's device. Raises
    ValueError for BatchNorm layers (fold them first: ``refimpl.fold.fold_all_bn``), unknown
    ``keep_fp`` / ``layer_weight_bits`` / ``site_act_bits`` names, or a model torch.fx cannot trace.

    Used in :ref:`ch5-sec-where-the-quantizers-go`, :ref:`ch8-sec-choosing-the-breakpoint`,
    :ref:`ch11-sec-where-the-quantizers-sit`, :ref:`ch12-sec-deployment`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    if not isinstance(keep_bn, bool):
        raise TypeError(f"keep_bn must be a bool, got {keep_bn!r}")
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns and not keep_bn:
        raise ValueError(f"model has BatchNorm layers {bns}: fold them into the preceding layers first "
                         "with refimpl.fold.fold_all_bn(model), or pass keep_bn=True")
    gm = trace(model)
    gm.eval()
    modules = dict(gm.named_modules())
    quantized = _quantized_layers(gm, modules, config, bns)
    for name in quantized:
        mod = modules[name]
        mod.__class__ = QUANT_CLASSES[type(mod)]
        mod.weight_quantizer = WeightQuantizer(config.weight_spec(name), config.weight_range_method,
                                               kind=config.weight_quantizer, device=mod.weight.device)
        mod.weight_quantizer.set_range(mod.weight)
    if config.act_bits is not None:
        _insert_act_quantizers(gm, modules, set(quantized), config)
    gm.recompile()
    return gm


def _quantized_layers(gm, modules, config: QuantConfig, bns: list) -> list[str]:
    """The names of the layers to quantize, after checking every name the config gives."""
    layer_names = [n for n, m in modules.items() if type(m) in QUANT_CLASSES]
    unknown = [n for n in config.keep_fp if n not in layer_names]
    if unknown:
        raise ValueError(f"keep_fp names {unknown} are not Conv/Linear layers of the model; "
                         f"layers: {layer_names}")
    quantized = [n for n in layer_names if n not in config.keep_fp]
    if bns:
        kept = {bn_after(node, modules).target for node in gm.graph.nodes
                if node.op == "call_module" and node.target in quantized and bn_after(node, modules) is not None}
        stray = [n for n in bns if n not in kept]
        if stray:
            raise ValueError(f"keep_bn: BatchNorm layers {stray} do not directly follow a quantized Conv/Linear "
                             "layer (as its only user); fold or remove them")
    unknown = [n for n, _ in config.layer_weight_bits if n not in quantized]
    if unknown:
        raise ValueError(f"layer_weight_bits names {unknown} are not quantized Conv/Linear layers of "
                         f"the model; quantized layers: {quantized}")
    return quantized


def _nonnegative(graph, modules) -> set:
    """The nodes whose tensor is non-negative by construction: ReLU outputs, adds of two such
    tensors, and pooling/reshapes of one."""
    nonneg: set = set()
    for node in graph.nodes:
        if is_relu(node, modules):
            nonneg.add(node)
        elif is_add(node):
            if all(a in nonneg for a in node.args[:2]):
                nonneg.add(node)
        elif keeps_sign(node, modules) and node.args and node.args[0] in nonneg:
            nonneg.add(node)
    return nonneg


def _output_sites(graph, modules, quantized: set, config: QuantConfig) -> list:
    """[(anchor node, site name)] of insertion pattern 3: every tensor that leaves the grid."""
    sites, taken = [], set()
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]

    def add_site(anchor, name):
        if anchor not in taken:
            taken.add(anchor)
            sites.append((anchor, name))

    for node in graph.nodes:
        if node.op == "placeholder":
            readers = [u for u in node.users if not (u.op == "call_module" and u.target in config.keep_fp)]
            if readers:
                add_site(node, "input" if len(placeholders) == 1 else f"input_{node.name}")
        elif node.op == "call_module" and node.target in quantized:
            out = bn_after(node, modules) or node       # keep_bn: the site follows the BN
            relu = fused_relu(out, modules)
            add_site(relu if relu is not None else out, node.target)
        elif is_add(node):
            relu = fused_relu(node, modules)
            if relu is not None:
                add_site(relu, relu.target if relu.op == "call_module" else relu.name)
            else:
                add_site(node, node.name)
        elif is_avg_pool(node, modules):
            add_site(node, node.target if node.op == "call_module" else node.name)
    return sites


def _input_sites(graph, modules, quantized: set, pattern: int) -> tuple[list, dict]:
    """Insertion patterns 1 and 2: ([(anchor node, site name)], {anchor: [reading nodes]}); one
    quantizer per tensor, read by the quantized layers (and, pattern 2, additions and pooling)
    that consume it; other readers keep the float tensor."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    readers: dict = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in quantized:
            inputs = [node.args[0]]
        elif pattern == 2 and (is_add(node) or is_pool(node, modules)):
            inputs = node.all_input_nodes
        else:
            continue
        for a in inputs:
            if not isinstance(a, torch.fx.Node) or a.op == "get_attr":
                continue
            reader = node
            # an identity shortcut or a flatten carries its producer's tensor: quantize that one
            while passes_values(a, modules) and len(a.users) == 1 and isinstance(a.args[0], torch.fx.Node):
                reader, a = a, a.args[0]
            if reader not in readers.get(a, []):
                readers.setdefault(a, []).append(reader)
    sites = []
    for anchor in readers:
        if anchor.op == "placeholder":
            name = "input" if len(placeholders) == 1 else f"input_{anchor.name}"
        else:
            name = anchor.target if anchor.op == "call_module" else anchor.name
        sites.append((anchor, name))
    return sites, readers


def _activation_sites(graph, modules, quantized: set, config: QuantConfig):
    """[(anchor node, site name, signed, readers)] in graph order: where activation quantizers go
    (``config.insertion``); readers None = every user of the anchor reads the quantized tensor."""
    nonneg = _nonnegative(graph, modules)
    if config.insertion == 3:
        sites, readers = _output_sites(graph, modules, quantized, config), {}
    else:
        sites, readers = _input_sites(graph, modules, quantized, config.insertion)
    # graph order, so that act_quantizers() lists sites topologically
    order = {n: i for i, n in enumerate(graph.nodes)}
    sites.sort(key=lambda s: order[s[0]])
    return [(anchor, name, anchor not in nonneg, readers.get(anchor)) for anchor, name in sites]


def _insert_act_quantizers(gm, modules, quantized: set, config: QuantConfig) -> None:
    graph = gm.graph
    sites = _activation_sites(graph, modules, quantized, config)
    unknown = [n for n, _ in config.site_act_bits if n not in {name for _, name, _, _ in sites}]
    if unknown:
        raise ValueError(f"site_act_bits names {unknown} are not activation sites of the model; "
                         f"sites: {[name for _, name, _, _ in sites]}")
    gm.add_module("act_quant", nn.ModuleDict())
    device = device_of(gm)
    for anchor, name, signed, readers in sites:
        key = name.replace(".", "_")
        gm.act_quant[key] = ActQuantizer(config.act_spec(signed, name), name, config.act_range_method,
                                         config.act_percentile, config.act_samples, config.seed,
                                         fixed_zero_point=config.act_symmetric, kind=config.act_quantizer,
                                         device=device)
        users = list(anchor.users) if readers is None else readers
        with graph.inserting_after(anchor):
            qnode = graph.call_module(f"act_quant.{key}", (anchor,))
        for u in users:
            u.replace_input_with(anchor, qnode)
    graph.lint()


def input_sites(qmodel: nn.Module, layer: str) -> list:
    """Names of the activation sites whose quantized tensors ``layer`` reads (through max pooling,
    flatten, reshape and the other pass-through ops), in graph order."""
    if not isinstance(qmodel, torch.fx.GraphModule):
        raise TypeError(f"qmodel must be a GraphModule from quantize_model, got {type(qmodel).__name__}")
    layers = quant_layers(qmodel)
    if layer not in layers:
        raise ValueError(f"layer must be a quantized layer of qmodel, one of {list(layers)}; got {layer!r}")
    modules = dict(qmodel.named_modules())
    node = next(n for n in qmodel.graph.nodes if n.op == "call_module" and n.target == layer)
    found, stack, seen = [], [node.args[0]], set()
    while stack:
        n = stack.pop()
        if not isinstance(n, torch.fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.op == "call_module" and isinstance(modules[n.target], ActQuantizer):
            found.append(modules[n.target].site)
        elif n.op != "placeholder":
            stack.extend(a for a in n.all_input_nodes)
    order = list(act_quantizers(qmodel))
    return sorted(found, key=order.index)


def first_last_bits(model: nn.Module, config: QuantConfig, bits: int = 8) -> QuantConfig:
    """``config`` with the first and the last quantized layer at ``bits``: their weights and the
    activation sites they read (the network input; the last layer's input).

    A common convention of low-bit QAT papers (not the white paper's: its experiments use one
    bit-width for all layers, §2.4): the first layer reads raw data, which 4 bits cannot resolve,
    and the last produces the logits, while the two together cost little of the compute.
    ``model``: the BN-free model that will be passed to ``quantize_model``.

    Used in :ref:`ch6-sec-where-w4a4-loses-the-first-and`, :ref:`ch10-sec-training-with-the-grids`.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    bits = check_int(bits, "bits", 1, 16)
    qm = quantize_model(model, config)
    names = list(quant_layers(qm))
    if not names:
        raise ValueError("the model has no quantized Conv/Linear layer")
    first_last = dict.fromkeys([names[0], names[-1]])
    layer_bits = dict(config.layer_weight_bits) | {n: bits for n in first_last}
    site_bits = dict(config.site_act_bits)
    if config.act_bits is not None:
        site_bits |= {site: bits for n in first_last for site in input_sites(qm, n)}
    return dataclasses.replace(config, layer_weight_bits=layer_bits, site_act_bits=site_bits)

"""A quantized model as an ONNX graph in QDQ form (QuantizeLinear / DequantizeLinear pairs).

The ONNX operators (https://onnx.ai/onnx/operators/, opset 13): ``QuantizeLinear(x, y_scale,
y_zero_point[, axis])`` computes ``saturate(round(x / y_scale) + y_zero_point)``, rounding half to
even and saturating at the limits of the zero point's type (int8 or uint8);
``DequantizeLinear(x, x_scale, x_zero_point[, axis])`` computes ``(x - x_zero_point) * x_scale``;
``axis`` selects per-channel parameters (1-d scale and zero point). This is the form in which
onnxruntime's quantization tools write a statically quantized model ("QDQ format") and which its
graph optimiser fuses into integer kernels (QLinearConv, QLinearMatMul).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ..graph import BN_LAYERS, activation_kind, is_add, is_avg_pool, is_pool, passes_values, trace
from ..qmodel import ActQuantizer, QuantLayer, Quantizer, WeightQuantizer, act_quantizers, weight_quantizers
from .grid import affine_grid

__all__ = ["ONNX_OPSET", "SITE_TENSORS_KEY", "export_qdq", "export_float", "site_tensors"]

ONNX_OPSET = 13
"""The opset of the exported graph: 13 is the first with per-channel QuantizeLinear /
DequantizeLinear (``axis``); integer Clip needs 12."""

SITE_TENSORS_KEY = "refimpl.site_tensors"
"""The model property (``metadata_props``) under which :func:`export_qdq` records, as JSON, the
name of each activation site's dequantized tensor: {site: tensor name}."""

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def export_qdq(qmodel: torch.fx.GraphModule, example_input: torch.Tensor, path=None) -> onnx.ModelProto:
    """The ONNX graph (QDQ form, opset :data:`ONNX_OPSET`) of a calibrated, frozen ``quantize_model``.

    References: ONNX operators QuantizeLinear and DequantizeLinear (opset 13,
    https://onnx.ai/onnx/operators/onnx__QuantizeLinear.html, ``onnx__DequantizeLinear.html``);
    onnxruntime's "QDQ format" of a statically quantized model; the white paper (Nagel et al.
    2021, arXiv 2106.08295) §2.3, Fig. 4 for what is quantized where.

    The graph mirrors the torch.fx graph of ``qmodel`` node by node:

    * a quantized layer's weight is stored *already quantized*: an int8 (uint8 for an unsigned
      grid) initializer of the integer codes, read through DequantizeLinear with the quantizer's
      ``export()`` scale and zero point (per channel: 1-d scale and zero point and ``axis`` =
      ``spec.axis``). Why not a float initializer and a QuantizeLinear: the codes are then those
      refimpl's own forward uses (its rounding computes ``x * (1/scale)``, ONNX's ``x / scale``,
      which can differ by one ulp and flip a tie), including AdaRound-rounded weights, which a
      re-quantization would undo; sub-8-bit codes need no Clip; and it is the form onnxruntime's
      quantizer writes and its optimiser folds into integer kernels. Each code is checked:
      ``(code - zero_point) * scale`` must give refimpl's quantized weight exactly, else
      ValueError. Biases stay float32, as in the simulated model;
    * every activation site in state "quantize" is QuantizeLinear -> DequantizeLinear (per
      tensor), int8 for a signed grid, uint8 for an unsigned one, zero point the grid's. A grid
      narrower than its storage type (fewer than 8 bits, or narrow range [-127, 127]) gets an
      integer Clip(qmin, qmax) between the two: QuantizeLinear saturates only at the type's
      limits, so without it a 4-bit site would pass codes up to 127. A site in state "off" passes
      its tensor through (nothing is quantized there, as in the simulation);
    * Conv1d/2d/3d -> Conv, Linear -> Gemm (2-d input), ReLU -> Relu, ReLU6 -> Clip(0, 6) (module,
      function or method, as ``refimpl.graph.activation_kind`` reads them), a two-tensor add
      (``refimpl.graph.is_add``) -> Add, AdaptiveAvgPool(1) -> GlobalAveragePool, AvgPool -> AveragePool,
      MaxPool -> MaxPool, Flatten(1, -1) -> Flatten(axis=1), Identity/Dropout -> nothing.

    qmodel: a ``refimpl.qmodel.quantize_model`` GraphModule, BN folded, in eval mode, calibrated,
    every quantizer of kind "fixed" (``refimpl.qmodel.freeze`` after QAT).
    example_input: float32 tensor (N, C, ...), run through ``qmodel`` for the tensor ranks; the
    ONNX input "input" has its shape with a symbolic batch dimension "N"; the output "output" is
    qmodel's output (N, ...). path: where to save the model (str or Path), or None.
    Returns the ``onnx.ModelProto``, accepted by ``onnx.checker.check_model(full_check=True)``.

    Raises ValueError for: a model with no quantizers (naming what is missing), a BatchNorm, an
    activation site not calibrated or still observing (naming the site), more than 8 bits at a
    site or layer, a module or function with no mapping here (naming the node), a model in
    training mode; TypeError for a quantizer ONNX cannot express (naming the layer or site and
    quoting the kind's reason: PoT/APoT/PWLQ grids, DoReFa/PACT/QIL weights) or one in a training
    form (e.g. "dsq" before ``freeze``), and for arguments of the wrong type.

    The node-by-node translation is shared with :func:`export_float` (``_to_onnx``).

    Used in :ref:`ch12-sec-deployment`.
    """
    if not isinstance(qmodel, torch.fx.GraphModule):
        raise TypeError(f"qmodel must be a torch.fx.GraphModule from refimpl.qmodel.quantize_model, "
                        f"got {type(qmodel).__name__}")
    _check_input_and_path(example_input, path)
    _check_model(qmodel)
    return _to_onnx(qmodel, example_input, path, "qdq", "export_qdq")


def export_float(model: nn.Module, example_input: torch.Tensor, path=None) -> onnx.ModelProto:
    """The ONNX graph (float32, opset :data:`ONNX_OPSET`) of a plain float model: the reference
    that onnxruntime's own quantizer (``refimpl.deploy.ort.ort_quantize_static``) starts from,
    and the float baseline of a latency comparison.

    References: the ONNX operators (https://onnx.ai/onnx/operators/, opset 13); the graph is
    translated node by node exactly as :func:`export_qdq` translates a quantized one (the same
    helper, so the two graphs differ only by the QuantizeLinear/DequantizeLinear nodes): Conv,
    Gemm, Relu, Clip(0, 6), Add, the poolings, Flatten; weights and biases are float32
    initializers.

    model: an ``nn.Module`` in eval mode, BatchNorm already folded (``refimpl.fold.fold_all_bn``),
    without refimpl quantizers (a ``quantize_model`` graph is exported by :func:`export_qdq`),
    traceable by ``refimpl.graph.trace`` (torch.fx; ``model`` itself is not modified).
    example_input: float32 tensor (N, C, ...), run through the model for the tensor ranks; the
    ONNX input "input" has its shape with a symbolic batch dimension "N"; the output "output"
    is the model's output (N, ...). path: where to save the model (str or Path), or None.
    Returns the ``onnx.ModelProto``, accepted by ``onnx.checker.check_model(full_check=True)``.

    Raises TypeError for a non-module or an example_input that is not a float32 tensor, and
    ValueError for a BatchNorm layer (naming ``refimpl.fold.fold_all_bn``), refimpl quantizers
    (naming ``export_qdq``), a model in training mode, or a module or function with no mapping
    (naming the node).

    Used in :ref:`ch12-sec-the-whole-model`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_input_and_path(example_input, path)
    bns = [n for n, m in model.named_modules() if isinstance(m, BN_LAYERS)]
    if bns:
        raise ValueError(f"model has BatchNorm layers {bns}: fold them first (refimpl.fold.fold_all_bn)")
    quantized = [n or "<model>" for n, m in model.named_modules() if isinstance(m, (Quantizer, QuantLayer))]
    if quantized:
        raise ValueError(f"model contains refimpl quantizers or quantized layers {quantized[:4]}: export a "
                         "quantize_model graph with refimpl.deploy.onnx.export_qdq; export_float takes a float model")
    if model.training:
        raise ValueError("model is in training mode: call model.eval() before export_float")
    return _to_onnx(trace(model), example_input, path, "float", "export_float")


def _check_input_and_path(example_input, path) -> None:
    """TypeError/ValueError for an example_input that is not a float32 (N, C, ...) tensor or a bad path."""
    if not isinstance(example_input, torch.Tensor) or example_input.dtype != torch.float32:
        raise TypeError("example_input must be a float32 torch.Tensor")
    if example_input.ndim < 2:
        raise ValueError(f"example_input must be (N, C, ...), got shape {tuple(example_input.shape)}")
    if path is not None and not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str, a Path or None, got {type(path).__name__}")


def _to_onnx(gm: torch.fx.GraphModule, example_input: torch.Tensor, path, graph_name: str,
             who: str) -> onnx.ModelProto:
    """The checked ONNX model of a traced (float or quantized) graph: the shape pass, then the
    node-by-node translation shared by ``export_qdq`` and ``export_float`` (who: the caller's
    name, for error messages); saved to path unless it is None."""
    modules = dict(gm.named_modules())
    shapes = _shapes(gm, example_input)
    b = _Builder()
    names: dict = {}
    out_node = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node.args or node.name in names or any(n.op == "placeholder" for n in names):
                raise ValueError(f"{who} handles models with one tensor input")
            names[node] = "input"
        elif node.op == "output":
            out_node = node.args[0]
            if not isinstance(out_node, torch.fx.Node):
                raise ValueError(f"{who} handles models with one tensor output")
        elif node.op == "call_module":
            names[node] = _module_node(b, node, modules, names, shapes)
        elif node.op in ("call_function", "call_method"):
            names[node] = _function_node(b, node, modules, names)
        else:
            raise ValueError(f"node {node.name!r} ({node.op} {node.target}) has no ONNX mapping in {who}")
    b.node("Identity", [names[out_node]], "output")
    in_shape = ["N", *example_input.shape[1:]]
    out_shape = ["N", *shapes[out_node][1:]]
    graph = helper.make_graph(b.nodes, graph_name,
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)],
                              initializer=b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
                              producer_name="refimpl.deploy.onnx")
    model.ir_version = 8   # opset 13 graphs; readable by onnxruntime >= 1.10
    if b.sites:
        helper.set_model_props(model, {SITE_TENSORS_KEY: json.dumps(b.sites)})
    onnx.checker.check_model(model, full_check=True)
    if path is not None:
        onnx.save(model, str(path))
    return model


def site_tensors(model: onnx.ModelProto) -> dict[str, str]:
    """{activation site: name of its DequantizeLinear output tensor} in a graph from :func:`export_qdq`.

    Read from the model property :data:`SITE_TENSORS_KEY`; empty for a graph without it (a float
    graph, or one another tool wrote). ``refimpl.deploy.ort.ort_run(..., outputs=...)`` reads
    these tensors, to compare one site with the simulation's.
    """
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"model must be an onnx.ModelProto, got {type(model).__name__}")
    props = {p.key: p.value for p in model.metadata_props}
    return json.loads(props[SITE_TENSORS_KEY]) if SITE_TENSORS_KEY in props else {}


def _check_model(qmodel) -> None:
    """ValueError/TypeError naming what keeps ``qmodel`` from being exported (see ``export_qdq``)."""
    wqs, aqs = weight_quantizers(qmodel), act_quantizers(qmodel)
    if not wqs and not aqs:
        raise ValueError("qmodel has no quantizers (no QuantConv/QuantLinear layer with a weight_quantizer, no "
                         "act_quant activation site): quantize it with refimpl.qmodel.quantize_model first")
    if qmodel.training:
        raise ValueError("qmodel is in training mode: call qmodel.eval() before export_qdq")
    bns = [n for n, m in qmodel.named_modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))]
    if bns:
        raise ValueError(f"qmodel has BatchNorm layers {bns}: merge them (refimpl.qmodel.merge_bn) or fold them "
                         "before quantize_model (refimpl.fold.fold_all_bn)")
    for name, q in wqs.items():
        if q.enabled:
            _grid(q, f"weight of layer {name!r}")
    for site, q in aqs.items():
        where = f"activation site {site!r}"
        if q.state == "observe":
            raise ValueError(f"{where} is still observing (calibration unfinished): run refimpl.qmodel.calibrate")
        if q.state == "quantize":
            if not bool(q.calibrated):
                raise ValueError(f"{where} is not calibrated (no range): run "
                                 "refimpl.qmodel.calibrate(qmodel, x) before export_qdq")
            _grid(q, where)


def _grid(q: Quantizer, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(scale float32, zero point int8/uint8) numpy arrays of a quantizer ONNX can run exactly
    (:func:`refimpl.deploy.grid.affine_grid`, the check integer-only inference shares)."""
    scale, zp = affine_grid(q, where)
    return scale, zp.astype(np.int8 if q.spec.signed else np.uint8)


class _Builder:
    """Accumulates ONNX nodes and initializers with unique tensor names."""

    def __init__(self):
        self.nodes, self.initializers, self._count = [], [], 0
        self.sites: dict = {}      # activation site -> its DequantizeLinear output tensor

    def fresh(self, base: str) -> str:
        """A new unique tensor/node name starting with base (dots replaced)."""
        self._count += 1
        return f"{base.replace('.', '_')}_{self._count}"

    def const(self, base: str, array: np.ndarray) -> str:
        """Add array as an initializer; returns its name."""
        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list, output: str | None = None, base: str | None = None, **attrs) -> str:
        """Add one ONNX node with one output; returns the output's name."""
        output = output or self.fresh(base or op)
        self.nodes.append(helper.make_node(op, inputs, [output], name=self.fresh(f"{op}_node"), **attrs))
        return output


def _shapes(qmodel, x) -> dict:
    """{fx node: output shape} from one run of ``qmodel`` on x."""
    shapes: dict = {}

    class _Recorder(torch.fx.Interpreter):
        """Runs the graph, recording each tensor-valued node's shape."""

        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                shapes[n] = tuple(out.shape)
            return out

    with torch.no_grad():
        _Recorder(qmodel).run(x)
    return shapes


def _qdq(b: _Builder, x: str, q: ActQuantizer, site: str) -> str:
    """QuantizeLinear (-> Clip to the grid) -> DequantizeLinear of tensor x at an activation site."""
    scale, zp = _grid(q, f"activation site {site!r}")
    s, z = b.const(f"{site}_scale", scale), b.const(f"{site}_zero_point", zp)
    codes = b.node("QuantizeLinear", [x, s, z], base=f"{site}_q")
    info = np.iinfo(zp.dtype)
    if q.spec.qmin > info.min or q.spec.qmax < info.max:
        lo = b.const(f"{site}_qmin", np.array(q.spec.qmin, dtype=zp.dtype))
        hi = b.const(f"{site}_qmax", np.array(q.spec.qmax, dtype=zp.dtype))
        codes = b.node("Clip", [codes, lo, hi], base=f"{site}_clip")
    b.sites[site] = b.node("DequantizeLinear", [codes, s, z], base=f"{site}_dq")
    return b.sites[site]


def _weight(b: _Builder, name: str, layer: nn.Module) -> str:
    """The layer's weight as an ONNX tensor: int8/uint8 codes -> DequantizeLinear, or float."""
    w = layer.weight.detach().to(torch.float32)
    wq = getattr(layer, "weight_quantizer", None)
    if not isinstance(layer, QuantLayer) or not isinstance(wq, WeightQuantizer) or not wq.enabled:
        return b.const(f"{name}_weight", w.cpu().numpy())
    where = f"weight of layer {name!r}"
    scale, zp = _grid(wq, where)
    with torch.no_grad():
        w_hat = layer.quantized_weight().detach().to(torch.float32).cpu()
    shape = [1] * w.ndim
    axis = None
    if wq.spec.axis is not None:
        axis = wq.spec.axis % w.ndim
        shape[axis] = w.shape[axis]
        if scale.shape != (w.shape[axis],):
            raise ValueError(f"{where}: {scale.shape[0] if scale.ndim else 1} scales for {w.shape[axis]} channels")
    s_b = torch.from_numpy(scale).reshape(shape)
    z_b = torch.from_numpy(zp.astype(np.int64)).reshape(shape).to(torch.float32)
    codes = torch.round(w_hat * torch.reciprocal(s_b)) + z_b
    codes = codes.clamp(wq.spec.qmin, wq.spec.qmax)
    if not torch.equal((codes - z_b) * s_b, w_hat):
        raise ValueError(f"{where}: the quantized weight is not on the exported grid (scale, zero_point), so "
                         "DequantizeLinear could not reproduce it")
    c = b.const(f"{name}_weight_codes", codes.numpy().astype(zp.dtype))
    s, z = b.const(f"{name}_weight_scale", scale), b.const(f"{name}_weight_zero_point", zp)
    attrs = {} if axis is None else {"axis": axis}
    return b.node("DequantizeLinear", [c, s, z], base=f"{name}_weight_dq", **attrs)


def _conv_attrs(name: str, m: nn.Module) -> dict:
    """ONNX Conv attributes (kernel_shape, strides, dilations, pads, group) of a torch conv layer."""
    if m.padding_mode != "zeros":
        raise ValueError(f"layer {name!r}: padding_mode {m.padding_mode!r} has no ONNX Conv equivalent here")
    if isinstance(m.padding, str):
        if m.padding != "valid":
            raise ValueError(f"layer {name!r}: padding={m.padding!r} is not exported; use explicit padding")
        pads = [0] * len(m.kernel_size)
    else:
        pads = list(m.padding)
    return {"kernel_shape": list(m.kernel_size), "strides": list(m.stride), "dilations": list(m.dilation),
            "pads": pads + pads, "group": m.groups}


def _as_list(v, n: int) -> list:
    """An int or a tuple of a pooling argument as a list of n ints."""
    return list(v) if isinstance(v, (tuple, list)) else [v] * n


def _module_node(b: _Builder, node, modules: dict, names: dict, shapes: dict) -> str:
    """The ONNX nodes of one fx call_module node; returns the output tensor's name.

    What a node *is* (ReLU, pooling, a value-passing op) is decided by ``refimpl.graph``'s
    predicates, the rules every transform of the package shares; only the translation is here.
    """
    name, m = node.target, modules[node.target]
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], torch.fx.Node):
        raise ValueError(f"node {node.name!r} (module {name!r}) must take one tensor argument")
    x = names[node.args[0]]
    in_rank = len(shapes[node.args[0]])
    if isinstance(m, ActQuantizer):
        return x if m.state == "off" else _qdq(b, x, m, m.site)
    if isinstance(m, _CONV):
        inputs = [x, _weight(b, name, m)] + ([b.const(f"{name}_bias", m.bias.detach().float().cpu().numpy())]
                                             if m.bias is not None else [])
        return b.node("Conv", inputs, base=name, **_conv_attrs(name, m))
    if isinstance(m, nn.Linear):
        if in_rank != 2:
            raise ValueError(f"layer {name!r}: Linear on a {in_rank}-d input; refimpl.deploy.onnx maps Linear to Gemm, "
                             "which needs (N, features)")
        inputs = [x, _weight(b, name, m)] + ([b.const(f"{name}_bias", m.bias.detach().float().cpu().numpy())]
                                             if m.bias is not None else [])
        return b.node("Gemm", inputs, base=name, transB=1)
    act = activation_kind(node, modules)
    if act is not None:
        return _activation(b, act, x, name)
    if isinstance(m, nn.Flatten):
        if m.start_dim != 1 or m.end_dim not in (-1, in_rank - 1):
            raise ValueError(f"module {name!r}: only Flatten(start_dim=1, end_dim=-1) is exported")
        return b.node("Flatten", [x], base=name, axis=1)
    if passes_values(node, modules):   # identity, eval-mode dropout
        return x
    if is_pool(node, modules):
        return _pool(b, name, m, x, in_rank - 2, average=is_avg_pool(node, modules))
    raise ValueError(f"module {name!r} ({type(m).__name__}) has no ONNX mapping in refimpl.deploy.onnx")


def _activation(b: _Builder, kind: str, x: str, base: str) -> str:
    """Relu, or Clip(0, 6) for ReLU6."""
    if kind == "relu":
        return b.node("Relu", [x], base=base)
    lo, hi = b.const(f"{base}_min", np.array(0.0, np.float32)), b.const(f"{base}_max", np.array(6.0, np.float32))
    return b.node("Clip", [x, lo, hi], base=base)


def _pool(b: _Builder, name: str, m: nn.Module, x: str, k: int, average: bool) -> str:
    """GlobalAveragePool (adaptive average to size 1), AveragePool or MaxPool of a pooling module."""
    if hasattr(m, "output_size"):
        if not average or any(s != 1 for s in _as_list(m.output_size, 1)):
            raise ValueError(f"module {name!r}: of the adaptive poolings only average pooling to size 1 is exported")
        return b.node("GlobalAveragePool", [x], base=name)
    pads = _as_list(m.padding, k)
    common = {"kernel_shape": _as_list(m.kernel_size, k), "strides": _as_list(m.stride, k), "pads": pads + pads,
              "ceil_mode": int(m.ceil_mode)}
    if average:
        if m.divisor_override is not None:
            raise ValueError(f"module {name!r}: divisor_override is not exported")
        return b.node("AveragePool", [x], base=name, count_include_pad=int(m.count_include_pad), **common)
    if m.return_indices:
        raise ValueError(f"module {name!r}: return_indices is not exported")
    return b.node("MaxPool", [x], base=name, dilations=_as_list(m.dilation, k), **common)


def _function_node(b: _Builder, node, modules: dict, names: dict) -> str:
    """The ONNX node of an fx call_function / call_method node: add, relu/relu6, flatten."""
    args = node.args
    tensors = [a for a in args if isinstance(a, torch.fx.Node)]
    if is_add(node) and len(args) == 2 and not node.kwargs:
        return b.node("Add", [names[args[0]], names[args[1]]], base=node.name)
    act = activation_kind(node, modules)
    if act is not None and len(args) == 1 and tensors and not node.kwargs.get("inplace", False):
        return _activation(b, act, names[args[0]], node.name)
    is_flatten = passes_values(node, modules) and getattr(node.target, "__name__", node.target) == "flatten"
    if is_flatten and tensors and args[0] is tensors[0] and tuple(args[1:]) in ((1,), (1, -1)) and not node.kwargs:
        return b.node("Flatten", [names[args[0]]], base=node.name, axis=1)
    raise ValueError(f"node {node.name!r} ({node.op} {getattr(node.target, '__name__', node.target)}) has no ONNX "
                     "mapping in refimpl.deploy.onnx (two-tensor add, relu, relu6 and flatten(x, 1) are mapped)")

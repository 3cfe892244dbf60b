"""The model graph: tracing with torch.fx, the kinds of layers and activations, and the patterns
(layer pairs, chains, fused activations) that BN folding, cross-layer equalization, quantizer
insertion and AdaRound look for.

One place for the rules, so that every transform agrees on what a "layer" or a "ReLU" is:

* a *weight layer* is an ``nn.Conv1d/2d/3d`` (any groups) or ``nn.Linear``, not a transposed
  convolution (:data:`WEIGHT_LAYERS`, :func:`is_weight_layer`);
* a *ReLU* is an ``nn.ReLU``/``nn.ReLU6`` module, ``F.relu``/``torch.relu``/``torch.relu_``/
  ``F.relu6`` or the ``.relu()``/``.relu_()`` method (:func:`activation_kind`);
* a *residual add* is ``+``, ``+=``, ``torch.add`` or ``.add``/``.add_`` of two tensors;
* *average pooling* leaves a tensor's grid (it divides); max pooling, flatten, reshape, dropout,
  identity keep the sign of their input (:func:`keeps_sign`).

Used by ``refimpl.fold`` (white paper §2.3.1), ``refimpl.ptq`` (DFQ §4: CLE, absorption, bias
correction; AdaRound) and ``refimpl.qmodel`` (white paper §2.3, Fig. 4: where quantizers sit).
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

__all__ = [
    "WEIGHT_LAYERS", "BN_LAYERS", "trace", "device_of", "is_weight_layer", "in_channels", "out_channels",
    "call_counts", "activation_kind", "is_relu", "is_add", "is_avg_pool", "is_pool", "passes_values", "keeps_sign", "fused_relu",
    "bn_after", "layer_pairs", "chains", "nodes_of",
]

WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BN_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

_RELU_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6"}
_RELU_METHODS = ("relu", "relu_")
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
_AVG_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_AVG_FUNCTIONS = (F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, torch.mean)
_SIGN_KEEPING_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                         nn.Flatten, nn.Identity, nn.Dropout) + _AVG_MODULES
_MAX_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_MAX_FUNCTIONS = (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d)
_SIGN_KEEPING_FUNCTIONS = (torch.flatten, F.max_pool1d, F.max_pool2d, F.dropout) + _AVG_FUNCTIONS
_VALUE_METHODS = ("view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze")
_SIGN_KEEPING_METHODS = ("view", "reshape", "flatten", "mean", "contiguous", "squeeze", "unsqueeze")


# --------------------------------------------------------------------------------------------
# Tracing and modules
# --------------------------------------------------------------------------------------------
class _NamingTracer(torch.fx.Tracer):
    """torch.fx's default tracer, remembering which submodule was being traced when tracing failed."""

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:
            # the innermost module sets it first; outer modules leave it alone
            if not hasattr(e, "refimpl_module"):
                e.refimpl_module = self.path_of_module(m)
            raise


def _where(e: Exception, graph: torch.fx.Graph) -> str:
    """Where tracing stopped: the submodule being traced and the last node recorded."""
    module = getattr(e, "refimpl_module", None)
    where = f" in submodule {module!r}" if module else " in the model's own forward"
    nodes = [n for n in graph.nodes if n.op != "output"]
    if nodes:
        last = nodes[-1]
        target = last.target if isinstance(last.target, str) else getattr(last.target, "__name__", last.target)
        where += f", after node {last.name!r} ({last.op} {target})"
    return where


def trace(model: nn.Module, tracer: torch.fx.Tracer | None = None) -> torch.fx.GraphModule:
    """A traced deep copy of ``model`` (``torch.fx.symbolic_trace``, or ``tracer``): editing its
    graph or modules never touches ``model``. A GraphModule is deep-copied as it is.

    Raises TypeError for a non-module, and ValueError quoting torch.fx's message for a model fx
    cannot trace symbolically (data-dependent control flow, unsupported Python); with the default
    tracer the message names the submodule being traced and the last graph node recorded (the
    value the failing Python used).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.fx.GraphModule):
        return copy.deepcopy(model)
    model = copy.deepcopy(model)
    naming = tracer is None
    tracer = _NamingTracer() if naming else tracer
    try:
        return torch.fx.GraphModule(model, tracer.trace(model), type(model).__name__)
    except Exception as e:  # torch.fx raises TraceError, TypeError, RuntimeError, ... depending on the cause
        where = _where(e, tracer.graph) if naming and getattr(tracer, "graph", None) is not None else ""
        raise ValueError(f"torch.fx.symbolic_trace could not trace {type(model).__name__}{where} (data-dependent "
                         f"control flow or unsupported Python?): {type(e).__name__}: {e}") from e


def device_of(module: nn.Module, default: torch.device | None = None) -> torch.device | None:
    """The device of ``module``'s first parameter, else of its first buffer, else ``default``."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    t = next(module.parameters(), None)
    if t is None:
        t = next(module.buffers(), None)
    return t.device if t is not None else default


def is_weight_layer(m) -> bool:
    """Conv1d/Conv2d/Conv3d (any groups) or Linear, not a transposed convolution."""
    return isinstance(m, WEIGHT_LAYERS) and not isinstance(m, nn.modules.conv._ConvTransposeNd)


def in_channels(layer: nn.Module) -> int:
    """Input channels (features) of a weight layer."""
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def out_channels(layer: nn.Module) -> int:
    """Output channels (features) of a weight layer: dim 0 of its weight."""
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def call_counts(gm: torch.fx.GraphModule) -> dict[str, int]:
    """{module name: number of call sites in the graph} (a module called twice shares weights)."""
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            counts[n.target] = counts.get(n.target, 0) + 1
    return counts


def nodes_of(gm: torch.fx.GraphModule, names) -> list[str]:
    """The call sites' module names among ``names``, in graph order, each once."""
    names = set(names)
    order = [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target in names]
    return list(dict.fromkeys(order))


# --------------------------------------------------------------------------------------------
# Node kinds
# --------------------------------------------------------------------------------------------
def activation_kind(node: torch.fx.Node, modules: dict) -> str | None:
    """"relu" or "relu6" for a ReLU/ReLU6 node (module, function or method), else None."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.ReLU6):
            return "relu6"
        return "relu" if isinstance(m, nn.ReLU) else None
    if node.op == "call_function":
        return _RELU_FUNCTIONS.get(node.target)
    if node.op == "call_method" and node.target in _RELU_METHODS:
        return "relu"
    return None


def is_relu(node: torch.fx.Node, modules: dict) -> bool:
    """A ReLU or ReLU6 node (see :func:`activation_kind`)."""
    return activation_kind(node, modules) is not None


def is_add(node: torch.fx.Node) -> bool:
    """An addition of two tensors (a residual add)."""
    tensors = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return len(tensors) == 2
    return node.op == "call_method" and node.target in _ADD_METHODS and len(tensors) == 2


def is_avg_pool(node: torch.fx.Node, modules: dict) -> bool:
    """Average pooling (module, function, ``torch.mean`` or ``.mean``)."""
    if node.op == "call_module":
        return isinstance(modules[node.target], _AVG_MODULES)
    if node.op == "call_function":
        return node.target in _AVG_FUNCTIONS
    return node.op == "call_method" and node.target == "mean"


def is_pool(node: torch.fx.Node, modules: dict) -> bool:
    """Average or max pooling (module or function; ``torch.mean`` / ``.mean`` count as average)."""
    if is_avg_pool(node, modules):
        return True
    if node.op == "call_module":
        return isinstance(modules[node.target], _MAX_MODULES)
    return node.op == "call_function" and node.target in _MAX_FUNCTIONS


def passes_values(node: torch.fx.Node, modules: dict) -> bool:
    """An op that returns its input's values unchanged, only rearranged (identity, eval-mode
    dropout, flatten, reshape/view, squeeze/unsqueeze, contiguous)."""
    if node.op == "call_module":
        return isinstance(modules[node.target], (nn.Identity, nn.Dropout, nn.Flatten))
    if node.op == "call_function":
        return node.target in (torch.flatten, F.dropout, torch.reshape, torch.squeeze, torch.unsqueeze)
    return node.op == "call_method" and node.target in _VALUE_METHODS


def keeps_sign(node: torch.fx.Node, modules: dict) -> bool:
    """An op whose output is non-negative when its first input is (pooling, reshapes, dropout)."""
    if node.op == "call_module":
        return isinstance(modules[node.target], _SIGN_KEEPING_MODULES)
    if node.op == "call_function":
        return node.target in _SIGN_KEEPING_FUNCTIONS
    return node.op == "call_method" and node.target in _SIGN_KEEPING_METHODS


def fused_relu(node: torch.fx.Node, modules: dict) -> torch.fx.Node | None:
    """The ReLU/ReLU6 that is ``node``'s only user, else None (white paper §2.3.1 fusing)."""
    users = list(node.users)
    if len(users) == 1 and is_relu(users[0], modules):
        return users[0]
    return None


def bn_after(node: torch.fx.Node, modules: dict) -> torch.fx.Node | None:
    """The BatchNorm module node that is ``node``'s only user, else None."""
    users = list(node.users)
    if (len(users) == 1 and users[0].op == "call_module"
            and isinstance(modules.get(users[0].target), nn.modules.batchnorm._BatchNorm)):
        return users[0]
    return None


# --------------------------------------------------------------------------------------------
# Patterns: consecutive layers through which per-channel scaling commutes (DFQ §4.1)
# --------------------------------------------------------------------------------------------
def layer_pairs(gm: torch.fx.GraphModule, acts: tuple[str, ...] = ("relu",), allow_none: bool = True):
    """[(layer1 node, activation node or None, layer2 node)] through which channel scaling commutes.

    layer1's output has exactly one user: layer2, or an activation of a kind in ``acts``
    (:func:`activation_kind`) whose only user is layer2 (as its input); ``allow_none``: also
    pairs with no activation between. Channel counts match; every module is called once. A
    tensor that also feeds a residual add or another consumer ends the chain.
    """
    modules = dict(gm.named_modules())
    counts = call_counts(gm)
    pairs = []
    for n in gm.graph.nodes:
        if n.op != "call_module" or not is_weight_layer(modules[n.target]) or counts[n.target] != 1:
            continue
        if len(n.users) != 1:
            continue
        nxt = next(iter(n.users))
        act = None
        kind = activation_kind(nxt, modules)
        if kind is not None:
            if kind not in acts or len(nxt.users) != 1 or len(nxt.args) < 1 or nxt.args[0] is not n:
                continue
            if nxt.op == "call_module" and counts[nxt.target] != 1:
                continue
            act, nxt = nxt, next(iter(nxt.users))
        elif not allow_none:
            continue
        if nxt.op != "call_module" or not is_weight_layer(modules[nxt.target]) or counts[nxt.target] != 1:
            continue
        src = act if act is not None else n
        if not nxt.args or nxt.args[0] is not src or len(nxt.args) > 1 or nxt.kwargs:
            continue
        if out_channels(modules[n.target]) != in_channels(modules[nxt.target]):
            continue
        pairs.append((n, act, nxt))
    return pairs


def chains(pairs) -> list[list[torch.fx.Node]]:
    """Consecutive :func:`layer_pairs` joined into maximal chains [layer1, layer2, layer3, ...]."""
    nxt = {p[0]: p[2] for p in pairs}
    has_prev = {p[2] for p in pairs}
    out = []
    for start in nxt:
        if start in has_prev:
            continue
        chain = [start]
        while chain[-1] in nxt:
            chain.append(nxt[chain[-1]])
        out.append(chain)
    return out

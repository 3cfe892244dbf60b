"""Simulated quantization of a float model in place, without graph rewriting: weights
fake-quantized, activations by forward hooks (white paper, Nagel et al. 2021, §2.3; book
chapters 1-3).

* ``quantizable_layers``, ``fake_quantize_weights``, ``weight_quant_report`` — weight-only
  simulated quantization of a model's Conv/Linear layers, per tensor or per channel, and the
  per-layer error it causes (white paper §2.2-2.4).
* ``activation_fake_quant``, ``evaluate_with_activation_ranges`` — a model whose chosen module
  outputs are fake-quantized with fixed ranges, and its test accuracy.

For a model with quantizers inserted into its graph, see ``refimpl.qmodel``. Nothing here
modifies its inputs: weights are quantized in a copy, activation hooks are removed on exit.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ._api import renamed
from ._checks import check_choice
from .calib import range_method_fn
from .capture import forward_hooks
from .graph import WEIGHT_LAYERS
from .metrics import sqnr_db
from .quant import ROUNDING_MODES, QuantSpec, fake_quant, qparams
from .train import evaluate

__all__ = ["LayerQuantError", "quantizable_layers", "fake_quantize_weights",
           "weight_quant_report", "activation_fake_quant", "evaluate_with_activation_ranges"]



# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------
def quantizable_layers(model: nn.Module, types: tuple[type, ...] = WEIGHT_LAYERS) -> dict[str, nn.Module]:
    """The model's layers that carry a quantizable weight: {qualified name: module}, in module order.

    types: the layer classes to list (Conv1d/2d/3d and Linear by default).

    Used in :ref:`ch1-sec-the-network-used-throughout`, :ref:`ch2-sec-rounding`,
    :ref:`ch3-sec-ranges-on-a-trained-network`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return {n: m for n, m in model.named_modules() if n and isinstance(m, types)}


def _fake_quant_weight(w: torch.Tensor, spec: QuantSpec, range_fn, rounding: str, generator):
    """w -> its fake-quantized copy: range from ``range_fn``, qparams, fake_quant (no autograd)."""
    with torch.no_grad():
        lo, hi = range_fn(w.detach(), spec)
        scale, zero_point = qparams(lo, hi, spec)
        return fake_quant(w.detach(), scale, zero_point, spec, rounding, generator)


def _layer_specs(model: nn.Module, spec, names) -> dict[str, QuantSpec]:
    """{layer name: QuantSpec} for the layers to quantize, validated."""
    layers = quantizable_layers(model)
    if isinstance(spec, QuantSpec):
        wanted = list(layers) if names is None else list(names)
        plan = {n: spec for n in wanted}
    elif isinstance(spec, Mapping):
        if names is not None:
            raise ValueError("give names only with a single QuantSpec; a mapping already names its layers")
        plan = dict(spec)
        for n, s in plan.items():
            if not isinstance(s, QuantSpec):
                raise TypeError(f"spec[{n!r}] must be a QuantSpec, got {type(s).__name__}")
    else:
        raise TypeError(f"spec must be a QuantSpec or a mapping of layer name to QuantSpec, got {type(spec).__name__}")
    missing = [n for n in plan if n not in layers]
    if missing:
        raise ValueError(f"not quantizable layers of the model: {missing}; available: {list(layers)}")
    return plan


@renamed(range_fn="range_method")
def fake_quantize_weights(model: nn.Module, spec: QuantSpec | Mapping[str, QuantSpec], names: Iterable[str] | None = None,
                          range_method="minmax", rounding: str = "half_even",
                          generator: torch.Generator | None = None) -> nn.Module:
    """A deep copy of ``model`` whose Conv/Linear weights are fake-quantized (weight-only PTQ).

    Each selected layer's weight W becomes q(W) = s * (clamp(round(W / s) + z, qmin, qmax) - z)
    (white paper, Nagel et al. 2021, eq. 7), with (s, z) from ``qparams(*range_method(W, spec),
    spec)``. Per tensor when ``spec.axis is None``; per channel along ``spec.axis`` otherwise
    (axis 0 is the output channel of Conv and Linear weights, white paper §2.4). Biases,
    BatchNorm and activations are left in floating point. Book chapters 1-3.

    ::

        spec:         one QuantSpec for every selected layer, or {layer name: QuantSpec} (mixed precision).
        names:        with a single QuantSpec, the layers to quantize (default: every Conv/Linear layer).
        range_method: a name in ``refimpl.calib.RANGE_METHODS`` or fn(w, spec) -> (xmin, xmax);
                      default "minmax" (``refimpl.calib.minmax``).
        rounding:     a mode of ``refimpl.quant.round_to_int``; ``generator`` feeds stochastic rounding.

    Returns the quantized copy (same mode as ``model``); ``model`` itself is not modified.

    Used in :ref:`ch1-sec-mixed-precision`, :ref:`ch2-sec-per-tensor-and-per-channel`,
    :ref:`ch3-sec-weights`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_choice(rounding, "rounding", ROUNDING_MODES)
    range_fn = range_method_fn(range_method)
    plan = _layer_specs(model, spec, names)
    out = copy.deepcopy(model)
    layers = quantizable_layers(out)
    for name, s in plan.items():
        w = layers[name].weight
        with torch.no_grad():
            w.copy_(_fake_quant_weight(w, s, range_fn, rounding, generator))
    return out


@dataclass(frozen=True)
class LayerQuantError:
    """The weight-quantization error of one layer: MSE and SQNR of q(W) against W (float64)."""

    name: str
    shape: tuple[int, ...]
    numel: int
    mse: float
    sqnr_db: float


@renamed(range_fn="range_method")
def weight_quant_report(model: nn.Module, spec: QuantSpec | Mapping[str, QuantSpec], names: Iterable[str] | None = None,
                        range_method="minmax", rounding: str = "half_even") -> list[LayerQuantError]:
    """Per-layer error of quantizing each Conv/Linear weight W to q(W), as ``fake_quantize_weights``
    does (white paper §2.4's per-tensor versus per-channel comparison; book chapters 1-2).

    Arguments as for ``fake_quantize_weights``. Returns one ``LayerQuantError`` per selected layer,
    in module order: mse = mean((q(W) - W)^2) and sqnr_db = ``sqnr_db(W, q(W))``, both in float64.

    Used in :ref:`ch1-sec-bit-width`, :ref:`ch2-sec-per-tensor-and-per-channel`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_choice(rounding, "rounding", ROUNDING_MODES)
    range_fn = range_method_fn(range_method)
    plan = _layer_specs(model, spec, names)
    rows = []
    for name, layer in quantizable_layers(model).items():
        if name not in plan:
            continue
        w = layer.weight.detach()
        wq = _fake_quant_weight(w, plan[name], range_fn, rounding, None)
        err = (wq.double() - w.double())
        rows.append(LayerQuantError(name, tuple(w.shape), w.numel(), float(err.pow(2).mean()), sqnr_db(w, wq)))
    return rows


# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------
@contextmanager
def activation_fake_quant(model: nn.Module, ranges: Mapping[str, tuple], spec: QuantSpec | Mapping[str, QuantSpec]):
    """Context manager: within it, the output of each module named in ``ranges`` is replaced by
    its fake-quantized value (white paper §2.3, simulated quantization; book chapter 3), with
    the fixed range ranges[name] = (xmin, xmax) -> qparams(xmin, xmax, spec).

    Implemented with ``refimpl.capture.forward_hooks``, removed on exit (also on error); the
    model's weights are not touched (quantize them first with ``fake_quantize_weights``).
    spec: one QuantSpec for every module, or {name: QuantSpec}.
    Yields the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(ranges, Mapping):
        raise TypeError("ranges must be a mapping {module name: (xmin, xmax)}")
    modules = dict(model.named_modules())
    missing = [n for n in ranges if n not in modules or not n]
    if missing:
        raise ValueError(f"modules not found in the model: {missing}")
    hooks = {}
    for name, (lo, hi) in ranges.items():
        s = spec.get(name) if isinstance(spec, Mapping) else spec
        if not isinstance(s, QuantSpec):
            raise TypeError(f"no QuantSpec for {name!r}: spec must be a QuantSpec or map every name to one")
        hooks[name] = _output_fake_quant(*qparams(lo, hi, s), s)
    with forward_hooks(model, hooks, where="output"):
        yield model


def _output_fake_quant(scale, zero_point, spec: QuantSpec):
    """A forward hook replacing a module's output by its fake-quantized value."""
    def hook(_module, _inputs, output):
        return fake_quant(output, scale, zero_point, spec)
    return hook


def evaluate_with_activation_ranges(model: nn.Module, ranges: Mapping[str, tuple],
                                    spec: QuantSpec | Mapping[str, QuantSpec], x: torch.Tensor, y: torch.Tensor,
                                    batch_size: int = 1024) -> float:
    """Top-1 accuracy (%) of ``model`` on (x, y) with the outputs of the modules in ``ranges``
    fake-quantized at fixed ranges (``activation_fake_quant``); ``refimpl.train.evaluate``
    otherwise (eval mode, no autograd). Book chapter 3. x: (N, ...) float; y: (N,) int64.
    Returns a float.

    Used in :ref:`ch3-sec-the-last-layer-cross-entropy`.
    """
    with activation_fake_quant(model, ranges, spec):
        return evaluate(model, x, y, batch_size)

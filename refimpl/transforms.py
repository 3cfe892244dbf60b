"""Model-level transforms: weight-only simulated quantization of a model's layers.

* ``quantizable_layers``, ``fake_quantize_weights``, ``weight_quant_report`` — weight-only
  simulated quantization of a model's Conv/Linear layers, per tensor or per channel, and the
  per-layer error it causes (white paper, Nagel et al. 2021, §2.2-2.4).

Everything here is built on ``refimpl.quant`` and ``refimpl.calib``; nothing modifies its inputs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ._checks import check_choice
from .calib import minmax
from .metrics import sqnr_db
from .quant.functional import ROUNDING_MODES, fake_quant, qparams
from .quant.spec import QuantSpec

__all__ = ["WEIGHT_LAYER_TYPES", "LayerQuantError", "quantizable_layers", "fake_quantize_weights",
           "weight_quant_report"]

WEIGHT_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# --------------------------------------------------------------------------------------------
# Weight-only fake quantization of a model
# --------------------------------------------------------------------------------------------
def quantizable_layers(model: nn.Module, types: tuple[type, ...] = WEIGHT_LAYER_TYPES) -> dict[str, nn.Module]:
    """The model's layers that carry a quantizable weight: {qualified name: module}, in module order.

    types: the layer classes to list (Conv1d/2d/3d and Linear by default).
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


def _check_range_fn(range_fn):
    if range_fn is None:
        return minmax
    if not callable(range_fn):
        raise TypeError(f"range_fn must be callable as range_fn(w, spec) -> (xmin, xmax), got {type(range_fn).__name__}")
    return range_fn


def fake_quantize_weights(model: nn.Module, spec: QuantSpec | Mapping[str, QuantSpec], names: Iterable[str] | None = None,
                          range_fn: Callable | None = None, rounding: str = "half_even",
                          generator: torch.Generator | None = None) -> nn.Module:
    """A deep copy of ``model`` whose Conv/Linear weights are fake-quantized (weight-only PTQ).

    Each selected layer's weight W becomes q(W) = s * (clamp(round(W / s) + z, qmin, qmax) - z)
    (white paper, Nagel et al. 2021, eq. 7), with (s, z) from ``qparams(*range_fn(W, spec), spec)``.
    Per tensor when ``spec.axis is None``; per channel along ``spec.axis`` otherwise (axis 0 is the
    output channel of Conv and Linear weights, white paper §2.4). Biases, BatchNorm and
    activations are left in floating point.

    spec:      one QuantSpec for every selected layer, or {layer name: QuantSpec} (mixed precision).
    names:     with a single QuantSpec, the layers to quantize (default: every Conv/Linear layer).
    range_fn:  (w, spec) -> (xmin, xmax); default ``refimpl.calib.minmax``.
    rounding:  a mode of ``refimpl.quant.round_to_int``; ``generator`` feeds stochastic rounding.
    Returns the quantized copy (same mode as ``model``); ``model`` itself is not modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_choice(rounding, "rounding", ROUNDING_MODES)
    range_fn = _check_range_fn(range_fn)
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


def weight_quant_report(model: nn.Module, spec: QuantSpec | Mapping[str, QuantSpec], names: Iterable[str] | None = None,
                        range_fn: Callable | None = None, rounding: str = "half_even") -> list[LayerQuantError]:
    """Per-layer error of quantizing each Conv/Linear weight W to q(W), as ``fake_quantize_weights`` does.

    Arguments as for ``fake_quantize_weights``. Returns one ``LayerQuantError`` per selected layer,
    in module order: mse = mean((q(W) - W)^2) and sqnr_db = ``sqnr_db(W, q(W))``, both in float64.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_choice(rounding, "rounding", ROUNDING_MODES)
    range_fn = _check_range_fn(range_fn)
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



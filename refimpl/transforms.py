"""Model-level transforms and the quantization-error measurements the chapters make with them.

* ``quantizable_layers``, ``fake_quantize_weights``, ``weight_quant_report`` — weight-only
  simulated quantization of a model's Conv/Linear layers, per tensor or per channel, and the
  per-layer error it causes (white paper, Nagel et al. 2021, §2.2-2.4).
* ``sqnr_db``, ``uniform_sqnr_db``, ``quant_error_split`` — error metrics: measured SQNR, the
  textbook SQNR of a full-scale uniform quantizer (~6 dB per bit), and the split of a quantizer's
  squared error into rounding (inside the grid) and clipping (outside it).
* ``pow2_levels``, ``quantize_to_levels`` — a non-uniform (power-of-two, "logarithmic") grid and
  nearest-level quantization onto any finite grid (Miyashita et al. 2016; Li et al. 2020).
* ``accumulate_updates``, ``ste_gradient_descent`` — two small dynamics on a quantized value:
  many small increments under nearest vs stochastic rounding (Gupta et al. 2015), and gradient
  descent through the straight-through estimator, which oscillates (Nagel et al. 2022).

Everything here is built on ``refimpl.quant`` and ``refimpl.calib``; nothing modifies its inputs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ._checks import check_choice, check_float_tensor, check_int
from .calib import minmax
from .quant.functional import ROUNDING_MODES, dequantize, fake_quant, qparams
from .quant.spec import QuantSpec

__all__ = [
    "WEIGHT_LAYER_TYPES", "LayerQuantError", "quantizable_layers", "fake_quantize_weights",
    "weight_quant_report", "grid_levels", "sqnr_db", "uniform_sqnr_db", "quant_error_split", "pow2_levels",
    "quantize_to_levels", "accumulate_updates", "ste_gradient_descent",
]

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


def grid_levels(scale, zero_point, spec: QuantSpec) -> torch.Tensor:
    """Every real value a per-tensor uniform quantizer can output: s (q - z) for q = qmin .. qmax.

    (white paper, Nagel et al. 2021, eq. 6 applied to the whole integer grid.)
    scale, zero_point: per-tensor, as returned by ``qparams``. Returns a float32 1-d tensor of
    ``spec.num_levels`` increasing values.
    """
    if not isinstance(spec, QuantSpec) or spec.axis is not None:
        raise ValueError("grid_levels needs a per-tensor QuantSpec (spec.axis is None)")
    codes = torch.arange(spec.qmin, spec.qmax + 1, dtype=torch.int64).to(spec.storage_dtype)
    return dequantize(codes, scale, zero_point, spec)


# --------------------------------------------------------------------------------------------
# Error metrics
# --------------------------------------------------------------------------------------------
def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(sum x^2 / sum (x_hat - x)^2) in dB, in float64.

    x, x_hat: floating tensors of the same shape. Returns +inf when x_hat == x, -inf when x == 0
    everywhere and x_hat is not.
    """
    check_float_tensor(x, "x")
    check_float_tensor(x_hat, "x_hat")
    if x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must have the same shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    signal = float(x.detach().double().pow(2).sum())
    noise = float((x_hat.detach().double() - x.detach().double()).pow(2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def uniform_sqnr_db(bits: int, peak_to_rms: float) -> float:
    """Textbook SQNR (dB) of a b-bit uniform quantizer whose grid spans [-peak, peak] (no clipping).

    The grid has 2^b - 1 steps of size s = 2 peak / (2^b - 1) and the rounding error is uniform
    on [-s/2, s/2] (variance s^2 / 12), so for a signal of RMS value sigma
        SQNR = 10 log10(sigma^2 / (s^2 / 12)) = 20 log10(2^b - 1) + 10 log10(3) - 20 log10(peak / sigma)
             ~ 6.02 b + 4.77 - 20 log10(peak / sigma)        (b large)
    (the classical "6 dB per bit" rule; see e.g. Gray & Neuhoff 1998, "Quantization", IEEE Trans.
    Inf. Theory 44(6)).
    bits: 1..16; peak_to_rms: peak / sigma >= 1 (the crest factor). Returns a float.
    """
    bits = check_int(bits, "bits", 1, 16)
    if not isinstance(peak_to_rms, (int, float)) or isinstance(peak_to_rms, bool) or not peak_to_rms >= 1.0:
        raise ValueError(f"peak_to_rms must be a number >= 1 (peak >= RMS), got {peak_to_rms!r}")
    return 20.0 * math.log10(2**bits - 1) + 10.0 * math.log10(3.0) - 20.0 * math.log10(float(peak_to_rms))


def quant_error_split(x: torch.Tensor, scale, zero_point, spec: QuantSpec, rounding: str = "half_even") -> dict:
    """Split the squared error of fake_quant(x) into rounding (inside the grid) and clipping (outside).

    A value is clipped when round(x / s) + z falls outside [qmin, qmax] (white paper §2.2: the
    grid limits are s (qmin - z) and s (qmax - z)). Per tensor only (0-d scale and zero_point).
    x: floating tensor. Returns {"mse", "rounding_mse", "clipping_mse", "clipped_fraction"} (floats,
    float64; the two MSE parts are sums over their elements divided by x.numel(), so they add up
    to "mse").
    """
    check_float_tensor(x, "x")
    if not isinstance(spec, QuantSpec) or spec.axis is not None:
        raise ValueError("quant_error_split needs a per-tensor QuantSpec (spec.axis is None)")
    x = x.detach()
    xq = x.detach().clone().requires_grad_(True)
    y = fake_quant(xq, scale, zero_point, spec, rounding)
    # fake_quant's STE gradient is 1 exactly where the code was on the grid before clamping
    y.sum().backward()
    inside = xq.grad.bool()
    err2 = (y.detach().double() - x.double()).pow(2)
    n = x.numel()
    return {
        "mse": float(err2.sum()) / n,
        "rounding_mse": float(err2[inside].sum()) / n,
        "clipping_mse": float(err2[~inside].sum()) / n,
        "clipped_fraction": float((~inside).sum()) / n,
    }


# --------------------------------------------------------------------------------------------
# Non-uniform grids
# --------------------------------------------------------------------------------------------
def pow2_levels(bits: int, max_abs: float) -> torch.Tensor:
    """The levels of a signed power-of-two ("logarithmic") grid with 2^b - 1 values, sorted.

    One bit is the sign, the other b - 1 bits index 2^(b-1) magnitudes: zero and
    max_abs * 2^-k for k = 0 .. 2^(b-1) - 2 (Miyashita et al. 2016, "Convolutional neural
    networks using logarithmic data representation"; the "PoT" grid of Li et al. 2020, APoT).
    At 4 bits: 0, +-max_abs * {1, 1/2, ..., 1/64}, 15 levels, as many as a narrow 4-bit uniform grid.
    bits: 2..16; max_abs > 0. Returns a float64 1-d tensor of 2^b - 1 increasing levels.
    """
    bits = check_int(bits, "bits", 2, 16)
    if not isinstance(max_abs, (int, float)) or isinstance(max_abs, bool) or not (0 < max_abs < math.inf):
        raise ValueError(f"max_abs must be a finite number > 0, got {max_abs!r}")
    k = torch.arange(2 ** (bits - 1) - 1, dtype=torch.float64)
    mags = float(max_abs) * torch.pow(2.0, -k)
    return torch.cat([-mags, torch.zeros(1, dtype=torch.float64), mags.flip(0)]).sort().values


def quantize_to_levels(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Round every element of x to the nearest of a finite set of levels (any grid, uniform or not).

    Values beyond the outermost levels clip to them; a value exactly halfway between two levels
    goes to the one of smaller magnitude (towards zero). Distances are computed in float64.
    x: floating tensor, any shape; levels: 1-d real tensor, distinct values in increasing order.
    Returns a tensor of x's shape and dtype holding levels.
    """
    check_float_tensor(x, "x")
    check_float_tensor(levels, "levels")
    if levels.ndim != 1:
        raise ValueError(f"levels must be 1-d, got shape {tuple(levels.shape)}")
    lv = levels.detach().double()
    if lv.numel() > 1 and not bool((lv[1:] > lv[:-1]).all()):
        raise ValueError("levels must be distinct and in increasing order")
    if lv.numel() == 1:
        return torch.full_like(x, float(lv[0]))
    v = x.detach().double().reshape(-1)
    hi = torch.searchsorted(lv, v).clamp(1, lv.numel() - 1)
    lo = hi - 1
    d_lo, d_hi = v - lv[lo], lv[hi] - v
    # nearest; on a tie prefer the level of smaller magnitude
    take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (lv[hi].abs() < lv[lo].abs()))
    out = torch.where(take_hi, lv[hi], lv[lo])
    return out.reshape(x.shape).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Dynamics on a quantized value
# --------------------------------------------------------------------------------------------
def _scalar_qparams(scale, spec: QuantSpec):
    if not isinstance(spec, QuantSpec) or spec.axis is not None:
        raise ValueError("needs a per-tensor QuantSpec (spec.axis is None)")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not (0 < scale < math.inf):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    return float(scale), spec.symmetric_zero_point if spec.symmetric else 0


def accumulate_updates(x0: torch.Tensor, increment: float, steps: int, scale: float, spec: QuantSpec,
                       rounding: str = "half_even", generator: torch.Generator | None = None) -> torch.Tensor:
    """Add ``increment`` to a quantized value ``steps`` times, re-quantizing after every update.

    x_{t+1} = fake_quant(x_t + increment) on the grid (scale, zero_point = spec's symmetric zero
    point, or 0), as in training with low-precision weights: with round-to-nearest an increment
    below scale/2 is rounded away every time and x never moves; with stochastic rounding
    E[x_{t+1}] = x_t + increment while no clipping occurs (Gupta et al. 2015, "Deep learning with
    limited numerical precision").
    x0: floating tensor of independent starting values (e.g. one per chain), on the grid or not.
    Returns the trajectory, a tensor of shape (steps + 1, *x0.shape) in x0's dtype; row 0 is x0.
    """
    check_float_tensor(x0, "x0")
    check_choice(rounding, "rounding", ROUNDING_MODES)
    steps = check_int(steps, "steps", low=0)
    if not isinstance(increment, (int, float)) or isinstance(increment, bool) or not math.isfinite(increment):
        raise ValueError(f"increment must be a finite number, got {increment!r}")
    s, z = _scalar_qparams(scale, spec)
    out = torch.empty((steps + 1, *x0.shape), dtype=x0.dtype)
    x = x0.detach().clone()
    out[0] = x
    with torch.no_grad():
        for t in range(steps):
            x = fake_quant(x + increment, s, z, spec, rounding, generator)
            out[t + 1] = x
    return out


def ste_gradient_descent(w0: float, target: float, scale: float, spec: QuantSpec, lr: float, steps: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient descent on L(w) = (q(w) - target)^2 / 2 with the straight-through estimator.

    q = fake_quant on the grid (scale, zero point as in ``accumulate_updates``); its STE gradient
    is 1 inside the grid, so the update is w <- w - lr * (q(w) - target). When ``target`` lies
    between two grid points the latent weight w oscillates around the rounding threshold between
    them and q(w) flips between the two points (Nagel et al. 2022, "Overcoming oscillations in
    quantization-aware training", ICML 2022). Gradients come from autograd through fake_quant.
    Returns (latent, quantized): float64 tensors of shape (steps + 1,), w_t and q(w_t).
    """
    s, z = _scalar_qparams(scale, spec)
    steps = check_int(steps, "steps", low=0)
    for name, v in (("w0", w0), ("target", target), ("lr", lr)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    # shape (1,), not 0-d: fake_quant's block loop indexes dim 0 (it fails on 0-d tensors)
    w = torch.tensor([float(w0)], dtype=torch.float64, requires_grad=True)
    latent = torch.empty(steps + 1, dtype=torch.float64)
    quantized = torch.empty(steps + 1, dtype=torch.float64)
    for t in range(steps + 1):
        q = fake_quant(w, s, z, spec)
        latent[t], quantized[t] = w.detach()[0], q.detach()[0]
        if t == steps:
            break
        loss = 0.5 * (q - target).pow(2).sum()
        (grad,) = torch.autograd.grad(loss, w)
        with torch.no_grad():
            w -= lr * grad
    return latent, quantized

"""Measurements around range setting: the error a range causes, and what it does to a network.

These are not range setters themselves (those are in ``refimpl.calib``); they evaluate ranges:

* ``standard_samples`` — seeded unit-variance Gaussian or Laplacian samples, the two bell shapes of
  weights and pre-activations.
* ``quantization_mse`` — the mean squared error of ``fake_quant`` at many clipping thresholds at
  once: the clipping-versus-rounding curve (white paper, Nagel et al. 2021, §3.1).
* ``aciq_mse``, ``aciq_optimal_clip`` — the analytic version of that curve for Gaussian and
  Laplacian data and its minimiser (ACIQ, Banner et al. 2019, §4).
* ``calibrate_ranges`` — every range setter of a set on every tensor of a set.
* ``range_report`` — per range: the clipped fraction, MSE and SQNR it gives a tensor.
* ``ema_minmax_trace`` — the running range of ``calib.ema_minmax`` after every batch.
* ``bn_relu_ranges`` — data-free BN-based ranges of every ReLU output of a ``ResNetCNN``.
* ``activation_fake_quant``, ``evaluate_with_activation_ranges`` — a model whose chosen module
  outputs are fake-quantized with fixed ranges, and its test accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from ._checks import check_choice, check_float_tensor, check_int
from .calib import bn_based, ema_minmax
from .metrics import sqnr_db
from .quant.functional import fake_quant, in_grid, qparams
from .quant.spec import QuantSpec

__all__ = ["DISTRIBUTIONS", "standard_samples", "quantization_mse", "aciq_mse", "aciq_optimal_clip",
           "calibrate_ranges", "range_report", "ema_minmax_trace", "bn_relu_ranges", "activation_fake_quant",
           "evaluate_with_activation_ranges"]

DISTRIBUTIONS = ("gaussian", "laplace")
# elements of x times thresholds that one vectorised fake_quant call of quantization_mse holds
_CHUNK_ELEMENTS = 1 << 22


def _check_per_tensor(spec, who: str) -> QuantSpec:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if spec.axis is not None:
        raise ValueError(f"{who} needs a per-tensor QuantSpec (spec.axis is None), got axis={spec.axis}")
    return spec


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------
def standard_samples(dist: str, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` seeded samples of a zero-mean, unit-variance Gaussian or Laplacian (float32, (n,)).

    dist: "gaussian" (N(0, 1)) or "laplace" (density exp(-|x|/b) / 2b with b = 1/sqrt(2), so that
    the variance 2 b^2 is 1; drawn by inverting the CDF of a uniform from a seeded generator).
    """
    check_choice(dist, "dist", DISTRIBUTIONS)
    n = check_int(n, "n", low=1)
    seed = check_int(seed, "seed", low=0)
    g = torch.Generator().manual_seed(seed)
    if dist == "gaussian":
        x = torch.randn(n, generator=g, dtype=torch.float64)
    else:
        u = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
        x = -torch.sign(u) * torch.log1p(-2.0 * u.abs()) / math.sqrt(2.0)
    return x.to(torch.float32)


# --------------------------------------------------------------------------------------------
# The clipping-versus-rounding curve, measured and analytic
# --------------------------------------------------------------------------------------------
def quantization_mse(x: torch.Tensor, spec: QuantSpec, clip_values) -> torch.Tensor:
    """Mean squared error mean((fake_quant(x) - x)^2) for every clipping threshold t in ``clip_values``.

    The range for threshold t is [-t, t] for a symmetric spec and [min(min x, 0), t] for an
    asymmetric one (one-sided clipping, as for post-ReLU activations); each range goes through
    ``qparams`` as float32, exactly as a range returned by ``refimpl.calib`` does, so the curve's
    value at a calibrated threshold is that range's error. All thresholds are evaluated together
    as one per-channel fake_quant of x repeated along a new axis (in chunks).

    x: floating tensor, any shape (flattened).  spec: per-tensor.
    clip_values: 1-d tensor or sequence of thresholds t > 0 (T,).
    Returns the MSE at each threshold, float64 (T,).
    """
    check_float_tensor(x, "x")
    _check_per_tensor(spec, "quantization_mse")
    t = torch.as_tensor(clip_values, dtype=torch.float64).reshape(-1)
    if t.numel() == 0 or not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
        raise ValueError("clip_values must be a non-empty set of finite thresholds > 0")
    v = x.detach().reshape(-1)
    lowest = min(float(v.min()), 0.0)
    rspec = spec.per_channel(0)
    out = torch.empty(t.numel(), dtype=torch.float64)
    rows = max(1, _CHUNK_ELEMENTS // v.numel())
    for i in range(0, t.numel(), rows):
        hi = t[i:i + rows].to(torch.float32)
        lo = -hi if spec.symmetric else torch.full_like(hi, lowest)
        scale, zero_point = qparams(lo, hi, rspec)
        X = v.unsqueeze(0).expand(hi.numel(), -1)
        err = fake_quant(X, scale, zero_point, rspec).double() - X.double()
        out[i:i + rows] = err.pow(2).mean(dim=1)
    return out


def aciq_mse(alpha, bits: int, dist: str) -> torch.Tensor:
    """ACIQ's analytic quantization MSE of unit-variance data clipped to [-alpha, alpha]
    (Banner et al. 2019, "Post training 4-bit quantization of convolutional networks for
    rapid-deployment", §4, eqs. for the Laplace and Gaussian priors):

        E[(X - Q(X))^2] ~ clipping(alpha) + alpha^2 / (3 * 4^M)

    The rounding term is ACIQ's: 2^M bins of width 2 alpha / 2^M over [-alpha, alpha], uniform
    noise of variance width^2 / 12, as if all the mass were inside the range. The clipping term is
    exact: 2 b^2 exp(-alpha / b) for a Laplace(0, b) (b = 1/sqrt(2) for unit variance) and
    (alpha^2 + 1) (1 - erf(alpha / sqrt 2)) - sqrt(2 / pi) alpha exp(-alpha^2 / 2) for N(0, 1).

    alpha: float or float tensor of clipping values in units of the standard deviation (> 0).
    bits: M, 1..16.  dist: "gaussian" or "laplace".
    Returns the MSE in units of the variance, float64 tensor of alpha's shape.
    """
    check_choice(dist, "dist", DISTRIBUTIONS)
    bits = check_int(bits, "bits", 1, 16)
    a = torch.as_tensor(alpha, dtype=torch.float64)
    if not bool(torch.isfinite(a).all()) or not bool((a > 0).all()):
        raise ValueError("alpha must be finite and > 0")
    rounding = a * a / (3.0 * 4.0 ** bits)
    if dist == "laplace":
        b = 1.0 / math.sqrt(2.0)
        clipping = 2.0 * b * b * torch.exp(-a / b)
    else:
        clipping = (a * a + 1.0) * torch.erfc(a / math.sqrt(2.0)) - math.sqrt(2.0 / math.pi) * a * torch.exp(-a * a / 2)
    return clipping + rounding


def aciq_optimal_clip(bits: int, dist: str) -> float:
    """The clipping value alpha* (in units of the standard deviation) that minimises ``aciq_mse``.

    Found by golden-section search on [0.1, 40] (the curve is unimodal there) to 1e-10.
    ACIQ (Banner et al. 2019, §4.1) quotes alpha* = 2.83 b, 3.89 b, 5.03 b for a Laplace(0, b) and
    1.71, 2.15, 2.55 sigma for a Gaussian at M = 2, 3, 4 bits; multiply a Laplacian result by
    sqrt(2) to express it in units of b. Returns a Python float.
    """
    check_choice(dist, "dist", DISTRIBUTIONS)
    bits = check_int(bits, "bits", 1, 16)
    lo, hi = 0.1, 40.0
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fc, fd = float(aciq_mse(c, bits, dist)), float(aciq_mse(d, bits, dist))
    while hi - lo > 1e-10:
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - ratio * (hi - lo)
            fc = float(aciq_mse(c, bits, dist))
        else:
            lo, c, fc = c, d, fd
            d = lo + ratio * (hi - lo)
            fd = float(aciq_mse(d, bits, dist))
    return 0.5 * (lo + hi)


# --------------------------------------------------------------------------------------------
# The error of given ranges
# --------------------------------------------------------------------------------------------
def calibrate_ranges(tensors: Mapping[str, torch.Tensor], spec: QuantSpec,
                     methods: Mapping[str, Callable]) -> dict[str, dict[str, tuple]]:
    """Every range setter in ``methods`` applied to every tensor in ``tensors``.

    tensors: {name: floating tensor}, e.g. the activations ``refimpl.hooks.capture_activations``
    returns.  methods: {method name: fn(x, spec) -> (xmin, xmax)}, e.g. ``refimpl.calib.minmax``.
    Returns {method name: {tensor name: (xmin, xmax)}}, both in the given order.
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    for name, fn in methods.items():
        if not callable(fn):
            raise TypeError(f"methods[{name!r}] must be callable as fn(x, spec) -> (xmin, xmax)")
    return {m: {n: fn(x, spec) for n, x in tensors.items()} for m, fn in methods.items()}


def range_report(x: torch.Tensor, ranges: Mapping[str, tuple], spec: QuantSpec) -> list[dict]:
    """The error each range in ``ranges`` gives x under ``spec``: one dict per range, in order.

    For (xmin, xmax) -> (scale, zero_point) = qparams(xmin, xmax, spec) and x_hat = fake_quant(x):
    "name", "xmin", "xmax" (floats), "clipped_pct" (percentage of values outside the grid, i.e.
    whose code was clamped), "mse" = mean((x_hat - x)^2) and "sqnr_db" = 10 log10(sum x^2 /
    sum (x_hat - x)^2) (float64). Per-tensor or per-channel, as ``spec`` says; ranges as
    ``refimpl.calib`` returns them (0-d or 1-d).
    x: floating tensor.
    """
    check_float_tensor(x, "x")
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if not isinstance(ranges, Mapping) or not ranges:
        raise ValueError("ranges must be a non-empty mapping {name: (xmin, xmax)}")
    xd = x.detach()
    rows = []
    for name, (lo, hi) in ranges.items():
        scale, zero_point = qparams(lo, hi, spec)
        x_hat = fake_quant(xd, scale, zero_point, spec)
        clipped = ~in_grid(xd, scale, zero_point, spec)
        rows.append({"name": name, "xmin": float(torch.as_tensor(lo).min()), "xmax": float(torch.as_tensor(hi).max()),
                     "clipped_pct": 100.0 * float(clipped.double().mean()),
                     "mse": float((x_hat.double() - xd.double()).pow(2).mean()), "sqnr_db": sqnr_db(xd, x_hat)})
    return rows


def ema_minmax_trace(x: torch.Tensor, spec: QuantSpec, batch_size: int, averaging_constant: float = 0.01
                     ) -> torch.Tensor:
    """The running range of ``calib.ema_minmax`` fed x in consecutive batches along dim 0.

    x: floating tensor (N, ...), the batches x[0:B], x[B:2B], ... (the last may be shorter).
    spec: per-tensor.  averaging_constant: c of ``ema_minmax``.
    Returns float32 (num_batches, 2): row t is (xmin, xmax) after batch t.
    """
    check_float_tensor(x, "x")
    _check_per_tensor(spec, "ema_minmax_trace")
    batch_size = check_int(batch_size, "batch_size", low=1)
    if x.ndim == 0:
        raise ValueError("x must have a batch dimension")
    state, out = None, []
    for i in range(0, x.shape[0], batch_size):
        state = ema_minmax(x[i:i + batch_size], spec, state, averaging_constant)
        out.append(torch.stack(state))
    return torch.stack(out)


# --------------------------------------------------------------------------------------------
# Model level
# --------------------------------------------------------------------------------------------
def bn_relu_ranges(model: nn.Module, spec: QuantSpec, alpha: float = 6.0) -> dict[str, tuple]:
    """Data-free ranges of every ReLU output of a ``refimpl.models.ResNetCNN`` from its BatchNorm
    parameters (white paper §3.1, "Batch normalization based"; ``calib.bn_based``).

    ``stem.relu`` and ``blocks.i.relu1`` follow one BatchNorm: [beta - alpha |gamma|, beta +
    alpha |gamma|] (min/max over channels for a per-tensor spec), then clipped below at 0 by the
    ReLU. ``blocks.i.relu2`` follows a sum, bn2 plus the shortcut (its BatchNorm, or the block's
    input: the previous ReLU's range); the sum of the two intervals bounds it, then the ReLU clips.

    spec: only its axis is used (None: per tensor; 1: per channel of the activations).
    Returns {ReLU name: (xmin, xmax)} float32, 0-d or 1-d, in forward order.
    """
    if not all(hasattr(model, a) for a in ("stem", "blocks")):
        raise TypeError(f"model must be a refimpl.models.ResNetCNN, got {type(model).__name__}")

    def relu(lo, hi):
        return lo.clamp(min=0.0), hi.clamp(min=0.0)

    ranges = {"stem.relu": relu(*bn_based(model.stem.bn, None, spec, alpha))}
    previous = ranges["stem.relu"]
    for i, block in enumerate(model.blocks):
        ranges[f"blocks.{i}.relu1"] = relu(*bn_based(block.bn1, None, spec, alpha))
        lo, hi = bn_based(block.bn2, None, spec, alpha)
        if isinstance(block.shortcut, nn.Identity):
            s_lo, s_hi = previous
        else:
            s_lo, s_hi = bn_based(block.shortcut.bn, None, spec, alpha)
        previous = relu(lo + s_lo, hi + s_hi)
        ranges[f"blocks.{i}.relu2"] = previous
    return ranges


@contextmanager
def activation_fake_quant(model: nn.Module, ranges: Mapping[str, tuple], spec: QuantSpec | Mapping[str, QuantSpec]):
    """Context manager: within it, the output of each module named in ``ranges`` is replaced by
    its fake-quantized value (white paper §2.3, simulated quantization), with the fixed range
    ranges[name] = (xmin, xmax) -> qparams(xmin, xmax, spec).

    Implemented with forward hooks, removed on exit (also on error); the model's weights are not
    touched (quantize them first with ``refimpl.transforms.fake_quantize_weights``).
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
    plan = {}
    for name, (lo, hi) in ranges.items():
        s = spec.get(name) if isinstance(spec, Mapping) else spec
        if not isinstance(s, QuantSpec):
            raise TypeError(f"no QuantSpec for {name!r}: spec must be a QuantSpec or map every name to one")
        scale, zero_point = qparams(lo, hi, s)
        plan[name] = (scale, zero_point, s)

    def hook(scale, zero_point, s):
        def fn(_module, _inputs, output):
            return fake_quant(output, scale, zero_point, s)
        return fn

    handles = [modules[n].register_forward_hook(hook(*plan[n])) for n in plan]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def evaluate_with_activation_ranges(model: nn.Module, ranges: Mapping[str, tuple],
                                    spec: QuantSpec | Mapping[str, QuantSpec], x: torch.Tensor, y: torch.Tensor,
                                    batch_size: int = 1024) -> float:
    """Top-1 accuracy (%) of ``model`` on (x, y) with the outputs of the modules in ``ranges``
    fake-quantized at fixed ranges (``activation_fake_quant``); ``refimpl.train.evaluate``
    otherwise (eval mode, no autograd). x: (N, ...) float; y: (N,) int64. Returns a float.
    """
    from .train import evaluate

    with activation_fake_quant(model, ranges, spec):
        return evaluate(model, x, y, batch_size)

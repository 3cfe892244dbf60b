"""Integer-only inference of a quantized model in NumPy: int8/uint8 codes, int32 accumulators,
fixed-point requantisation (book chapter 12, "Deployment: from fake quantization to integer kernels").

References: Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference" (arXiv 1712.05877), §2.2 eqs. 5-7 (the integer matrix product
and its output stage), §2.4 (int32 bias at scale s_w * s_a, ReLU/ReLU6 as clamps); gemmlowp's
fixed-point output stage and TFLite's ``QuantizeMultiplier`` (a real multiplier as a 31-bit
fixed-point number and a power of two); TFLite's quantized ADD (both inputs brought to a common
scale with a 20-bit left shift before they are added).

:func:`integer_model` compiles a calibrated, frozen ``refimpl.qmodel.quantize_model`` graph into
:class:`IntegerModel`, a list of :class:`IntegerStep`; every tensor between steps is an integer
code array on an activation site's grid (scale, zero point, [qmin, qmax]). The one float step is
the quantization of the input; the one float output is the dequantized last site. Per step:

* conv / linear: ``acc = sum((x - zp_x) * w_code)`` exactly (int32; computed as a float64 matrix
  product, exact for any realistic depth), plus the bias in int32 at scale ``s_x * s_w``
  (rounded as PyTorch does: ``b * float32(1 / (s_x s_w))`` in float32, half to even); requantised to the next site's grid; a following ReLU / ReLU6 is the
  clamp [zp, qmax] / [zp, zp + round(6 / s)];
* add: TFLite's scheme: ``(a - zp_a) << 20`` and ``(b - zp_b) << 20`` each multiplied by
  ``s / (2 max(s_a, s_b))``, summed, requantised by ``2 max(s_a, s_b) / (2^20 s_y)``;
* average pooling: the integer sum over the window, requantised by ``s_x / (count * s_y)``;
* max pooling, flatten, identity, dropout: on the codes (monotone, grid unchanged); a ReLU on a
  quantized tensor: a clamp at the zero point; a site right after another: a requantisation.

Requantisation (``requant``): "fixed_point" (default) is what NEON's ``SQRDMULH`` and ``SRSHL``
compute: the real multiplier ``m = M * 2^(shift - 31)`` with M in [2^30, 2^31); ``SQSHL`` by a
positive shift, the doubling high multiply with rounding, a rounding right shift (ties toward
+infinity), the zero point, the clamp (:func:`refimpl.neon.fixed_point_multiply`). It rounds
twice; "single_rounding" rounds the same product once (TFLite's ``TFLITE_SINGLE_ROUNDING``).
"float32" is what PyTorch's QNNPACK kernels compute, bit for bit (tested per layer):
``round_half_even(float32(acc) * m32)`` with ``m32 = (s_x * s_w) * (1 / s_y)`` in float32
operations (PyTorch's x86 kernels, FBGEMM, differ from it on rare elements); adds and pooling
then dequantize, compute and quantize in float32 as the simulation does.

Why one module (~700 lines): the compiler, the runner and the per-layer references (PyTorch's
kernels, the x86 GEMM operands) share the step records and the window arithmetic; split apart,
each file would import the others' private helpers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from torch import nn

from ..graph import activation_kind, is_add, is_avg_pool, is_pool, passes_values
from ..qmodel import ActQuantizer, QuantLayer, act_quantizers, weight_quantizers
from ..neon import fixed_point_multiply, quantize_multiplier_any
from .grid import affine_grid
from .torchq import as_quint8, quantized_engine

__all__ = ["REQUANT_MODES", "ADD_LEFT_SHIFT", "Grid", "IntegerStep", "IntegerModel", "integer_model",
           "simulated_codes", "site_agreement",
           "torch_quantized_layer", "layer_operands", "layer_accumulators", "pair_saturating_matmul"]

REQUANT_MODES = ("fixed_point", "single_rounding", "float32")
"""Requantisation conventions: NEON/gemmlowp fixed point (SQRDMULH then SRSHL, two roundings),
TFLite's single-rounding variant of the same multiplier, PyTorch's float32 multiply."""

ADD_LEFT_SHIFT = 20
"""TFLite's left shift of both addends before they are rescaled to a common scale (8-bit inputs)."""

_INT32 = (-(1 << 31), (1 << 31) - 1)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Grid:
    """A per-tensor activation grid: real value = scale * (code - zero_point), code in [qmin, qmax]."""
    scale: float
    zero_point: int
    qmin: int
    qmax: int

    @property
    def dtype(self):
        """The storage type of the codes: np.int8 for a signed grid, np.uint8 for an unsigned one."""
        return np.int8 if self.qmin < 0 else np.uint8


@dataclass
class IntegerStep:
    """One step of :class:`IntegerModel`: ``op`` on the codes of ``inputs`` -> codes on ``grid``.

    op: "quantize" | "conv" | "linear" | "add" | "avg_pool" | "max_pool" | "relu" | "flatten" |
    "rescale". name: the fx node (layer or site) it implements. grid: the output grid. lo, hi: the
    output clamp (a fused ReLU raises lo to the zero point). multiplier, shift: (C,) or () int64
    fixed-point requantisation of each input scale ratio (the add's three); real: the float64
    ratios they approximate; weight: ``(O, C / groups, *kernel)`` int64 codes and bias: (O,) int64 at scale
    s_x * s_w, for conv/linear; attrs: stride, padding, dilation, groups, pooling window.
    """
    op: str
    name: str
    inputs: list
    grid: Grid | None
    lo: int = 0
    hi: int = 0
    real: tuple = ()
    multiplier: tuple = ()
    shift: tuple = ()
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    attrs: dict = field(default_factory=dict)


def _multipliers(real) -> tuple[np.ndarray, np.ndarray]:
    """(M, shift) int64 arrays of real's shape: TFLite's QuantizeMultiplier of each element
    (:func:`refimpl.neon.quantize_multiplier_any`), ``real ~= M * 2^(shift - 31)``."""
    r = np.asarray(real, dtype=np.float64)
    if not bool(np.isfinite(r).all()) or bool((r <= 0).any()):
        raise ValueError(f"a requantisation scale must be finite and > 0, got {r.tolist()}")
    pairs = [quantize_multiplier_any(float(v)) for v in r.ravel()]
    return (np.array([p[0] for p in pairs], np.int64).reshape(r.shape),
            np.array([p[1] for p in pairs], np.int64).reshape(r.shape))


def _wrap32(x: np.ndarray) -> np.ndarray:
    """int32 wrap-around of an int64 array (what ADD .4s does on overflow)."""
    return ((x + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


def _round_f32(acc: np.ndarray, real) -> np.ndarray:
    """round_half_even(float32(acc) * float32(real)) as int64 (PyTorch's float requantisation)."""
    prod = acc.astype(np.float32) * np.asarray(real, dtype=np.float64).astype(np.float32)
    return np.rint(prod).astype(np.int64)


class IntegerModel:
    """A quantized model as integer-only steps (see the module docstring); from :func:`integer_model`.

    steps: the :class:`IntegerStep` list in execution order; requant: one of :data:`REQUANT_MODES`;
    input_grid, output_grid: the first and last site's :class:`Grid`.

    """

    def __init__(self, steps: list, requant: str, output: str):
        self.steps, self.requant, self.output = steps, requant, output
        self.input_grid = steps[0].grid
        self.output_grid = next(s.grid for s in steps if s.name == output)

    def run(self, x, *, codes: bool = False, given: dict | None = None, batch_size: int = 1000):
        """Run on a float input batch (N, C, ...), numpy or torch (any float dtype, used as float32).

        Returns the dequantized output, float32 (N, ...) numpy: ``scale * (code - zero_point)`` of
        the last site; with ``codes=True`` (output, {step name: int64 codes}) for every step.
        given: {step name: codes (N, ...)} that the *following* steps read in place of what the step
        computes (the returned codes are still the step's own), to compare one step at a time.
        """
        if isinstance(x, torch.Tensor):
            if not x.is_floating_point():
                raise TypeError(f"x must be a floating tensor, got {x.dtype}")
            x = x.detach().cpu().float().numpy()
        x = np.asarray(x)
        if x.dtype.kind != "f":
            raise TypeError(f"x must be a floating array (float16/32/64; bfloat16 as a torch tensor), got {x.dtype}")
        x = x.astype(np.float32)   # the deployed model's input is float32, as the simulation's
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        given = {} if given is None else given
        unknown = set(given) - {s.name for s in self.steps}
        if unknown:
            raise ValueError(f"given names steps this model does not have: {sorted(unknown)}")
        outs, kept = [], {}
        for start in range(0, max(len(x), 1), batch_size):
            env = {"input": x[start:start + batch_size]}
            for step in self.steps:
                env[step.name] = _run_step(step, env, self.requant)
                if codes:
                    kept.setdefault(step.name, []).append(env[step.name])
                if step.name in given:
                    env[step.name] = np.asarray(given[step.name], dtype=np.int64)[start:start + batch_size]
            outs.append(kept[self.output][-1] if codes else env[self.output])
        q = np.concatenate(outs)
        g = self.output_grid
        out = ((q - g.zero_point).astype(np.float32) * np.float32(g.scale)).astype(np.float32)
        if codes:
            return out, {k: np.concatenate(v) for k, v in kept.items()}
        return out


def _run_step(step: IntegerStep, env: dict, requant: str) -> np.ndarray:
    """The output codes (int64) of one step, from the codes of its inputs in env."""
    op = step.op
    xs = [env[i] for i in step.inputs]
    if op == "quantize":
        return _quantize_input(xs[0], step.grid)
    if op in ("max_pool", "flatten"):
        return _max_pool(xs[0], step.attrs) if op == "max_pool" else xs[0].reshape(len(xs[0]), -1)
    if op == "relu":
        return np.clip(xs[0], step.lo, step.hi)
    g = step.grid
    if op == "add":
        (ga, gb), a, b = step.attrs["grids"], xs[0] - step.attrs["grids"][0].zero_point, \
            xs[1] - step.attrs["grids"][1].zero_point
        if requant == "float32":
            y = a.astype(np.float32) * np.float32(ga.scale) + b.astype(np.float32) * np.float32(gb.scale)
            q = np.rint(y * np.reciprocal(np.float32(g.scale))).astype(np.int64)
        else:
            single = requant == "single_rounding"
            a = fixed_point_multiply(a << ADD_LEFT_SHIFT, step.multiplier[0], step.shift[0], single_rounding=single)
            b = fixed_point_multiply(b << ADD_LEFT_SHIFT, step.multiplier[1], step.shift[1], single_rounding=single)
            q = fixed_point_multiply(_wrap32(a + b), step.multiplier[2], step.shift[2], single_rounding=single)
        return np.clip(q + g.zero_point, step.lo, step.hi)
    x = xs[0] - step.attrs["input_zero_point"]
    if op == "conv":
        acc = _conv_acc(x, step.weight, step.attrs)
    elif op == "linear":
        acc = _matmul_exact(x, step.weight.T)
    elif op == "avg_pool":
        acc = _pool_sum(x, step.attrs)
        count = x[0, 0].size if step.attrs.get("global") else int(np.prod(step.attrs["kernel"]))
        if step.attrs.get("count") != count:
            step.attrs["count"] = count
            step.real = np.float64(step.attrs["input_scale"]) / (count * np.float64(g.scale))
            step.multiplier, step.shift = _multipliers(step.real)
    else:   # rescale
        acc = x
    if step.bias is not None:
        shape = (1, -1) + (1,) * (acc.ndim - 2)
        acc = _wrap32(_wrap32(acc) + step.bias.reshape(shape))
    acc = _wrap32(acc)
    channel_shape = (1, -1) + (1,) * (acc.ndim - 2) if np.ndim(step.multiplier) else ()
    m, s = np.reshape(step.multiplier, channel_shape), np.reshape(step.shift, channel_shape)
    if requant == "float32":
        q = _round_f32(acc, np.reshape(step.attrs.get("real_f32", step.real), channel_shape))
    else:
        q = fixed_point_multiply(acc, m, s, single_rounding=requant == "single_rounding")
    return np.clip(q + g.zero_point, step.lo, step.hi)


def _quantize_input(x: np.ndarray, g: Grid) -> np.ndarray:
    """Codes of the float input: clamp(round_half_even(x * (1/s)) + zp), as the simulation rounds."""
    inv = np.reciprocal(np.float32(g.scale))
    return np.clip(np.rint(x.astype(np.float32) * inv).astype(np.int64) + g.zero_point, g.qmin, g.qmax)


def _matmul_exact(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact integer matrix product through float64 (every partial sum < 2^53 for 8-bit codes)."""
    return np.rint(a.astype(np.float64) @ b.astype(np.float64)).astype(np.int64)


def _windows(x: np.ndarray, kernel, stride, padding, dilation, pad_value=0) -> np.ndarray:
    """(N, C, *out, *kernel) sliding windows of x (N, C, *spatial) with zero (or pad_value) padding."""
    d = len(kernel)
    x = np.pad(x, [(0, 0), (0, 0)] + [(p, p) for p in padding], constant_values=pad_value)
    span = [(k - 1) * dl + 1 for k, dl in zip(kernel, dilation)]
    w = sliding_window_view(x, span, axis=tuple(range(2, 2 + d)))
    idx = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride) + \
        tuple(slice(None, None, dl) for dl in dilation)
    return w[idx]


def _conv_acc(x: np.ndarray, w: np.ndarray, attrs: dict) -> np.ndarray:
    """int32 accumulators (N, O, *out) of a grouped convolution of codes x with weight codes w."""
    g = attrs["groups"]
    win = _windows(x, w.shape[2:], attrs["stride"], attrs["padding"], attrs["dilation"])
    n, c = win.shape[:2]
    out_shape = win.shape[2:2 + w.ndim - 2]
    d = w.ndim - 2
    # (N, C, *out, *k) -> (g, N * out, C/g * k)
    win = np.moveaxis(win, 1, 1 + d).reshape(n, *out_shape, g, -1)
    cols = np.moveaxis(win.reshape(-1, g, win.shape[-1]), 1, 0)
    wg = w.reshape(g, w.shape[0] // g, -1).transpose(0, 2, 1)
    acc = _matmul_exact(cols, wg)                   # (g, N * out, O/g)
    acc = np.moveaxis(acc, 0, 1).reshape(n, *out_shape, w.shape[0])
    return np.moveaxis(acc, -1, 1)


def _pool_sum(x: np.ndarray, attrs: dict) -> np.ndarray:
    """Integer sums over the average-pooling windows (global: all positions)."""
    if attrs.get("global"):
        return x.reshape(x.shape[0], x.shape[1], -1).sum(axis=2).reshape(x.shape[:2] + (1,) * (x.ndim - 2))
    k = attrs["kernel"]
    win = _windows(x, k, attrs["stride"], (0,) * len(k), (1,) * len(k))
    return win.sum(axis=tuple(range(win.ndim - len(k), win.ndim)))


def _max_pool(x: np.ndarray, attrs: dict) -> np.ndarray:
    """Max pooling on codes (monotone, so the same grid); padding counts as the smallest code."""
    k = attrs["kernel"]
    win = _windows(x, k, attrs["stride"], attrs["padding"], attrs["dilation"], pad_value=np.iinfo(np.int64).min)
    return win.max(axis=tuple(range(win.ndim - len(k), win.ndim)))


def _site_grid(q: ActQuantizer) -> Grid:
    """The :class:`Grid` of a calibrated activation site (ValueError/TypeError naming the site)."""
    where = f"activation site {q.site!r}"
    if q.state == "observe":
        raise ValueError(f"{where} is still observing (calibration unfinished): run refimpl.qmodel.calibrate")
    if not bool(q.calibrated):
        raise ValueError(f"{where} is not calibrated (no range): run refimpl.qmodel.calibrate(qmodel, x) first")
    scale, zp = affine_grid(q, where)
    return Grid(float(scale), int(zp), int(q.spec.qmin), int(q.spec.qmax))


def _weight_codes(name: str, layer: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """(weight codes minus their zero point, int64 (O, ...); scale, float32 (O,) or ()) of a layer."""
    wq = getattr(layer, "weight_quantizer", None)
    where = f"weight of layer {name!r}"
    if not isinstance(layer, QuantLayer) or wq is None or not wq.enabled:
        raise ValueError(f"{where} is not quantized (layer kept in float): integer-only inference needs every "
                         "layer's weight on an integer grid")
    scale, zp = affine_grid(wq, where)
    with torch.no_grad():
        w_hat = layer.quantized_weight().detach().to(torch.float64).cpu().numpy()
    shape = [1] * w_hat.ndim
    if wq.spec.axis is not None:
        shape[wq.spec.axis % w_hat.ndim] = -1
    s, z = scale.astype(np.float64).reshape(shape), zp.reshape(shape)
    codes = np.rint(w_hat / s)
    if not np.array_equal((codes * s).astype(np.float32), w_hat.astype(np.float32)):
        raise ValueError(f"{where}: the quantized weight is not on its exported grid (scale, zero_point)")
    codes = codes.astype(np.int64) + z
    if codes.min() < wq.spec.qmin or codes.max() > wq.spec.qmax:
        raise ValueError(f"{where}: codes outside [{wq.spec.qmin}, {wq.spec.qmax}]")
    if wq.spec.axis is not None and wq.spec.axis % w_hat.ndim != 0:
        raise ValueError(f"{where}: per-channel weights must be along axis 0 (output channels), got axis "
                         f"{wq.spec.axis}")
    return codes - z, scale.reshape(-1) if scale.ndim else scale


def _clamp(g: Grid, act: str | None) -> tuple[int, int]:
    """The output clamp of a step: the grid, raised to the zero point by a ReLU, capped at 6 by a ReLU6."""
    lo, hi = g.qmin, g.qmax
    if act is not None:
        lo = max(lo, g.zero_point)
    if act == "relu6":
        six = int(np.rint(np.float32(6.0) * np.reciprocal(np.float32(g.scale))))
        hi = min(hi, g.zero_point + six)
    return lo, hi


def _layer_step(node, layer: nn.Module, in_grid: Grid, in_name: str) -> IntegerStep:
    """A conv/linear step without its output grid yet (set when its activation site is reached)."""
    w, s_w = _weight_codes(node.target, layer)
    s_x = np.float64(in_grid.scale)
    bias = None
    if layer.bias is not None:
        # PyTorch's quantize_val: value * (1.0f / float(scale)) in float32, rounded half to even,
        # scale = s_x * s_w in double; one code from the exact quotient at near-ties
        inv = np.float32(1.0) / (s_x * s_w.astype(np.float64)).astype(np.float32)
        bias = np.rint(layer.bias.detach().float().cpu().numpy() * inv).astype(np.float64)
        if np.abs(bias).max(initial=0) > _INT32[1]:
            raise ValueError(f"layer {node.target!r}: the bias does not fit int32 at scale s_x * s_w")
        bias = bias.astype(np.int64)
    attrs = {"layer": node.target, "input_zero_point": in_grid.zero_point, "input_grid": in_grid,
             "weight_scale": s_w, "float_bias": None if layer.bias is None else layer.bias.detach().cpu().float()}
    if isinstance(layer, _CONV):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError(f"layer {node.target!r}: only explicit zero padding is supported")
        attrs.update(stride=tuple(layer.stride), padding=tuple(layer.padding), dilation=tuple(layer.dilation),
                     groups=layer.groups)
        return IntegerStep("conv", "", [in_name], None, weight=w, bias=bias, attrs=attrs)
    return IntegerStep("linear", "", [in_name], None, weight=w, bias=bias, attrs=attrs)


def _pool_step(node, m: nn.Module, in_grid: Grid, in_name: str) -> IntegerStep:
    """An average-pooling step (global, or without padding) awaiting its output grid."""
    attrs = {"input_zero_point": in_grid.zero_point}
    if hasattr(m, "output_size"):
        sizes = m.output_size if isinstance(m.output_size, tuple) else (m.output_size,)
        if any(s != 1 for s in sizes):
            raise ValueError(f"module {node.target!r}: of adaptive average pooling only size 1 is supported")
        attrs["global"] = True
    else:
        k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,)
        st = m.stride if isinstance(m.stride, tuple) else (m.stride,) * len(k)
        if any(p != 0 for p in np.atleast_1d(m.padding)) or m.ceil_mode:
            raise ValueError(f"module {node.target!r}: average pooling with padding or ceil_mode is not supported")
        attrs.update(kernel=tuple(k), stride=tuple(st))
    return IntegerStep("avg_pool", "", [in_name], None, attrs=attrs)


def _max_pool_attrs(node, m: nn.Module, rank: int) -> dict:
    """Kernel, stride, padding, dilation of a max-pooling module as tuples of the spatial rank."""
    def tup(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * rank
    if hasattr(m, "output_size") or m.ceil_mode or m.return_indices:
        raise ValueError(f"module {node.target!r}: only MaxPool without ceil_mode/return_indices is supported")
    return {"kernel": tup(m.kernel_size), "stride": tup(m.stride), "padding": tup(m.padding),
            "dilation": tup(m.dilation)}


def _finish(step: IntegerStep, g: Grid, act: str | None, site: str, in_grids: list) -> IntegerStep:
    """Give a pending step its output grid, clamp and requantisation multipliers."""
    step.grid, step.name = g, site
    step.lo, step.hi = _clamp(g, act)
    step.attrs["activation"] = act
    s_y = np.float64(g.scale)
    if step.op == "add":
        ga, gb = in_grids
        twice = 2 * max(np.float64(ga.scale), np.float64(gb.scale))
        reals = (np.float64(ga.scale) / twice, np.float64(gb.scale) / twice, twice / ((1 << ADD_LEFT_SHIFT) * s_y))
        step.attrs["grids"] = (ga, gb)
    elif step.op in ("conv", "linear"):
        reals = (np.float64(in_grids[0].scale) * step.attrs["weight_scale"].astype(np.float64) / s_y,)
        # PyTorch's kernels: (input_scale * weight_scale) * (1 / output_scale) in float32 operations
        # (measured: the quotient instead flips a few exact .5 products)
        step.attrs["real_f32"] = (np.float32(in_grids[0].scale) * step.attrs["weight_scale"].astype(np.float32)
                                  ) * np.reciprocal(np.float32(g.scale))
    elif step.op == "avg_pool":   # divided by the window's size when it is known (at run time)
        reals = (np.float64(in_grids[0].scale) / s_y,)
        step.attrs["input_scale"] = in_grids[0].scale
    else:   # rescale
        reals = (np.float64(in_grids[0].scale) / s_y,)
    pairs = [_multipliers(r) for r in reals]
    step.real = tuple(reals) if step.op == "add" else reals[0]
    step.multiplier = tuple(p[0] for p in pairs) if step.op == "add" else pairs[0][0]
    step.shift = tuple(p[1] for p in pairs) if step.op == "add" else pairs[0][1]
    return step


def integer_model(qmodel: torch.fx.GraphModule, requant: str = "fixed_point") -> IntegerModel:
    """Compile a calibrated, frozen ``quantize_model`` graph into integer-only steps (module docstring).

    Reference: Jacob et al. 2018 (arXiv 1712.05877) §2.2-2.4; the white paper (Nagel et al. 2021)
    §2.3, Fig. 4 for which tensors carry a grid. qmodel: a ``refimpl.qmodel.quantize_model``
    GraphModule in eval mode, BN folded, every quantizer "fixed" (``refimpl.qmodel.freeze``), at
    most 8 bits, activation sites as the white paper places them (insertion pattern 3): every
    conv, linear, add and average pooling must be followed, directly or through one ReLU/ReLU6, by
    a calibrated activation site, which gives its output grid. requant: one of :data:`REQUANT_MODES`.

    Raises TypeError/ValueError naming the layer, site or node for: a model with no quantizers, a
    BatchNorm, training mode, a layer kept in float, an unquantized input or output of a layer
    ("needs an activation site after ..."), a quantizer no runtime can run, an op with no integer
    form here.

    Why one function: the pass keeps three maps (env name of each node's codes, its grid, the
    steps still waiting for their output site) that every node kind reads and writes; the
    per-kind work is in helpers.

    Used in :ref:`ch12-sec-deployment`.
    """
    if not isinstance(qmodel, torch.fx.GraphModule):
        raise TypeError(f"qmodel must be a torch.fx.GraphModule from refimpl.qmodel.quantize_model, got "
                        f"{type(qmodel).__name__}")
    if requant not in REQUANT_MODES:
        raise ValueError(f"requant must be one of {REQUANT_MODES}, got {requant!r}")
    if not weight_quantizers(qmodel) and not act_quantizers(qmodel):
        raise ValueError("qmodel has no quantizers: quantize it with refimpl.qmodel.quantize_model first")
    if qmodel.training:
        raise ValueError("qmodel is in training mode: call qmodel.eval() first")
    modules = dict(qmodel.named_modules())
    bns = [n for n, m in modules.items() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))]
    if bns:
        raise ValueError(f"qmodel has BatchNorm layers {bns}: fold them first (refimpl.fold.fold_all_bn)")
    name, grid, pending = {}, {}, {}   # node -> env name of its codes / its Grid / (step, act, input grids)
    steps, used, out_node, float_input = [], set(), None, None

    def emit(step, base):
        step.name = base if base not in used else f"{base}#{len(used)}"
        used.add(step.name)
        steps.append(step)
        return step.name

    def coded(node, who):
        if node in pending:
            what = pending[node][0].attrs.get("layer", pending[node][0].op)
            raise ValueError(f"{who} reads the output of {what!r} before any activation site: integer-only "
                             f"inference needs an activation site after {what!r} (insertion pattern 3)")
        if node not in grid:
            raise ValueError(f"{who} reads a tensor that is not quantized ({node.name!r}): integer-only inference "
                             "needs every layer's input on an activation site's grid")
        return name[node], grid[node]

    for node in qmodel.graph.nodes:
        who = f"node {node.name!r}"
        if node.op == "placeholder":
            if float_input is not None:
                raise ValueError("integer_model handles models with one tensor input")
            float_input = node
        elif node.op == "output":
            out_node = node.args[0]
            coded(out_node, "the model's output")
        elif node.op == "call_module" and isinstance(modules[node.target], ActQuantizer):
            q, src = modules[node.target], node.args[0]
            if q.state == "off":    # the tensor passes through: its codes, grid or pending step move on
                for d in (name, grid):
                    if src in d:
                        d[node] = d[src]
                if src in pending:
                    pending[node] = pending.pop(src)
                continue
            g = _site_grid(q)
            if src is float_input:
                name[node] = emit(IntegerStep("quantize", "", ["input"], g, g.qmin, g.qmax), q.site)
            elif src in pending:
                step, act, in_grids = pending.pop(src)
                name[node] = emit(_finish(step, g, act, q.site, in_grids), q.site)
            else:
                src_name, src_grid = coded(src, f"activation site {q.site!r}")
                step = IntegerStep("rescale", "", [src_name], None, attrs={"input_zero_point": src_grid.zero_point})
                name[node] = emit(_finish(step, g, None, q.site, [src_grid]), q.site)
            grid[node] = g
        else:
            _compile_node(node, modules, name, grid, pending, coded, emit, who)
    if pending:
        what = [p[0].attrs.get("layer", p[0].op) for p in pending.values()]
        raise ValueError(f"no activation site after {what}: integer-only inference needs one after every "
                         "conv, linear, add and average pooling")
    return IntegerModel(steps, requant, name[out_node])


def _compile_node(node, modules, name, grid, pending, coded, emit, who) -> None:
    """One non-quantizer fx node: a pending compute step, a step on codes, or an alias."""
    m = modules.get(node.target) if node.op == "call_module" else None
    args = [a for a in node.args if isinstance(a, torch.fx.Node)]
    act = activation_kind(node, modules)
    if isinstance(m, (QuantLayer, *_CONV, nn.Linear)):
        src_name, g = coded(args[0], f"layer {node.target!r}")
        pending[node] = (_layer_step(node, m, g, src_name), None, [g])
    elif act is not None and args and args[0] in pending and pending[args[0]][1] is None:
        step, _, in_grids = pending.pop(args[0])
        pending[node] = (step, act, in_grids)
    elif act is not None:
        src_name, g = coded(args[0], who)
        lo, hi = _clamp(g, act)
        name[node], grid[node] = emit(IntegerStep("relu", "", [src_name], g, lo, hi), node.name), g
    elif is_add(node):
        if len(node.args) != 2 or node.kwargs:
            raise ValueError(f"{who}: only a plain two-tensor add is supported")
        (na, ga), (nb, gb) = coded(args[0], who), coded(args[1], who)
        pending[node] = (IntegerStep("add", "", [na, nb], None), None, [ga, gb])
    elif is_avg_pool(node, modules) and m is not None:
        src_name, g = coded(args[0], who)
        pending[node] = (_pool_step(node, m, g, src_name), None, [g])
    elif is_pool(node, modules) and m is not None:
        src_name, g = coded(args[0], who)
        rank = len(np.atleast_1d(m.kernel_size)) if isinstance(m.kernel_size, (tuple, list)) else None
        attrs = _max_pool_attrs(node, m, rank or (2 if isinstance(m, nn.MaxPool2d) else
                                                  1 if isinstance(m, nn.MaxPool1d) else 3))
        name[node] = emit(IntegerStep("max_pool", "", [src_name], g, g.qmin, g.qmax, attrs=attrs), node.name)
        grid[node] = g
    elif passes_values(node, modules):
        src_name, g = coded(args[0], who)
        if isinstance(m, nn.Flatten) or getattr(node.target, "__name__", node.target) == "flatten":
            name[node] = emit(IntegerStep("flatten", "", [src_name], g, g.qmin, g.qmax), node.name)
        elif isinstance(m, (nn.Identity, nn.Dropout)):
            name[node] = src_name
        else:
            raise ValueError(f"{who} ({node.op} {node.target}): reshapes other than flatten are not supported")
        grid[node] = g
    else:
        raise ValueError(f"{who} ({node.op} {getattr(node.target, '__name__', node.target)}) has no integer form "
                         "here (conv, linear, add, relu/relu6, pooling, flatten, identity are supported)")


def simulated_codes(qmodel: torch.fx.GraphModule, x) -> dict[str, np.ndarray]:
    """{activation site: int64 codes} of the simulated (fake-quantized) model on float input x.

    The fake-quantized output ``scale * (q - zero_point)`` of each site in state "quantize" is mapped
    back to q (exact: the float32 product is within 2^-24 relative of the integer times scale).

    Used in :ref:`ch12-sec-deployment`.
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    sites = {s: q for s, q in act_quantizers(qmodel).items() if q.state == "quantize"}
    out: dict = {}
    hooks = []
    for site, q in sites.items():
        def hook(mod, inp, y, site=site):
            g = mod.export()
            codes = torch.round(y.detach().double() / g["scale"].double()) + g["zero_point"].double()
            out.setdefault(site, []).append(codes.to(torch.int64).cpu().numpy())
        hooks.append(q.register_forward_hook(hook))
    try:
        with torch.no_grad():
            qmodel(x)
    finally:
        for h in hooks:
            h.remove()
    return {k: np.concatenate(v) for k, v in out.items()}


def site_agreement(imodel: IntegerModel, qmodel: torch.fx.GraphModule, x, isolated: bool = False) -> list[dict]:
    """Per activation site, the integer codes against the simulation's on the same input.

    Returns one dict per site step in execution order: "site", "op", "max_diff" (largest absolute
    code difference), "differ" (fraction of elements that differ), "elements". isolated=False: the
    integer path runs end to end, so a difference at one site propagates to the next; True: every
    step reads the *simulation's* codes at its input sites, so a row measures that step alone.

    Used in :ref:`ch12-sec-the-whole-model`.
    """
    sim = simulated_codes(qmodel, x)
    _, codes = imodel.run(x, codes=True, given=sim if isolated else None)
    rows = []
    for step in imodel.steps:
        if step.name in sim:
            d = np.abs(codes[step.name] - sim[step.name])
            rows.append({"site": step.name, "op": step.op, "max_diff": int(d.max(initial=0)),
                         "differ": float((d > 0).mean()) if d.size else 0.0, "elements": int(d.size)})
    return rows


def layer_operands(step: IntegerStep, x_codes) -> tuple[np.ndarray, np.ndarray, int]:
    """The GEMM operands of a conv/linear step as an x86 int8 kernel reads them.

    Returns (A, B, a_zero_point): A (M, K) int64 activation codes as *unsigned* bytes (a signed grid
    shifted by 128, as FBGEMM and onnxruntime carry activations), B (K, O) int64 weight codes
    (int8), and A's zero point; K in channel-fastest order (NHWC im2col, FBGEMM's layout), M = N *
    output positions. The exact accumulators are ``A @ B - a_zero_point * B.sum(0)``.
    x_codes: the step's input codes (N, C, ...) on its input grid.

    Used in :ref:`ch12-sec-one-convolution-three-ways`.
    """
    if step.op not in ("conv", "linear"):
        raise ValueError(f"step must be a conv or linear step, got op {step.op!r}")
    if step.op == "conv" and step.attrs["groups"] != 1:
        raise ValueError("layer_operands handles convolutions with groups=1")
    g_in = step.attrs["input_grid"]
    off = 128 if g_in.qmin < 0 else 0
    x = np.asarray(x_codes, dtype=np.int64) + off
    w = step.weight
    if step.op == "linear":
        return x, w.T.copy(), g_in.zero_point + off
    k = w.shape[2:]
    win = _windows(x, k, step.attrs["stride"], step.attrs["padding"], step.attrs["dilation"],
                   pad_value=g_in.zero_point + off)      # padding is the real value 0
    d = len(k)
    # (N, C, *out, *k) -> (N, *out, *k, C): channel fastest
    a = np.moveaxis(win, 1, -1).reshape(-1, int(np.prod(k)) * w.shape[1])
    b = np.moveaxis(w, 1, -1).reshape(w.shape[0], -1).T
    return a, b.copy(), g_in.zero_point + off


def layer_accumulators(step: IntegerStep, x_codes, bias: bool = True) -> np.ndarray:
    """The exact int32 accumulators (M, O) of a conv/linear step on its input codes, GEMM layout.

    ``A @ B - a_zero_point * B.sum(0)`` of :func:`layer_operands` (rows: batch x output positions,
    channel-fastest K; columns: output channels), plus the step's int32 bias when ``bias``; the
    values the output stage (:func:`refimpl.neon.requantize`) starts from. Computed through an
    exact float64 product. Returns int64 (M, O).

    Used in :ref:`ch12-sec-one-convolution-three-ways`.
    """
    a, b, zp = layer_operands(step, x_codes)
    acc = _matmul_exact(a, b) - zp * b.sum(0)
    if bias and step.bias is not None:
        acc = acc + step.bias
    return acc


def pair_saturating_matmul(a, b, chunk: int = 4096) -> tuple[np.ndarray, int]:
    """``a @ b`` as x86's AVX2 int8 path computes it: VPMADDUBSW, then VPMADDWD into int32.

    VPMADDUBSW multiplies unsigned bytes of a by signed bytes of b and adds *adjacent pairs* along K
    with int16 saturation (Intel SDM, "PMADDUBSW"): 255 * -128 * 2 = -65280 becomes -32768. This
    is why PyTorch's x86 observers default to ``reduce_range=True`` (7-bit activations: at most
    2 * 127 * 128 = 32512, which fits). VNNI's VPDPBUSD sums into int32 without this saturation.
    a: (M, K) integers in [0, 255]; b: (K, N) integers in [-128, 127]; K is zero-padded to even.
    Returns (int64 (M, N) results, number of saturated pair sums).

    Used in :ref:`ch12-sec-conventions`.
    """
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"a (M, K) and b (K, N) must be 2-d with matching K, got {a.shape} and {b.shape}")
    if a.size and (a.min() < 0 or a.max() > 255):
        raise ValueError("a must hold unsigned bytes [0, 255]")
    if b.size and (b.min() < -128 or b.max() > 127):
        raise ValueError("b must hold signed bytes [-128, 127]")
    if a.shape[1] % 2:
        a, b = np.pad(a, ((0, 0), (0, 1))), np.pad(b, ((0, 1), (0, 0)))
    out, saturated = np.empty((a.shape[0], b.shape[1]), np.int64), 0
    for i in range(0, a.shape[0], chunk):
        blk = a[i:i + chunk]
        pairs = blk[:, 0::2, None] * b[None, 0::2] + blk[:, 1::2, None] * b[None, 1::2]
        clipped = np.clip(pairs, -(1 << 15), (1 << 15) - 1)
        saturated += int((clipped != pairs).sum())
        out[i:i + chunk] = clipped.sum(axis=1)
    return out, saturated


def torch_quantized_layer(step: IntegerStep, x_codes: np.ndarray, engine: str = "qnnpack") -> np.ndarray:
    """A conv/linear step of :class:`IntegerModel` through PyTorch's quantized CPU kernel, as codes.

    The reference for the integer path's layers: ``torch.ao.nn.quantized.functional`` conv1d /
    conv2d / linear with the step's input codes (quint8; a signed grid carried with zero point + 128,
    the same integers after the kernel subtracts it), its weight codes as per-channel (or per-tensor)
    qint8 and the layer's float bias, which PyTorch quantizes to int32 itself; the output grid is the
    step's; the step's clamp (fused ReLU/ReLU6, a grid narrower than 8 bits) is applied to the codes
    as the kernel's output clamp would. engine: one of ``torch.backends.quantized.supported_engines``
    (default "qnnpack", PyTorch's ARM kernels). x_codes: int codes (N, C, ...) on the step's input
    grid. Returns int64 codes of the step's output shape.

    Used in :ref:`ch12-sec-one-convolution-three-ways`.
    """
    if step.op not in ("conv", "linear") or step.grid is None:
        raise ValueError(f"step must be a conv or linear step of an IntegerModel, got op {step.op!r}")
    if step.weight.ndim not in (2, 3, 4):
        raise ValueError("torch_quantized_layer handles linear, conv1d and conv2d layers")
    a = step.attrs
    g_in, g = a["input_grid"], step.grid
    s_w = torch.as_tensor(np.atleast_1d(a["weight_scale"]).astype(np.float64))
    w = torch.from_numpy(step.weight.astype(np.int8))
    off = 128 if g.qmin < 0 else 0
    with quantized_engine(engine):
        qx = as_quint8(x_codes, g_in.scale, g_in.zero_point, g_in.qmin < 0)
        if s_w.numel() == 1:
            qw = torch._make_per_tensor_quantized_tensor(w, float(s_w), 0)
        else:
            qw = torch._make_per_channel_quantized_tensor(w, s_w, torch.zeros_like(s_w, dtype=torch.int64), 0)
        qf = torch.ao.nn.quantized.functional
        if step.op == "linear":
            out = qf.linear(qx, qw, a["float_bias"], g.scale, g.zero_point + off)
        else:
            conv = qf.conv1d if step.weight.ndim == 3 else qf.conv2d
            out = conv(qx, qw, a["float_bias"], stride=a["stride"], padding=a["padding"],
                       dilation=a["dilation"], groups=a["groups"], scale=g.scale,
                       zero_point=g.zero_point + off, dtype=torch.quint8)
    return np.clip(out.int_repr().to(torch.int64).numpy() - off, step.lo, step.hi)

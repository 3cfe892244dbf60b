"""Range setters applied and compared: named range methods, every method on every tensor, the
error each range gives, and the running range batch by batch (book chapter 3, "Range setting").

* ``RANGE_METHODS``, ``range_method_fn`` — the range setters by name ("minmax", "mse", ...).
* ``calibrate_ranges`` — every range method of a set on every tensor of a set.
* ``range_report`` — per range: the clipped fraction, MSE and SQNR it gives a tensor.
* ``ema_minmax_trace`` — the running range of ``calib.ema_minmax`` after every batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .._api import renamed
from .._checks import check_float_tensor, check_int
from ..metrics import sqnr_db
from ..quant import QuantSpec, fake_quant, in_grid, qparams
from .common import check_per_tensor, check_spec
from .cross_entropy import cross_entropy
from .entropy import kl_onnxruntime, kl_tensorrt
from .mse import mse
from .ranges import ema_minmax, minmax, percentile

__all__ = ["RANGE_METHODS", "range_method_fn", "calibrate_ranges", "range_report", "ema_minmax_trace"]

RANGE_METHODS: dict[str, Callable] = {
    "minmax": minmax, "percentile": percentile, "mse": mse, "cross_entropy": cross_entropy,
    "kl_tensorrt": kl_tensorrt, "kl_onnxruntime": kl_onnxruntime,
}
"""The range setters fn(x, spec) -> (xmin, xmax) by name, for ``range_method="..."`` parameters."""


def range_method_fn(range_method, name: str = "range_method") -> Callable:
    """The range setter a ``range_method`` parameter names: a key of ``RANGE_METHODS``, or a
    callable fn(x, spec) -> (xmin, xmax) returned as it is. ``name`` names the parameter in errors."""
    if isinstance(range_method, str):
        if range_method not in RANGE_METHODS:
            raise ValueError(f"{name} must be one of {list(RANGE_METHODS)} or a callable "
                             f"fn(x, spec) -> (xmin, xmax), got {range_method!r}")
        return RANGE_METHODS[range_method]
    if not callable(range_method):
        raise TypeError(f"{name} must be a name in {list(RANGE_METHODS)} or a callable "
                        f"fn(x, spec) -> (xmin, xmax), got {type(range_method).__name__}")
    return range_method


@renamed(methods="range_method")
def calibrate_ranges(tensors: Mapping[str, torch.Tensor], spec: QuantSpec,
                     range_method) -> dict[str, dict[str, tuple]]:
    """Every range setter in ``range_method`` applied to every tensor in ``tensors`` (white paper,
    Nagel et al. 2021, §3.1; book chapter 3 compares them on a network's activations).

    tensors: {name: floating tensor}, e.g. the activations ``refimpl.capture.capture_activations``
    returns.  range_method: {label: name in ``RANGE_METHODS`` or fn(x, spec) -> (xmin, xmax)}, or
    one such name or callable (labelled by the name, or the callable's ``__name__``).
    Returns {label: {tensor name: (xmin, xmax)}}, both in the given order.

    Used in :ref:`ch3-sec-activations`.
    """
    check_spec(spec)
    if isinstance(range_method, Mapping):
        fns = {label: range_method_fn(m, f"range_method[{label!r}]") for label, m in range_method.items()}
    else:
        fn = range_method_fn(range_method)
        fns = {range_method if isinstance(range_method, str) else getattr(fn, "__name__", "range"): fn}
    return {m: {n: fn(x, spec) for n, x in tensors.items()} for m, fn in fns.items()}


def range_report(x: torch.Tensor, ranges: Mapping[str, tuple], spec: QuantSpec) -> list[dict]:
    """The error each range in ``ranges`` gives x under ``spec``: one dict per range, in order
    (white paper §3.1's comparison of range setters; book chapter 3).

    For (xmin, xmax) -> (scale, zero_point) = qparams(xmin, xmax, spec) and x_hat = fake_quant(x):
    "name", "xmin", "xmax" (floats), "clipped_pct" (percentage of values outside the grid, i.e.
    whose code was clamped), "mse" = mean((x_hat - x)^2) and "sqnr_db" = 10 log10(sum x^2 /
    sum (x_hat - x)^2) (float64). Per-tensor or per-channel, as ``spec`` says; ranges as
    ``refimpl.calib`` returns them (0-d or 1-d).
    x: floating tensor.

    Used in :ref:`ch3-sec-activations`.
    """
    check_float_tensor(x, "x")
    check_spec(spec)
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
    """The running range of ``calib.ema_minmax`` fed x in consecutive batches along dim 0 (the EMA
    ranges of quantization-aware training, Jacob et al. 2018; book chapter 3).

    x: floating tensor (N, ...), the batches x[0:B], x[B:2B], ... (the last may be shorter).
    spec: per-tensor.  averaging_constant: c of ``ema_minmax``.
    Returns float32 (num_batches, 2): row t is (xmin, xmax) after batch t.

    Used in :ref:`ch3-sec-running-ranges-ema-min-max`.
    """
    check_float_tensor(x, "x")
    check_per_tensor(spec, "ema_minmax_trace")
    batch_size = check_int(batch_size, "batch_size", low=1)
    if x.ndim == 0:
        raise ValueError("x must have a batch dimension")
    state, out = None, []
    for i in range(0, x.shape[0], batch_size):
        state = ema_minmax(x[i:i + batch_size], spec, state, averaging_constant)
        out.append(torch.stack(state))
    return torch.stack(out)

"""Observers: record the statistics of the tensors flowing through, return them unchanged.

White paper §3.1 "Quantization range setting": an activation's range is set from statistics
gathered on calibration data. An :class:`Observer` keeps the running min and max, and for the
"mse", "percentile" and "kl_tensorrt" range methods a random subsample of the values (calib.mse costs ~10-20 us
per value, so it sees ``samples`` values; a percentile or a histogram needs 100x more for its tail). The range
itself comes from the pure functions of ``refimpl.calib``; the scale and zero point from
``refimpl.quant.qparams``.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import calib
from .._checks import check_choice, check_int
from ..quant import QuantSpec

__all__ = ["Observer", "KEPT_SAMPLES", "tensor_range"]

# the range methods an Observer supports, and the values it keeps for each, as a multiple of ``samples``
KEPT_SAMPLES = {"minmax": 0, "mse": 1, "percentile": 100, "kl_tensorrt": 100}


def tensor_range(x: torch.Tensor, spec: QuantSpec, range_method: str, percentile: float = 99.99):
    """(xmin, xmax) of tensor x by ``range_method`` (a name in ``refimpl.calib.RANGE_METHODS``),
    per tensor or along spec.axis (white paper §3.1); "percentile" at the given percentile.

    "kl_tensorrt": TensorRT's entropy calibration (``calib.kl_tensorrt``), which is symmetric: the
    threshold t from the histogram of ``|x|`` with exact zeros left out (``ignore_zeros``: the spike a
    ReLU leaves at 0 would otherwise pull t towards zero); a signed grid gets [-t, t], an unsigned
    one [0, t], with as many levels on [0, t] as the grid has (a b-bit unsigned grid is matched
    by a (b+1)-bit signed one). The baseline EasyQuant is compared with (Wu et al. 2020, Table 1).

    Used in :ref:`ch7-sec-accuracy-against-min-max-kl-and`.
    """
    if range_method == "percentile":
        return calib.percentile(x, spec, percentile)
    if range_method == "kl_tensorrt":
        signed = QuantSpec(bits=spec.bits + (0 if spec.signed else 1), signed=True, symmetric=True,
                           axis=spec.axis)
        lo, hi = calib.kl_tensorrt(x, signed, ignore_zeros=True)
        return (lo if spec.signed else torch.zeros_like(lo)), hi
    return calib.range_method_fn(range_method)(x, spec)


class Observer(nn.Module):
    """Records min, max and (for "mse"/"percentile") a seeded random subsample of its inputs.

    forward(x): x unchanged (any shape, any float dtype). ``range(spec)`` gives the per-tensor
    (xmin, xmax) of everything seen since the last ``reset()`` by ``range_method``: min-max is
    the running extremes; "mse"/"percentile" run ``tensor_range`` on the kept values.
    """

    def __init__(self, range_method: str = "minmax", percentile: float = 99.99, samples: int = 4096,
                 seed: int = 0):
        super().__init__()
        self.range_method = check_choice(range_method, "range_method", tuple(KEPT_SAMPLES))
        self.percentile = float(percentile)
        self.samples = check_int(samples, "samples", 1)
        self.seed = check_int(seed, "seed", 0)
        self.reset()

    @property
    def keep(self) -> int:
        """Values kept for the range method (0 for min-max)."""
        return self.samples * KEPT_SAMPLES[self.range_method]

    def reset(self) -> None:
        """Forget everything observed."""
        self.min = self.max = None
        self.kept: list[torch.Tensor] = []
        self._gen = None

    @property
    def seen(self) -> bool:
        """Whether any tensor was observed since the last reset."""
        return self.min is not None

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.detach().float().reshape(-1)
        lo, hi = torch.aminmax(xf)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        if self.keep:
            if xf.numel() > self.keep:
                if self._gen is None:
                    self._gen = torch.Generator(device=xf.device).manual_seed(self.seed)
                xf = xf[torch.randperm(xf.numel(), generator=self._gen, device=xf.device)[:self.keep]]
            self.kept.append(xf.clone())
        return x

    @torch.no_grad()
    def range(self, spec: QuantSpec):
        """(xmin, xmax) of what was observed (RuntimeError if nothing was)."""
        if not self.seen:
            raise RuntimeError("the observer saw no data")
        if self.range_method == "minmax":
            return self.min, self.max
        v = torch.cat(self.kept)
        if v.numel() > self.keep:
            # batches were subsampled one by one: draw the final sample from their union
            g = torch.Generator(device=v.device).manual_seed(self.seed)
            v = v[torch.randperm(v.numel(), generator=g, device=v.device)[:self.keep]]
        return tensor_range(v, spec, self.range_method, self.percentile)

    def extra_repr(self) -> str:
        return f"range_method={self.range_method!r}"

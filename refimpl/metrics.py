"""Quantization-error metrics: SQNR measured and predicted, rounding versus clipping error."""

from __future__ import annotations

import math

import torch

from ._checks import check_float_tensor, check_int
from .quant.functional import dequantize, fake_quant, in_grid
from .quant.spec import QuantSpec

__all__ = ["grid_levels", "sqnr_db", "uniform_sqnr_db", "quant_error_split"]


def grid_levels(scale, zero_point, spec: QuantSpec) -> torch.Tensor:
    """Every real value a per-tensor uniform quantizer can output: s (q - z) for q = qmin .. qmax.

    (white paper, Nagel et al. 2021, eq. 6 applied to the whole integer grid.)
    scale, zero_point: per-tensor, as returned by ``qparams``. Returns a float32 1-d tensor of
    ``spec.num_levels`` increasing values.

    Used in :ref:`ch1-sec-uniform-and-non-uniform-grids`.
    """
    if not isinstance(spec, QuantSpec) or spec.axis is not None:
        raise ValueError("grid_levels needs a per-tensor QuantSpec (spec.axis is None)")
    codes = torch.arange(spec.qmin, spec.qmax + 1, dtype=torch.int64).to(spec.storage_dtype)
    return dequantize(codes, scale, zero_point, spec)


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(sum x^2 / sum (x_hat - x)^2) in dB, in float64.

    x, x_hat: floating tensors of the same shape. Returns +inf when x_hat == x, -inf when x == 0
    everywhere and x_hat is not.

    Used in :ref:`ch1-sec-uniform-and-non-uniform-grids`, :ref:`ch3-sec-weights`.
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
    on [-s/2, s/2] (variance s^2 / 12), so for a signal of RMS value sigma::

        SQNR = 10 log10(sigma^2 / (s^2 / 12)) = 20 log10(2^b - 1) + 10 log10(3) - 20 log10(peak / sigma)
             ~ 6.02 b + 4.77 - 20 log10(peak / sigma)        (b large)

    (the classical "6 dB per bit" rule; see e.g. Gray & Neuhoff 1998, "Quantization", IEEE Trans.
    Inf. Theory 44(6)).

    bits: 1..16; peak_to_rms: peak / sigma >= 1 (the crest factor). Returns a float.

    Used in :ref:`ch1-sec-bit-width`.
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

    Used in :ref:`ch2-sec-clipping`.
    """
    check_float_tensor(x, "x")
    if not isinstance(spec, QuantSpec) or spec.axis is not None:
        raise ValueError("quant_error_split needs a per-tensor QuantSpec (spec.axis is None)")
    x = x.detach()
    y = fake_quant(x, scale, zero_point, spec, rounding)
    inside = in_grid(x, scale, zero_point, spec, rounding)
    err2 = (y.double() - x.double()).pow(2)
    n = x.numel()
    return {
        "mse": float(err2.sum()) / n,
        "rounding_mse": float(err2[inside].sum()) / n,
        "clipping_mse": float(err2[~inside].sum()) / n,
        "clipped_fraction": float((~inside).sum()) / n,
    }

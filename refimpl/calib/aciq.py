"""The clipping-versus-rounding trade-off of a range, measured and analytic (book chapter 3,
"Range setting"):

* ``standard_samples`` — seeded unit-variance Gaussian or Laplacian samples, the two bell shapes of
  weights and pre-activations.
* ``quantization_mse`` — the mean squared error of ``fake_quant`` at many clipping thresholds at
  once: the clipping-versus-rounding curve (white paper, Nagel et al. 2021, §3.1).
* ``aciq_mse``, ``aciq_optimal_clip`` — the analytic version of that curve for Gaussian and
  Laplacian data and its minimiser (ACIQ, Banner et al. 2019, §4).
"""

from __future__ import annotations

import math

import torch

from .._checks import check_choice, check_float_tensor, check_int
from ..quant import QuantSpec
from .common import EVAL_BUDGET, check_per_tensor, fake_quant_at

__all__ = ["DISTRIBUTIONS", "standard_samples", "quantization_mse", "aciq_mse", "aciq_optimal_clip"]

DISTRIBUTIONS = ("gaussian", "laplace")


def standard_samples(dist: str, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` seeded samples of a zero-mean, unit-variance Gaussian or Laplacian (float32, (n,)).

    dist: "gaussian" (N(0, 1)) or "laplace" (density ``exp(-|x|/b) / 2b`` with b = 1/sqrt(2), so that
    the variance 2 b^2 is 1; drawn by inverting the CDF of a uniform from a seeded generator).

    Used in :ref:`ch3-sec-why-the-range-matters-clipping`.
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


def quantization_mse(x: torch.Tensor, spec: QuantSpec, clip_values) -> torch.Tensor:
    """Mean squared error mean((fake_quant(x) - x)^2) for every clipping threshold t in ``clip_values``.

    The range for threshold t is [-t, t] for a symmetric spec and [min(min x, 0), t] for an
    asymmetric one (one-sided clipping, as for post-ReLU activations); each range goes through
    ``qparams`` as float32, exactly as a range returned by ``refimpl.calib`` does, so the curve's
    value at a calibrated threshold is that range's error. All thresholds are evaluated together
    as one per-channel fake_quant of x repeated along a new axis (in chunks), the candidate
    evaluation ``calib.mse`` also uses.

    x: floating tensor, any shape (flattened).  spec: per-tensor.
    clip_values: 1-d tensor or sequence of thresholds t > 0 (T,).
    Returns the MSE at each threshold, float64 (T,).

    Used in :ref:`ch3-sec-why-the-range-matters-clipping`.
    """
    check_float_tensor(x, "x")
    check_per_tensor(spec, "quantization_mse")
    t = torch.as_tensor(clip_values, dtype=torch.float64).reshape(-1)
    if t.numel() == 0 or not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
        raise ValueError("clip_values must be a non-empty set of finite thresholds > 0")
    v = x.detach().reshape(-1)
    lowest = min(float(v.min()), 0.0)
    out = torch.empty(t.numel(), dtype=torch.float64)
    rows = max(1, EVAL_BUDGET // v.numel())
    for i in range(0, t.numel(), rows):
        hi = t[i:i + rows].to(torch.float32).unsqueeze(1)
        lo = -hi if spec.symmetric else torch.full_like(hi, lowest)
        err = fake_quant_at(v.unsqueeze(0), lo, hi, spec)[:, 0].double() - v.double()
        out[i:i + rows] = err.pow(2).mean(dim=1)
    return out


def aciq_mse(alpha, bits: int, dist: str) -> torch.Tensor:
    """ACIQ's analytic quantization MSE of unit-variance data clipped to [-alpha, alpha]
    (Banner et al. 2019, "Post training 4-bit quantization of convolutional networks for
    rapid-deployment", §4, eqs. for the Laplace and Gaussian priors)::

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

    Used in :ref:`ch3-sec-why-the-range-matters-clipping`.
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

"""refimpl.calib.aciq: the clipping-versus-rounding curve checked against a plain loop over
fake_quant, ACIQ's analytic curve against numerical integration (scipy) and the paper's values."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from refimpl.calib import aciq_mse, aciq_optimal_clip, minmax, mse, quantization_mse, standard_samples
from refimpl.quant import QuantSpec, fake_quant, qparams


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dist", ["gaussian", "laplace"])
def test_standard_samples_have_unit_variance_and_the_right_shape(dist):
    x = standard_samples(dist, 200_000, seed=3)
    assert x.dtype == torch.float32 and x.shape == (200_000,)
    assert torch.equal(x, standard_samples(dist, 200_000, seed=3))
    assert abs(float(x.double().mean())) < 0.01 and abs(float(x.double().var()) - 1) < 0.02
    ref = stats.norm() if dist == "gaussian" else stats.laplace(scale=1 / math.sqrt(2))
    assert stats.kstest(x.double().numpy(), ref.cdf).pvalue > 1e-3


def test_standard_samples_errors():
    with pytest.raises(ValueError, match="dist"):
        standard_samples("cauchy", 10)
    with pytest.raises(ValueError, match="n"):
        standard_samples("gaussian", 0)


# --------------------------------------------------------------------------------------------
# The clipping-versus-rounding curve
# --------------------------------------------------------------------------------------------
def loop_mse(x, spec, t):
    """The MSE at threshold t, one fake_quant at a time."""
    hi = torch.tensor(t, dtype=torch.float32)
    lo = -hi if spec.symmetric else torch.tensor(min(float(x.min()), 0.0))
    s, z = qparams(lo, hi, spec)
    return float((fake_quant(x, s, z, spec).double() - x.double()).pow(2).mean())


@pytest.mark.parametrize("spec", [QuantSpec(4, narrow_range=True), QuantSpec(3), QuantSpec(5, signed=False, symmetric=False)],
                         ids=str)
def test_quantization_mse_equals_a_loop_over_thresholds(spec, monkeypatch):
    x = standard_samples("laplace", 3000, seed=1)
    if not spec.signed:
        x = x.clamp(min=0)
    t = torch.linspace(0.05, float(x.abs().max()) * 1.1, 37)
    monkeypatch.setattr("refimpl.calib.aciq.EVAL_BUDGET", 3000 * 5)     # several chunks
    got = quantization_mse(x, spec, t)
    want = torch.tensor([loop_mse(x, spec, float(v)) for v in t], dtype=torch.float64)
    assert got.dtype == torch.float64 and got.shape == (37,)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_quantization_mse_at_the_calibrated_ranges():
    x = standard_samples("gaussian", 5000, seed=2)
    spec = QuantSpec(4, narrow_range=True)
    lo, hi = mse(x, spec)
    curve = quantization_mse(x, spec, torch.linspace(0.2, float(x.abs().max()), 400))
    at_opt = float(quantization_mse(x, spec, [float(hi)])[0])
    assert at_opt == pytest.approx(loop_mse(x, spec, float(hi)), rel=1e-12)
    assert at_opt <= float(curve.min()) * (1 + 1e-9)                        # calib.mse is the minimum
    lo_mm, hi_mm = minmax(x.abs(), spec)
    assert float(quantization_mse(x, spec, [float(hi_mm)])[0]) == pytest.approx(loop_mse(x, spec, float(hi_mm)))


def test_quantization_mse_errors():
    x = torch.randn(10)
    with pytest.raises(ValueError, match="clip_values"):
        quantization_mse(x, QuantSpec(4), [1.0, -1.0])
    with pytest.raises(ValueError, match="clip_values"):
        quantization_mse(x, QuantSpec(4), [])
    with pytest.raises(ValueError, match="per-tensor"):
        quantization_mse(x, QuantSpec(4, axis=0), [1.0])


# --------------------------------------------------------------------------------------------
# ACIQ
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dist", ["gaussian", "laplace"])
@pytest.mark.parametrize("alpha", [0.5, 1.7, 3.0, 6.0])
def test_aciq_clipping_term_equals_numerical_integration(dist, alpha):
    ref = stats.norm() if dist == "gaussian" else stats.laplace(scale=1 / math.sqrt(2))
    clip, _ = integrate.quad(lambda x: 2 * (x - alpha) ** 2 * ref.pdf(x), alpha, np.inf, epsabs=1e-13)
    bits = 4
    got = float(aciq_mse(alpha, bits, dist)) - alpha ** 2 / (3 * 4 ** bits)
    assert got == pytest.approx(clip, rel=1e-8, abs=1e-14)


def test_aciq_optimal_clip_reproduces_the_papers_values():
    # Banner et al. 2019, §4.1: Laplace(0, b): 2.83 b, 3.89 b, 5.03 b; Gaussian: 1.71, 2.15, 2.55 sigma
    for bits, lap_b, gauss in ((2, 2.83, 1.71), (3, 3.89, 2.15), (4, 5.03, 2.55)):
        assert aciq_optimal_clip(bits, "laplace") * math.sqrt(2) == pytest.approx(lap_b, abs=0.01)
        assert aciq_optimal_clip(bits, "gaussian") == pytest.approx(gauss, abs=0.01)
    a = aciq_optimal_clip(6, "gaussian")
    grid = torch.linspace(a - 0.05, a + 0.05, 1001, dtype=torch.float64)
    assert float(grid[aciq_mse(grid, 6, "gaussian").argmin()]) == pytest.approx(a, abs=2e-4)


def test_aciq_errors():
    with pytest.raises(ValueError, match="alpha"):
        aciq_mse(0.0, 4, "gaussian")
    with pytest.raises(ValueError, match="dist"):
        aciq_optimal_clip(4, "uniform")


def test_quantization_mse_and_calib_mse_share_the_candidate_evaluation():
    """quantization_mse at a threshold is the error calib.mse's last step scores for that range:
    both go through calib.common.fake_quant_at."""
    from refimpl.calib.common import fake_quant_at
    x = standard_samples("gaussian", 2000, seed=8)
    spec = QuantSpec(4)
    t = torch.tensor([0.7, 1.3, 2.9])
    hi = t.to(torch.float32).unsqueeze(1)
    fq = fake_quant_at(x.unsqueeze(0), -hi, hi, spec)
    assert fq.shape == (3, 1, 2000)
    want = (fq[:, 0].double() - x.double()).pow(2).mean(dim=1)
    assert torch.equal(quantization_mse(x, spec, t), want)

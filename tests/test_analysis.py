"""refimpl.analysis: each measurement checked against an independent computation (a plain loop over
fake_quant, numerical integration with scipy, the ACIQ paper's published values, a hand-built
forward pass)."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch import nn

from refimpl.analysis import (aciq_mse, aciq_optimal_clip, activation_fake_quant, bn_relu_ranges, calibrate_ranges,
                              ema_minmax_trace,
                              evaluate_with_activation_ranges, quantization_mse, range_report, standard_samples)
from refimpl.calib import bn_based, ema_minmax, minmax, mse, percentile
from refimpl.models import ResNetCNN
from refimpl.quant import QuantSpec, fake_quant, qparams
from refimpl.train import evaluate


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
    monkeypatch.setattr("refimpl.analysis._CHUNK_ELEMENTS", 3000 * 5)     # several chunks
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


# --------------------------------------------------------------------------------------------
# calibrate_ranges, range_report, ema_minmax_trace
# --------------------------------------------------------------------------------------------
def test_calibrate_ranges_applies_every_method_to_every_tensor():
    tensors = {"a": standard_samples("gaussian", 500, 1), "b": standard_samples("laplace", 300, 2).clamp(min=0)}
    spec = QuantSpec(4, signed=False, symmetric=False)
    methods = {"mm": minmax, "p99": lambda x, s: percentile(x, s, 99.0)}
    got = calibrate_ranges(tensors, spec, methods)
    assert list(got) == ["mm", "p99"] and all(list(v) == ["a", "b"] for v in got.values())
    for name, x in tensors.items():
        assert all(torch.equal(u, v) for u, v in zip(got["mm"][name], minmax(x, spec)))
        assert all(torch.equal(u, v) for u, v in zip(got["p99"][name], percentile(x, spec, 99.0)))
    with pytest.raises(TypeError, match="callable"):
        calibrate_ranges(tensors, spec, {"bad": 3})


def test_range_report_against_numpy():
    x = standard_samples("laplace", 4000, seed=4).reshape(40, 100)
    spec = QuantSpec(4, narrow_range=True)                  # min-max maps max|x| to code 7 exactly
    ranges = {"minmax": minmax(x, spec), "tight": (torch.tensor(-0.8), torch.tensor(0.8))}
    rows = range_report(x, ranges, spec)
    assert [r["name"] for r in rows] == ["minmax", "tight"]
    xn = x.double().numpy()
    for r, (lo, hi) in zip(rows, ranges.values()):
        s, z = qparams(lo, hi, spec)
        s, z = float(s), int(z)
        v = np.round(xn.astype(np.float32) * np.float32(1 / s))
        clipped = (v < spec.qmin - z) | (v > spec.qmax - z)
        xh = fake_quant(x, s, z, spec).double().numpy()
        assert r["clipped_pct"] == pytest.approx(100 * clipped.mean())
        assert r["mse"] == pytest.approx(((xh - xn) ** 2).mean(), rel=1e-12)
        assert r["sqnr_db"] == pytest.approx(10 * np.log10((xn ** 2).sum() / ((xh - xn) ** 2).sum()), rel=1e-12)
        assert r["xmin"] == pytest.approx(float(lo)) and r["xmax"] == pytest.approx(float(hi))
    assert rows[0]["clipped_pct"] == 0.0 and rows[1]["clipped_pct"] > 0.0


def test_range_report_per_channel_and_errors():
    x = standard_samples("gaussian", 600, seed=5).reshape(6, 100) * torch.arange(1, 7).reshape(6, 1)
    spec = QuantSpec(4, narrow_range=True, axis=0)
    (row,) = range_report(x, {"mm": minmax(x, spec)}, spec)
    assert row["clipped_pct"] == 0.0 and row["xmax"] == pytest.approx(float(x.max()))
    with pytest.raises(ValueError, match="non-empty mapping"):
        range_report(x, {}, spec)


def test_ema_minmax_trace_is_ema_minmax_batch_by_batch():
    x = standard_samples("gaussian", 70 * 8, seed=6).reshape(70, 8)
    spec = QuantSpec(8)
    trace = ema_minmax_trace(x, spec, batch_size=16, averaging_constant=0.1)
    assert trace.shape == (5, 2) and trace.dtype == torch.float32
    state = None
    for k, i in enumerate(range(0, 70, 16)):
        state = ema_minmax(x[i:i + 16], spec, state, 0.1)
        assert torch.equal(trace[k], torch.stack(state))
    assert torch.equal(trace[0], torch.stack(minmax(x[:16], spec)))
    with pytest.raises(ValueError, match="per-tensor"):
        ema_minmax_trace(x, QuantSpec(8, axis=1), 16)


# --------------------------------------------------------------------------------------------
# Model level
# --------------------------------------------------------------------------------------------
def bn_model(seed=0):
    torch.manual_seed(seed)
    model = ResNetCNN(width=4, num_blocks=2).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.randn(m.num_features))
                m.bias.copy_(torch.randn(m.num_features))
    return model


def test_bn_relu_ranges_follow_the_batchnorms_and_add_at_residual_sums():
    model = bn_model()
    spec = QuantSpec(8)
    r = bn_relu_ranges(model, spec, alpha=4.0)
    assert list(r) == ["stem.relu", "blocks.0.relu1", "blocks.0.relu2", "blocks.1.relu1", "blocks.1.relu2"]

    def bn(m):
        return bn_based(m, None, spec, alpha=4.0)

    def relu(lo, hi):
        return lo.clamp(min=0), hi.clamp(min=0)

    assert all(torch.equal(a, b) for a, b in zip(r["stem.relu"], relu(*bn(model.stem.bn))))
    assert all(torch.equal(a, b) for a, b in zip(r["blocks.1.relu1"], relu(*bn(model.blocks[1].bn1))))
    # block 0: identity shortcut, the block's input is stem.relu's output
    lo, hi = bn(model.blocks[0].bn2)
    want = relu(lo + r["stem.relu"][0], hi + r["stem.relu"][1])
    assert all(torch.equal(a, b) for a, b in zip(r["blocks.0.relu2"], want))
    # block 1: projection shortcut with its own BatchNorm
    lo, hi = bn(model.blocks[1].bn2)
    s_lo, s_hi = bn(model.blocks[1].shortcut.bn)
    want = relu(lo + s_lo, hi + s_hi)
    assert all(torch.equal(a, b) for a, b in zip(r["blocks.1.relu2"], want))
    assert all(float(lo) >= 0 for lo, _ in r.values())
    per_channel = bn_relu_ranges(model, QuantSpec(8, axis=1), alpha=4.0)
    assert per_channel["blocks.1.relu2"][1].shape == (8,)
    assert float(per_channel["blocks.1.relu2"][1].max()) <= float(r["blocks.1.relu2"][1]) + 1e-6
    with pytest.raises(TypeError, match="ResNetCNN"):
        bn_relu_ranges(nn.Linear(2, 2), spec)


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.fc1, self.relu, self.fc2 = nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


def test_activation_fake_quant_equals_a_hand_built_forward():
    model = TwoLayer().eval()
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(2))
    relu_spec, out_spec = QuantSpec(3, signed=False, symmetric=False), QuantSpec(4)
    ranges = {"relu": (torch.tensor(0.0), torch.tensor(0.7)), "fc2": (torch.tensor(-0.5), torch.tensor(0.5))}
    with torch.no_grad():
        ref_before = model(x)
        with activation_fake_quant(model, ranges, {"relu": relu_spec, "fc2": out_spec}) as m:
            got = m(x)
        s1, z1 = qparams(*ranges["relu"], relu_spec)
        s2, z2 = qparams(*ranges["fc2"], out_spec)
        h = fake_quant(torch.relu(model.fc1(x)), s1, z1, relu_spec)
        want = fake_quant(model.fc2(h), s2, z2, out_spec)
        assert torch.equal(got, want)
        assert torch.equal(model(x), ref_before)                             # hooks removed
        assert not model.relu._forward_hooks and not model.fc2._forward_hooks


def test_activation_fake_quant_removes_hooks_on_error_and_validates():
    model = TwoLayer()
    with pytest.raises(RuntimeError, match="boom"):
        with activation_fake_quant(model, {"relu": (torch.tensor(0.0), torch.tensor(1.0))}, QuantSpec(8)):
            raise RuntimeError("boom")
    assert not model.relu._forward_hooks
    with pytest.raises(ValueError, match="not found"):
        with activation_fake_quant(model, {"conv": (torch.tensor(0.0), torch.tensor(1.0))}, QuantSpec(8)):
            pass
    with pytest.raises(TypeError, match="no QuantSpec"):
        with activation_fake_quant(model, {"relu": (torch.tensor(0.0), torch.tensor(1.0))}, {"fc2": QuantSpec(8)}):
            pass


def test_evaluate_with_activation_ranges():
    model = TwoLayer().eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 6, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)                                             # the model is 100 % right
    spec = QuantSpec(16, signed=False, symmetric=False)
    acts = torch.relu(model.fc1(x)).detach()
    fine = evaluate_with_activation_ranges(model, {"relu": minmax(acts, spec)}, spec, x, y)
    assert fine == pytest.approx(100.0, abs=1.0)
    spec2 = QuantSpec(1, signed=False, symmetric=False)
    coarse_range = {"relu": (torch.tensor(0.0), torch.tensor(1e-3))}
    coarse = evaluate_with_activation_ranges(model, coarse_range, spec2, x, y)
    with torch.no_grad(), activation_fake_quant(model, coarse_range, spec2):
        want = 100.0 * float((model(x).argmax(1) == y).double().mean())
    assert coarse == pytest.approx(want) and coarse < fine
    assert evaluate(model, x, y) == 100.0                                   # hooks gone

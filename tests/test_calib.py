"""refimpl.calib: range setting checked against PyTorch's observers, numpy, onnxruntime and
brute-force searches."""

import contextlib
import io
import math
import time

import numpy as np
import pytest
import torch
from torch.ao.quantization import (MinMaxObserver, MovingAverageMinMaxObserver,
                                   MovingAveragePerChannelMinMaxObserver, PerChannelMinMaxObserver)

from torch import nn

from refimpl.calib import (batchnorm_beta_gamma, bn_based, bn_relu_ranges, cross_entropy, ema_minmax,
                           entropy_onnxruntime, kl_onnxruntime, kl_tensorrt, minmax, mse, percentile)
from refimpl.calib.entropy import onnxruntime_divergences, tensorrt_divergences
from refimpl.calib.scale_search import polish
from refimpl.models import ResNetCNN
from refimpl.quant import QuantSpec, fake_quant, qparams

ort_calibrate = pytest.importorskip("onnxruntime.quantization.calibrate")

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DISTS = ("gauss", "laplace", "bimodal")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def sample(kind, shape, seed, dtype=torch.float64):
    g = gen(seed)
    if kind == "gauss":
        x = torch.randn(shape, generator=g, dtype=torch.float64)
    elif kind == "laplace":
        u = torch.rand(shape, generator=g, dtype=torch.float64) - 0.5
        x = -torch.sign(u) * torch.log1p(-2 * u.abs())
    elif kind == "bimodal":
        side = torch.where(torch.rand(shape, generator=g) < 0.5, -2.0, 2.0).double()
        x = side + 0.4 * torch.randn(shape, generator=g, dtype=torch.float64)
    else:
        raise ValueError(kind)
    return x.to(dtype)


def rows_of(x, spec):
    return x.reshape(1, -1) if spec.axis is None else x.movedim(spec.axis, 0).reshape(x.shape[spec.axis], -1)


def quant_error(x, spec, lo, hi):
    """||x - fake_quant(x)||^2 per row for the range (lo, hi), through refimpl's quantizer."""
    X = rows_of(x, spec).double()
    rs = spec.per_channel(0)
    s, z = qparams(lo.reshape(-1), hi.reshape(-1), rs)
    return ((fake_quant(X, s, z, rs) - X) ** 2).sum(1)


# --------------------------------------------------------------------------------------------
# min-max and its running average, against torch's observers
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [None, 0, 1, -1])
def test_minmax_equals_torch_observer(dtype, axis):
    x = (sample("laplace", (6, 5, 7), 0) * 3 + 1).to(dtype)
    spec = QuantSpec(8, axis=axis)
    lo, hi = minmax(x, spec)
    obs = MinMaxObserver() if axis is None else PerChannelMinMaxObserver(ch_axis=axis)
    obs(x.float())
    assert lo.dtype == hi.dtype == torch.float32
    assert lo.shape == (() if axis is None else (x.shape[axis],))
    assert torch.equal(lo, obs.min_val) and torch.equal(hi, obs.max_val)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [None, 1])
def test_ema_minmax_equals_moving_average_observers(dtype, axis):
    c = 0.05
    spec = QuantSpec(8, symmetric=False, signed=False, axis=axis)
    obs = (MovingAverageMinMaxObserver(averaging_constant=c) if axis is None
           else MovingAveragePerChannelMinMaxObserver(averaging_constant=c, ch_axis=axis))
    state = None
    for t in range(12):
        x = (sample("gauss", (8, 4, 5), 100 + t) * (1 + t / 4) + t / 3).to(dtype)
        obs(x)
        state = ema_minmax(x, spec, state, averaging_constant=c)
        assert torch.equal(state[0], obs.min_val) and torch.equal(state[1], obs.max_val), t
    assert state[0].dtype == torch.float32
    # the average lags: it is not simply the last batch's min/max
    assert not torch.equal(state[1], minmax(x, spec)[1])


# --------------------------------------------------------------------------------------------
# percentile, against numpy
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("q", [99.99, 99.9, 97.3, 50.0, 100.0])
@pytest.mark.parametrize("axis", [None, 0])
def test_percentile_equals_numpy_linear(q, axis):
    x = sample("laplace", (5, 3001), 3)
    for symmetric in (True, False):
        spec = QuantSpec(8, symmetric=symmetric, axis=axis)
        lo, hi = percentile(x, spec, q)
        rows = rows_of(x, spec).numpy()
        if symmetric:
            t = np.percentile(np.abs(rows), q, axis=1, method="linear")
            want_lo, want_hi = -t, t
        else:
            want_lo = np.percentile(rows, 100 - q, axis=1, method="linear")
            want_hi = np.percentile(rows, q, axis=1, method="linear")
        want_lo = torch.tensor(want_lo, dtype=torch.float64).to(torch.float32).reshape(lo.shape)
        want_hi = torch.tensor(want_hi, dtype=torch.float64).to(torch.float32).reshape(hi.shape)
        assert torch.equal(lo, want_lo) and torch.equal(hi, want_hi)


def test_percentile_beyond_torch_quantile_size_limit():
    n = (1 << 24) + 1001                  # torch.quantile refuses more than 2^24 elements
    x = torch.randn(n, generator=gen(4))
    lo, hi = percentile(x, QuantSpec(8), 99.99)
    want = np.percentile(np.abs(x.numpy()).astype(np.float64), 99.99, method="linear")
    assert float(hi) == np.float32(want) and float(lo) == -float(hi)


# --------------------------------------------------------------------------------------------
# MSE: the search reaches the optimum (against a dense brute-force search)
# --------------------------------------------------------------------------------------------
def brute_force_error(X, spec, lows, highs):
    """Smallest squared error per row of X (C, n) over candidate ranges lows/highs (C, K):
    scale and zero point from qparams, x_hat = s (clamp(round(x / s) + z) - z), in float64."""
    best = torch.full((X.shape[0],), math.inf, dtype=torch.float64)
    rs = spec.per_channel(0)
    for lo, hi in zip(lows.split(2000, 1), highs.split(2000, 1)):
        s, z = qparams(lo.reshape(-1).float(), hi.reshape(-1).float(), rs)
        s = s.double().reshape(lo.shape).unsqueeze(2)
        z = z.double().reshape(lo.shape).unsqueeze(2)
        q = torch.clamp(torch.round(X.unsqueeze(1) / s) + z, spec.qmin, spec.qmax)
        err = ((X.unsqueeze(1) - s * (q - z)) ** 2).sum(2)
        best = torch.minimum(best, err.min(1).values)
    return best


def mse_cases(bits, symmetric):
    """Gaussian, Laplacian and bimodal data: each alone (per tensor) and as the three channels
    of one tensor (per channel); off-centre for an asymmetric grid."""
    X = torch.stack([sample(kind, (512,), seed=10 * bits + i) for i, kind in enumerate(DISTS)])
    X = X if symmetric else X + 0.7
    cases = [(X[i], QuantSpec(bits, symmetric=symmetric)) for i in range(len(DISTS))]
    return cases + [(X, QuantSpec(bits, symmetric=symmetric, axis=0))]


def candidate_ranges(X, symmetric):
    """Brute force: 20 000 thresholds t in (0, max|x|] for [-t, t]; or 150 x 150 ranges
    [a * min x, b * max x] for a, b in (0, 1]."""
    if symmetric:
        t = X.abs().amax(1, keepdim=True) * torch.arange(1, 20001, dtype=torch.float64) / 20000
        return -t, t
    f = torch.arange(1, 151, dtype=torch.float64) / 150
    lows = (X.amin(1, keepdim=True).clamp(max=0) * f).repeat_interleave(150, 1)
    highs = (X.amax(1, keepdim=True).clamp(min=0) * f).repeat(1, 150)
    return lows, highs


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_mse_reaches_brute_force_optimum(bits, symmetric):
    for x, spec in mse_cases(bits, symmetric):
        lo, hi = mse(x, spec)
        X = rows_of(x, spec)
        best = brute_force_error(X, spec, *candidate_ranges(X, symmetric))
        got = quant_error(x, spec, lo, hi)
        assert bool((got <= best * (1 + 1e-6)).all()), (spec, got / best)
        assert not symmetric or torch.equal(lo, -hi)


def test_mse_large_tensor_uses_region_search_and_still_beats_dense_scan():
    # 40k values at 8 bits: too many pieces for the whole-range sweep, so the grid narrows first
    x = sample("laplace", (40_000,), 11)
    assert 40_000 * 128 > 1 << 21                        # more pieces than the whole-range sweep takes
    spec = QuantSpec(8)
    lo, hi = mse(x, spec)
    t = float(hi) * torch.linspace(0.9, 1.1, 401, dtype=torch.float64).unsqueeze(0)
    best = brute_force_error(x.reshape(1, -1), spec, -t, t)
    assert float(quant_error(x, spec, lo, hi)[0]) <= float(best[0]) * (1 + 1e-6)


def test_mse_finds_the_grid_of_already_quantized_data():
    spec = QuantSpec(4, symmetric=False)
    codes = torch.randint(spec.qmin, spec.qmax + 1, (300,), generator=gen(5))
    x = (codes.double() - 3) * 0.25                                           # on a 4-bit grid
    lo, hi = mse(x, spec)
    assert float(quant_error(x, spec, lo, hi)[0]) < 1e-12


# --------------------------------------------------------------------------------------------
# Cross-entropy: the search reaches the optimum
# --------------------------------------------------------------------------------------------
def logits_sample(seed, shape=(64, 10)):
    g = gen(seed)
    z = 3 * torch.randn(shape, generator=g, dtype=torch.float64)
    # classifier-like: one confident class per row
    idx = torch.randint(0, shape[-1], shape[:-1], generator=g)
    return z + 5 * torch.nn.functional.one_hot(idx, shape[-1]).double()


def ce_brute_force(Z, spec, lows, highs):
    """Smallest mean cross-entropy per row group of Z (C, R, K) over ranges lows/highs (C, M)."""
    P = torch.softmax(Z, -1)
    best = torch.full((Z.shape[0],), math.inf, dtype=torch.float64)
    rs = spec.per_channel(0)
    for lo, hi in zip(lows.split(500, 1), highs.split(500, 1)):
        s, z = qparams(lo.reshape(-1).float(), hi.reshape(-1).float(), rs)
        s = s.double().reshape(lo.shape)[..., None, None]
        z = z.double().reshape(lo.shape)[..., None, None]
        q = torch.clamp(torch.round(Z.unsqueeze(1) / s) + z, spec.qmin, spec.qmax)
        ce = -(P.unsqueeze(1) * torch.log_softmax(s * (q - z), -1)).sum(-1).mean(-1)
        best = torch.minimum(best, ce.min(1).values)
    return best


def ce_of(Z, spec, lo, hi):
    rs = spec.per_channel(0)
    s, z = qparams(lo.reshape(-1), hi.reshape(-1), rs)
    P = torch.softmax(Z, -1)
    return -(P * torch.log_softmax(fake_quant(Z, s, z, rs), -1)).sum(-1).mean(-1)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_cross_entropy_reaches_brute_force_optimum(bits):
    Z = logits_sample(bits).unsqueeze(0)
    spec = QuantSpec(bits)
    lo, hi = cross_entropy(Z[0], spec)
    t = Z.abs().amax() * torch.arange(1, 20001, dtype=torch.float64).unsqueeze(0) / 20000
    best = ce_brute_force(Z, spec, -t, t)
    got = ce_of(Z, spec, lo, hi)
    assert float(got[0]) <= float(best[0]) * (1 + 1e-6)
    # the optimum is a real choice: it beats min-max
    mlo, mhi = minmax(Z[0], spec)
    assert float(got[0]) < float(ce_of(Z, spec, mlo, mhi)[0])


def test_cross_entropy_asymmetric_and_per_slice():
    Z = logits_sample(21, (3, 40, 8))
    spec = QuantSpec(3, symmetric=False, axis=0)
    lo, hi = cross_entropy(Z, spec, class_axis=2)
    f = torch.arange(1, 121, dtype=torch.float64) / 120
    flat = Z.reshape(3, -1)
    lows = (flat.amin(1, keepdim=True).clamp(max=0) * f).repeat_interleave(120, 1)
    highs = (flat.amax(1, keepdim=True).clamp(min=0) * f).repeat(1, 120)
    best = ce_brute_force(Z, spec, lows, highs)
    assert bool((ce_of(Z, spec, lo, hi) <= best * (1 + 1e-6)).all())
    # class axis first, slices along the last axis: the same problems
    lo2, hi2 = cross_entropy(Z.permute(2, 1, 0), QuantSpec(3, symmetric=False, axis=2), class_axis=0)
    assert torch.equal(lo, lo2) and torch.equal(hi, hi2)


# --------------------------------------------------------------------------------------------
# KL / entropy calibration
# --------------------------------------------------------------------------------------------
def ort_collector(num_bins, nqb):
    return ort_calibrate.HistogramCollector("entropy", False, num_bins, nqb, 99.99, "same")


def ort_threshold(hist, edges, nqb):
    """onnxruntime's get_entropy_threshold; min/max set wide so that its final clip is a no-op."""
    big = np.array(np.finfo(edges.dtype).max, dtype=edges.dtype)
    return ort_collector(hist.size, nqb).get_entropy_threshold((hist, edges, -big, big, edges[-1]), nqb)


def ort_histogram(x, num_bins):
    """onnxruntime's own histogram of x (HistogramCollector.collect, method "entropy")."""
    collector = ort_collector(num_bins, 2)
    with contextlib.redirect_stdout(io.StringIO()):
        collector.collect({"t": x})
    hist, edges = collector.get_histogram_dict()["t"][:2]
    return hist, edges


def assert_same_or_float32_tie(hist, edges, nqb, got, want):
    """Equal thresholds, or onnxruntime's window has (in exact arithmetic) a KL divergence within
    its float32 rounding of the smallest: then rounding, not the definition, decided."""
    if got == want:
        return False
    start, stop, div = onnxruntime_divergences(hist.astype(np.int64), nqb)
    theirs = int(np.flatnonzero(edges[start] == want[0])[0])
    assert div[theirs] - div.min() < 2e-6 * max(1.0, abs(div.min())), (got, want, div[theirs], div.min())
    return True


def random_data(kind, n, rng):
    if kind == "gauss":
        return rng.normal(size=n)
    if kind == "laplace":
        return rng.laplace(size=n)
    if kind == "heavy":                                      # Student t, 2 degrees of freedom
        return rng.standard_t(2, size=n)
    if kind == "relu":                                       # many exact zeros
        return np.maximum(rng.normal(0.3, 1, size=n), 0)
    if kind == "bimodal":
        return np.concatenate([rng.normal(-1, 0.3, n // 2), rng.normal(2, 0.5, n - n // 2)])
    raise ValueError(kind)


KINDS = ["gauss", "laplace", "heavy", "relu", "bimodal"]


@pytest.mark.parametrize("kind", KINDS)
def test_entropy_onnxruntime_equals_onnxruntime(kind):
    """onnxruntime's own histograms (and copies with runs of empty bins): the same threshold.
    About 1 in 300 such histograms has two windows whose KL divergences differ by less than
    onnxruntime's float32 rounding (~1e-7); there its choice is rounding, which is checked."""
    rng = np.random.default_rng(KINDS.index(kind))
    ties = 0
    for trial in range(6):
        num_bins = int(rng.choice([128, 256, 400]))
        nqb = int(rng.choice([16, 32, 64]))
        x = random_data(kind, int(rng.choice([2000, 50_000])), rng).astype(np.float32)
        hist, edges = ort_histogram(x, num_bins)
        if trial % 2:
            hist = hist.copy()
            hist[rng.random(hist.size) < 0.3] = 0             # runs of empty bins
            if hist.sum() == 0:
                continue
        want = ort_threshold(hist, edges, nqb)
        got = entropy_onnxruntime(hist, edges, nqb)
        assert got[0].dtype == got[1].dtype == edges.dtype
        ties += assert_same_or_float32_tie(hist, edges, nqb, got, want)
    assert ties <= 1


def test_entropy_onnxruntime_small_histograms_agree_up_to_float32_ties():
    """Tiny histograms with any nqb: equal, except where two windows' KL divergences differ by
    less than onnxruntime's float32 rounding, so that its choice is decided by rounding."""
    rng = np.random.default_rng(7)
    ties = 0
    for trial in range(200):
        num_bins = int(rng.integers(4, 48))
        nqb = int(rng.integers(2, num_bins + 1))
        kind = ["gauss", "laplace", "heavy", "relu", "bimodal"][trial % 5]
        x = random_data(kind, int(rng.choice([5, 40, 400])), rng).astype(np.float32)
        t = np.float32(np.abs(x).max())
        hist, edges = np.histogram(x, num_bins, range=(-t, t))
        if trial % 3 == 0:
            hist[rng.random(num_bins) < 0.4] = 0
        if hist.sum() == 0:
            continue
        want = ort_threshold(hist, edges, nqb)
        got = entropy_onnxruntime(hist, edges, nqb)
        ties += assert_same_or_float32_tie(hist, edges, nqb, got, want)
    assert ties <= 10


def test_entropy_onnxruntime_float16_histogram_equals_onnxruntime():
    x = np.random.default_rng(3).normal(size=20_000).astype(np.float16)
    t = np.abs(x).max()
    hist, edges = np.histogram(x, 256, range=(-t, t))
    assert edges.dtype == np.float16
    got = entropy_onnxruntime(hist, edges, 32)
    assert got == ort_threshold(hist, edges, 32) and got[1].dtype == np.float16


def test_entropy_onnxruntime_is_50x_faster_than_onnxruntime():
    x = np.random.default_rng(0).laplace(size=1_000_000).astype(np.float32)
    hist, edges = ort_histogram(x, 2048)
    mine = []
    for _ in range(5):
        t0 = time.perf_counter()
        got = entropy_onnxruntime(hist, edges)
        mine.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    want = ort_threshold(hist, edges, 128)
    theirs = time.perf_counter() - t0
    assert got == want
    assert theirs / min(mine) >= 50, (theirs, min(mine))


def tensorrt_reference(hist, nqb):
    """Migacz's entropy calibration, one candidate at a time (the definition of calib.kl_tensorrt)."""
    divs = []
    for i in range(nqb, hist.size + 1):
        p = hist[:i].astype(np.float64)
        p[-1] += hist[i:].sum()
        group = (np.arange(i) * nqb) // i
        q = np.zeros(i)
        for g in range(nqb):
            members = group == g
            nonzero = members & (p > 0)
            if nonzero.any():
                q[nonzero] = hist[:i][members].sum() / nonzero.sum()
        p, q = p / p.sum(), q / q.sum() if q.sum() > 0 else q
        if np.any((p > 0) & (q == 0)):
            divs.append(np.inf)
        else:
            m = p > 0
            divs.append(float(np.sum(p[m] * np.log(p[m] / q[m]))))
    return np.array(divs)


@pytest.mark.parametrize("kind", ["gauss", "laplace", "heavy", "relu"])
def test_kl_tensorrt_equals_tensorrt_definition(kind):
    rng = np.random.default_rng(5)
    x = torch.tensor(random_data(kind, 20_000, rng))
    spec = QuantSpec(5)                                       # 16 levels on [0, t]
    lo, hi = kl_tensorrt(x, spec, num_bins=200)
    hist = np.histogram(np.abs(x.numpy()), 200, range=(0, float(x.abs().max())))[0]
    divs = tensorrt_reference(hist, 16)
    vectorised = tensorrt_divergences(torch.tensor(hist, dtype=torch.float64)[None], 16)[0].numpy()
    np.testing.assert_allclose(vectorised, divs, rtol=1e-9, atol=1e-12)
    want = float(x.abs().max()) * (int(np.argmin(divs)) + 16) / 200
    assert float(hi) == pytest.approx(want, rel=1e-6) and torch.equal(lo, -hi)


def test_kl_tensorrt_default_int8_threshold_is_a_clip():
    x = torch.tensor(np.random.default_rng(2).laplace(size=500_000))
    lo, hi = kl_tensorrt(x, QuantSpec(8))
    # Laplacian: the divergence-optimal threshold clips a little, well inside the data's range
    assert 0.3 * float(x.abs().max()) < float(hi) < float(x.abs().max())


@pytest.mark.parametrize("num_bins,nqb,seed", [(512, 128, 9), (300, None, 9), (1000, 64, 4)])
def test_kl_onnxruntime_equals_onnxruntime_entropy_calibration(num_bins, nqb, seed):
    x = np.random.default_rng(seed).laplace(size=30_000).astype(np.float32) * 2 + 0.5
    spec = QuantSpec(7, symmetric=False)                      # 128 levels by default
    lo, hi = kl_onnxruntime(torch.tensor(x), spec, num_bins=num_bins, num_quantized_bins=nqb)
    collector = ort_collector(num_bins, nqb or 128)
    with contextlib.redirect_stdout(io.StringIO()):
        collector.collect({"t": x})
        want = collector.compute_collection_result()["t"]
    if (float(lo), float(hi)) != (float(want[0]), float(want[1])):
        # (300, None): two windows' KL divergences differ by 4e-7 relative, below float32's
        # resolution of onnxruntime's sums; check that it is such a tie
        hist, edges = collector.get_histogram_dict()["t"][:2]
        got = entropy_onnxruntime(hist, edges, nqb or 128)
        assert assert_same_or_float32_tie(hist, edges, nqb or 128, got,
                                          ort_threshold(hist, edges, nqb or 128))
        assert float(hi) == min(float(got[1]), float(x.max()))


def test_kl_per_channel_is_per_row_kl():
    x = sample("laplace", (3, 4000), 8)
    for kl, spec in ((kl_tensorrt, QuantSpec(8)), (kl_onnxruntime, QuantSpec(8, symmetric=False))):
        lo, hi = kl(x, spec.per_channel(0), num_bins=512)
        for c in range(3):
            l_c, h_c = kl(x[c], spec, num_bins=512)
            assert lo[c] == l_c and hi[c] == h_c


# --------------------------------------------------------------------------------------------
# BN-based
# --------------------------------------------------------------------------------------------
def test_bn_based_ranges():
    gamma = torch.tensor([0.5, -2.0, 1.0])
    beta = torch.tensor([0.1, 0.3, -4.0])
    lo, hi = bn_based(beta, gamma, QuantSpec(8))
    assert float(lo) == pytest.approx(min(0.1 - 3, 0.3 - 12, -4.0 - 6))
    assert float(hi) == pytest.approx(0.3 + 12)
    lo, hi = bn_based(beta, gamma, QuantSpec(8, axis=1), alpha=3.0)
    torch.testing.assert_close(lo, beta - 3 * gamma.abs())
    torch.testing.assert_close(hi, beta + 3 * gamma.abs())
    assert all(torch.equal(u, v) for u, v in zip(bn_based(gamma=gamma, beta=beta, spec=QuantSpec(8)),
                                                  bn_based(beta, gamma, QuantSpec(8))))
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(gamma)
        bn.bias.copy_(beta)
    per_channel = QuantSpec(8, axis=1)
    from_module = bn_based(*batchnorm_beta_gamma(bn), per_channel)
    assert from_module[1].tolist() == bn_based(beta, gamma, per_channel)[1].tolist()
    plain = torch.nn.BatchNorm1d(4, affine=False)
    lo, hi = bn_based(*batchnorm_beta_gamma(plain), QuantSpec(8))
    assert float(lo) == -6.0 and float(hi) == 6.0


@pytest.mark.parametrize("old,new", [("bn_weight", "gamma"), ("bn_bias", "beta")])
def test_bn_based_old_keywords_name_the_new_ones(old, new):
    with pytest.raises(TypeError, match=f"'{old}' is now spelled '{new}'"):
        bn_based(torch.ones(3), spec=QuantSpec(8), **{old: torch.ones(3)})


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
        return bn_based(*batchnorm_beta_gamma(m), spec, alpha=4.0)

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


# --------------------------------------------------------------------------------------------
# dtypes, degenerate input, bad input
# --------------------------------------------------------------------------------------------
ALL = {
    "minmax": lambda x, s: minmax(x, s),
    "ema": lambda x, s: ema_minmax(x, s),
    "percentile": lambda x, s: percentile(x, s, 99.0),
    "mse": lambda x, s: mse(x, s),
    "cross_entropy": lambda x, s: cross_entropy(x, s),
    "kl": lambda x, s: (kl_tensorrt if s.symmetric else kl_onnxruntime)(x, s, num_bins=256),
}


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_give_float32_ranges(name, dtype):
    x = sample("gauss", (4, 24), 12).to(dtype)
    for spec in (QuantSpec(4), QuantSpec(4, symmetric=False, axis=0)):
        lo, hi = ALL[name](x, spec)
        assert lo.dtype == hi.dtype == torch.float32 and lo.device == x.device
        assert lo.shape == (() if spec.axis is None else (4,))
        assert bool(torch.isfinite(lo).all() & torch.isfinite(hi).all() & (lo <= hi).all())


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("value", [0.0, 1.5, -3.0])
def test_constant_input_gives_a_valid_range(name, value):
    x = torch.full((3, 40), value)
    specs = (QuantSpec(8), QuantSpec(4, symmetric=False, axis=0), QuantSpec(8, signed=False, symmetric=False))
    for spec in specs:
        lo, hi = ALL[name](x, spec)
        assert bool(torch.isfinite(lo).all() & torch.isfinite(hi).all() & (lo <= hi).all())
        s, z = qparams(lo, hi, spec)                   # valid for qparams (scale > 0, zero point on the grid)
        err = (fake_quant(x, s, z, spec) - x).abs().max()
        if name == "mse":
            assert float(err) <= 1e-6 * abs(value)     # a constant is exactly representable
        elif name != "cross_entropy":                  # (a constant softmax does not depend on the range)
            assert float(err) <= float(s.max()) + 1e-7  # the range covers the constant


BAD = [
    (lambda: minmax(torch.tensor([1.0, math.nan]), QuantSpec()), ValueError, "NaN"),
    (lambda: mse(torch.tensor([1.0, math.inf]), QuantSpec()), ValueError, "NaN or Inf"),
    (lambda: percentile(torch.empty(0), QuantSpec()), ValueError, "empty"),
    (lambda: minmax([1.0, 2.0], QuantSpec()), TypeError, "torch.Tensor"),
    (lambda: minmax(torch.arange(3), QuantSpec()), TypeError, "floating dtype"),
    (lambda: minmax(torch.ones(3), "int8"), TypeError, "QuantSpec"),
    (lambda: minmax(torch.ones(2, 3), QuantSpec(axis=2)), ValueError, "spec.axis=2"),
    (lambda: percentile(torch.ones(3), QuantSpec(), 0.0), ValueError, "q must be > 0"),
    (lambda: percentile(torch.ones(3), QuantSpec(), 100.5), ValueError, "q must be <= 100"),
    (lambda: percentile(torch.ones(3), QuantSpec(), math.nan), ValueError, "q must be finite"),
    (lambda: percentile(torch.ones(3), QuantSpec(symmetric=False), 40.0), ValueError, "q must be >= 50"),
    (lambda: percentile(torch.ones(3), QuantSpec(), "99"), TypeError, "q must be a real number"),
    (lambda: ema_minmax(torch.ones(3), QuantSpec(), None, 0.0), ValueError, "averaging_constant"),
    (lambda: ema_minmax(torch.ones(3), QuantSpec(), (torch.zeros(2), torch.ones(2))), ValueError, "state[0]"),
    (lambda: ema_minmax(torch.ones(3), QuantSpec(), torch.zeros(2)), TypeError, "state must be"),
    (lambda: ema_minmax(torch.ones(3), QuantSpec(), (torch.tensor(math.nan), torch.tensor(1.0))), ValueError, "NaN"),
    (lambda: kl_tensorrt(torch.ones(30), QuantSpec(), num_bins=1), ValueError, "num_bins"),
    (lambda: kl_tensorrt(torch.ones(30), QuantSpec(), num_bins=64, num_quantized_bins=65), ValueError,
     "num_quantized_bins"),
    (lambda: kl_tensorrt(torch.ones(30), QuantSpec(), num_bins=64.0), TypeError, "num_bins"),
    (lambda: kl_tensorrt(torch.ones(30), QuantSpec(), num_bins=64), ValueError, "num_bins must be >= 128"),
    (lambda: kl_onnxruntime(torch.ones(30), QuantSpec(symmetric=False), num_bins=64), ValueError,
     "num_bins must be >= 256"),
    (lambda: kl_tensorrt(torch.ones(30), QuantSpec(symmetric=False)), ValueError, "kl_tensorrt needs a symmetric spec"),
    (lambda: kl_onnxruntime(torch.ones(30), QuantSpec()), ValueError, "kl_onnxruntime needs an asymmetric spec"),
    (lambda: cross_entropy(torch.ones(4, 3), QuantSpec(axis=1), class_axis=-1), ValueError, "class_axis"),
    (lambda: cross_entropy(torch.ones(4, 3), QuantSpec(), class_axis=2), ValueError, "class_axis=2"),
    (lambda: bn_based(torch.ones(3), torch.ones(4), QuantSpec()), ValueError, "same length"),
    (lambda: bn_based(torch.ones(3), torch.ones(3), QuantSpec(), alpha=-1.0), ValueError, "alpha"),
    (lambda: bn_based(torch.nn.BatchNorm1d(3), None, QuantSpec()), TypeError, "batchnorm_beta_gamma(bn)"),
    (lambda: bn_based(torch.ones(2), torch.tensor([1.0, math.inf]), QuantSpec()), ValueError, "gamma"),
    (lambda: batchnorm_beta_gamma(torch.nn.Linear(2, 2)), TypeError, "BatchNorm module"),
]
HIST = np.array([1, 0, 5, 9, 4, 0, 2, 1])
EDGES = np.linspace(-1, 1, 9).astype(np.float32)
BAD += [
    (lambda: entropy_onnxruntime(HIST, EDGES[:-1]), ValueError, "len(hist) + 1"),
    (lambda: entropy_onnxruntime(np.where(HIST == 9, np.nan, HIST), EDGES), ValueError, "finite"),
    (lambda: entropy_onnxruntime(HIST - 2, EDGES, 4), ValueError, "non-negative"),
    (lambda: entropy_onnxruntime(HIST + 0.5, EDGES, 4), ValueError, "integer counts"),
    (lambda: entropy_onnxruntime(np.zeros(8, int), EDGES, 4), ValueError, "no counts"),
    (lambda: entropy_onnxruntime(HIST, EDGES, 9), ValueError, "num_quantized_bins"),
    (lambda: entropy_onnxruntime(HIST, EDGES, 1), ValueError, "num_quantized_bins"),
    (lambda: entropy_onnxruntime(HIST, EDGES[::-1].copy(), 4), ValueError, "increasing"),
    (lambda: entropy_onnxruntime(HIST.reshape(2, 4), EDGES, 4), ValueError, "1-d"),
    (lambda: entropy_onnxruntime(list(HIST), EDGES, 4), TypeError, "numpy arrays"),
]


@pytest.mark.parametrize("call,exc,match", BAD, ids=[b[2] for b in BAD])
def test_bad_input_raises_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
                       .replace("+", r"\+")):
        call()


@pytest.mark.parametrize("symmetric", [True, False])
def test_kl_ignore_zeros_on_post_relu_data(symmetric):
    """Half zeros, as after a ReLU: the plain search collapses towards 0; dropping the zeros is
    exactly calibrating the non-zero values, and keeps most of the range."""
    g = torch.Generator().manual_seed(7)
    x = torch.relu(torch.randn(40_000, generator=g))
    spec = QuantSpec(8, signed=not symmetric, symmetric=symmetric)
    kl = kl_tensorrt if symmetric else kl_onnxruntime
    lo_z, hi_z = kl(x, spec, ignore_zeros=True)
    lo_n, hi_n = kl(x[x != 0], spec)
    assert torch.equal(hi_z, hi_n) and torch.equal(lo_z, lo_n)
    peak = float(x.max())
    assert float(hi_z) > 0.5 * peak
    if symmetric:                                           # the zero spike pulls the plain search down
        assert float(kl(x, spec)[1]) < 0.75 * float(hi_z)
    zeros = torch.zeros(100)
    assert float(kl(zeros, spec, ignore_zeros=True)[1]) == 0.0
    with pytest.raises(TypeError, match="ignore_zeros"):
        kl(x, spec, ignore_zeros=1)


def test_mse_polish_batched_equals_the_candidate_loop():
    """calib.mse scores its 33 float32 candidate ranges in one batched call: the same ranges as
    scoring them one at a time (the unbatched path of scale_search.polish), on per-tensor and
    per-channel, symmetric and asymmetric grids, around the scale and zero point mse chose."""
    gen = torch.Generator().manual_seed(0)
    for spec, x in ((QuantSpec(4, signed=True, symmetric=True, axis=0), torch.randn(5, 300, generator=gen)),
                    (QuantSpec(3, signed=False, symmetric=False), torch.randn(2000, generator=gen).clamp(min=0)),
                    (QuantSpec(8, signed=True, symmetric=False, axis=0), torch.randn(3, 50, generator=gen) ** 3)):
        X = rows_of(x, spec).to(torch.float64)
        rspec = spec.per_channel(0)
        s, zp = qparams(*(r.reshape(-1) for r in mse(x, spec)), rspec)
        s, zp = s.to(torch.float64), zp.to(torch.int64)

        def one(lo, hi):
            scale, z = qparams(lo, hi, rspec)
            return ((fake_quant(X, scale, z, rspec) - X) ** 2).sum(dim=1)

        def batched(lo, hi):
            return torch.stack([one(lo[k], hi[k]) for k in range(lo.shape[0])])

        for elements in (X.numel(), (1 << 22) // 5):      # all candidates at once; chunks of 5
            a, b = polish(s, zp, spec, one), polish(s, zp, spec, batched, batch_elements=elements)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

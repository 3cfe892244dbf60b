"""refimpl.calib.compare: named range methods, every method on every tensor, the error report of a
range checked against NumPy, and the running range against ema_minmax batch by batch."""

import numpy as np
import pytest
import torch

from refimpl.calib import (RANGE_METHODS, calibrate_ranges, ema_minmax, ema_minmax_trace, kl_onnxruntime, minmax, mse,
                           percentile, range_method_fn, range_report, standard_samples)
from refimpl.quant import QuantSpec, fake_quant, qparams


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
    with pytest.raises(TypeError, match=r"range_method\['bad'\] must be a name"):
        calibrate_ranges(tensors, spec, {"bad": 3})
    with pytest.raises(ValueError, match=r"range_method\['bad'\] must be one of"):
        calibrate_ranges(tensors, spec, {"bad": "max"})


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


def test_calibrate_ranges_takes_names_and_a_single_method():
    tensors = {"a": standard_samples("gaussian", 400, 3).clamp(min=0)}
    spec = QuantSpec(4, signed=False, symmetric=False)
    by_name = calibrate_ranges(tensors, spec, {"MSE": "mse", "KL": "kl_onnxruntime"})
    assert all(torch.equal(u, v) for u, v in zip(by_name["MSE"]["a"], mse(tensors["a"], spec)))
    assert all(torch.equal(u, v) for u, v in zip(by_name["KL"]["a"], kl_onnxruntime(tensors["a"], spec)))
    single = calibrate_ranges(tensors, spec, "minmax")
    assert list(single) == ["minmax"]
    assert list(calibrate_ranges(tensors, spec, minmax)) == ["minmax"]


def test_range_method_fn_names_every_range_setter():
    assert range_method_fn("mse") is mse and range_method_fn(percentile) is percentile
    assert set(RANGE_METHODS) == {"minmax", "percentile", "mse", "cross_entropy", "kl_tensorrt", "kl_onnxruntime"}
    with pytest.raises(ValueError, match="weight_range must be one of"):
        range_method_fn("kl", "weight_range")


def test_calibrate_ranges_old_methods_keyword_names_range_method():
    with pytest.raises(TypeError, match="'methods' is now spelled 'range_method'"):
        calibrate_ranges({"a": torch.ones(3)}, QuantSpec(8), methods={"mm": minmax})

"""refimpl.deploy.ort: onnxruntime's own static quantization of refimpl's float ONNX graph,
checked against refimpl's independent range setting (refimpl.calib, refimpl.quant).

What matches exactly, and why:

* MinMax activation grids: onnxruntime's calibrator takes the global [min, max] of each tensor
  (float32), widens it to contain 0 and computes ``scale = (rmax - rmin) / (qmax - qmin)`` in
  float64, stored float32, ``zero_point = round_half_even(qmin - rmin / scale)`` on the full type
  range (int8 [-128, 127], uint8 [0, 255]; ``ActivationSymmetric=False``). refimpl's ``minmax``
  gives the same range and ``qparams`` with ``QuantSpec(8, signed, symmetric=False)`` the same
  convention, computed in float32: ``fl32(fl32(rmax - rmin) / 255)``. The two scales are then
  bit-identical whenever ``rmax - rmin`` is exact in float32 (every range with rmin = 0: all
  post-ReLU tensors), else at most one float32 ulp apart (onnxruntime rounds once, refimpl
  twice); zero points are equal unless ``rmin / scale`` is within that ulp of a half-integer.
* Entropy: ``quantize_static`` builds onnxruntime's histogram with its defaults, 128 bins and
  128 quantized bins, which it does not let a caller change; with as many quantized bins as
  bins there is one candidate window, the whole histogram, so the range is the data's
  [min, max] and the grids are MinMax's. ``kl_onnxruntime(num_bins=128, num_quantized_bins=128)``
  gives the same by construction. With a finer histogram (onnxruntime's EntropyCalibrater
  used directly) the threshold of one histogram equals ``kl_onnxruntime``'s up to float32 ties
  of the KL sums; histograms merged over several ``collect_data`` calls are other histograms
  (bins added at the ends as the range grows), and there only ``entropy_onnxruntime`` applied to
  onnxruntime's merged histogram reproduces its threshold.
* Weights: symmetric int8 per channel (axis 0) on the narrow range [-127, 127]:
  ``scale = max|w| / 127`` is bit-identical to refimpl's ``qparams`` with
  ``QuantSpec(8, symmetric=True, narrow_range=True, axis=0)`` (onnxruntime rounds the float64
  quotient 2 max|w| / 254 to float32, refimpl divides in float32; a float32 over 127 has a
  binary expansion of period 7, so the double rounding never meets a tie); codes agree except
  where ``w / scale`` is within a float32 ulp of a half-integer (onnxruntime divides, refimpl
  multiplies by the float32 reciprocal).

The intermediate tensors are computed by onnxruntime itself (the float graph, optimisations
off), as its calibrator sees them, so the comparisons above are of the range setting alone.
"""

import contextlib
import copy
import io
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from refimpl import numerics
from refimpl.calib import entropy_onnxruntime, kl_onnxruntime, minmax
from refimpl.calib.entropy import onnxruntime_divergences
from refimpl.deploy import (ORT_METHODS, calibration_ranges, export_float, ort_latency, ort_optimized_ops,
                            ort_quantize_static, ort_run, ort_session)
from refimpl.fold import fold_all_bn
from refimpl.models import MobileNetV2CNN, ResNetCNN
from refimpl.quant import QuantSpec, qparams, quantize
from testmodels import randomize_bn


@pytest.fixture(scope="module")
def mnist1d():
    from refimpl.zoo import pretrained
    model, data = pretrained("mnist1d", "resnet", 0, progress=False)
    folded = fold_all_bn(model).eval()
    return folded, export_float(folded, data.x_test[:2]), data


@pytest.fixture(scope="module")
def ort_models(mnist1d):
    _, onx, data = mnist1d
    return {(m, a): ort_quantize_static(onx, data.x_calib, method=m, activation_type=a)
            for m in ORT_METHODS for a in ("int8", "uint8")}


def _tensors(onx, x, names):
    """{name: float32 values} of the float graph's tensors on x, computed by onnxruntime."""
    m = copy.deepcopy(onx)
    extra = [n for n in names if n != "input"]
    m.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in extra)
    out = ort_session(m, optimize=False).run(extra, {"input": x})
    return {"input": x, **dict(zip(extra, out))}


# ---- onnxruntime's calibration against refimpl's range setting --------------------------------

def _refimpl_grid(values, signed):
    spec = QuantSpec(8, signed=signed, symmetric=False)
    lo, hi = minmax(torch.from_numpy(values), spec)
    scale, zp = qparams(lo, hi, spec)
    return float(lo), float(hi), np.float32(scale.item()), int(zp)


@pytest.mark.parametrize("act", ["int8", "uint8"])
def test_minmax_grids_are_refimpls_minmax_qparams(mnist1d, ort_models, act):
    _, onx, data = mnist1d
    ranges = calibration_ranges(ort_models["minmax", act])
    assert len(ranges) >= 10 and "input" in ranges
    values = _tensors(onx, data.x_calib.numpy(), list(ranges))
    qmin, qmax = (-128, 127) if act == "int8" else (0, 255)
    exact = 0
    for name, (scale, zp) in ranges.items():
        assert scale.dtype == np.float32 and zp.dtype == (np.int8 if act == "int8" else np.uint8)
        lo, hi, s_ref, z_ref = _refimpl_grid(values[name], act == "int8")
        # onnxruntime's convention on refimpl's range: one rounding of the float64 quotient
        s64 = (max(hi, 0.0) - min(lo, 0.0)) / (qmax - qmin)
        assert scale == np.float32(s64), name
        assert int(zp) == qmin - round(min(lo, 0.0) / s64), name      # Python's round: half to even
        # refimpl's qparams: the same, up to its float32 subtraction
        if float(np.float32(max(hi, 0.0)) - np.float32(min(lo, 0.0))) == max(hi, 0.0) - min(lo, 0.0):
            assert s_ref == scale, name
            exact += 1
        else:
            assert abs(float(s_ref) - float(scale)) <= np.spacing(scale), name
        t = -min(lo, 0.0) / float(scale)
        if abs(t - math.floor(t) - 0.5) > 1e-4:                        # not a near-tie
            assert z_ref == int(zp), name
    assert exact >= len(ranges) // 2        # every post-ReLU range (rmin = 0) is exact


def test_entropy_in_quantize_static_is_minmax(mnist1d, ort_models):
    """128 bins, 128 quantized bins: one candidate window, so Entropy gives MinMax's grids, and
    kl_onnxruntime with the same bins gives the same range by construction."""
    _, onx, data = mnist1d
    for act in ("int8", "uint8"):
        assert calibration_ranges(ort_models["entropy", act]) == calibration_ranges(ort_models["minmax", act])
    ranges = calibration_ranges(ort_models["entropy", "int8"])
    values = _tensors(onx, data.x_calib.numpy(), list(ranges))
    spec = QuantSpec(8, symmetric=False)
    for name in ranges:
        v = torch.from_numpy(values[name])
        assert tuple(map(float, kl_onnxruntime(v, spec, num_bins=128, num_quantized_bins=128))) == \
            tuple(map(float, minmax(v, spec))), name


def _ort_entropy(values, collects, num_bins, nqb, tmp_path):
    """onnxruntime's EntropyCalibrater on one tensor: ``values`` fed through a one-node graph
    (t -> Identity) in ``collects`` collect_data calls. Returns its (lo, hi) for t and its
    histogram entry (hist, edges, min, max, threshold)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator
    vi = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Identity", ["t"], ["out"])], "one",
                              [vi("t", onnx.TensorProto.FLOAT, ["N", *values.shape[1:]])],
                              [vi("out", onnx.TensorProto.FLOAT, ["N", *values.shape[1:]])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "t.onnx"))
    cal = create_calibrator(tmp_path / "t.onnx", ["Identity"], augmented_model_path=str(tmp_path / "aug.onnx"),
                            calibrate_method=CalibrationMethod.Entropy,
                            extra_options={"num_bins": num_bins, "num_quantized_bins": nqb})

    class Reader:
        def __init__(self, batches):
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    with contextlib.redirect_stdout(io.StringIO()):
        for part in np.array_split(values, collects):
            cal.collect_data(Reader([{"t": part}]))
        ranges = cal.compute_data()
    return tuple(map(float, ranges.data["t"].range_value)), cal.collector.get_histogram_dict()["t"]


def test_entropy_calibrator_vs_kl_onnxruntime_on_a_real_activation(mnist1d, tmp_path):
    """A real activation (the first block's residual branch before the add, signed). One
    histogram (one collect_data call): onnxruntime's threshold is kl_onnxruntime's with the same
    bins. Histograms merged over several calls are other histograms: there only
    entropy_onnxruntime applied to onnxruntime's merged histogram reproduces its threshold."""
    _, onx, data = mnist1d
    name = next(n.output[0] for n in onx.graph.node if n.output[0].startswith("blocks_0_conv2"))
    v = _tensors(onx, data.x_calib.numpy(), [name])[name]
    assert v.min() < 0 < v.max()
    spec = QuantSpec(8, symmetric=False)
    bins, nqb = 1024, 128
    one, (hist, edges, vmin, vmax, _) = _ort_entropy(v, 1, bins, nqb, tmp_path)
    assert hist.size == bins
    lo, hi = kl_onnxruntime(torch.from_numpy(v), spec, num_bins=bins, num_quantized_bins=nqb)
    _assert_same_or_float32_tie(one, (float(lo), float(hi)), hist, edges, vmin, vmax, nqb)
    assert float(hi) < float(v.max())                    # a real clip, not min-max
    merged, (hist, edges, vmin, vmax, _) = _ort_entropy(v, 4, bins, nqb, tmp_path)
    assert hist.size > bins                              # bins added as later batches widened the range
    t_lo, t_hi = entropy_onnxruntime(hist, edges, nqb)
    _assert_same_or_float32_tie(merged, (max(float(t_lo), float(vmin)), min(float(t_hi), float(vmax))),
                                hist, edges, vmin, vmax, nqb)


def _assert_same_or_float32_tie(theirs, ours, hist, edges, vmin, vmax, nqb):
    """Equal ranges, or onnxruntime's window has, in exact arithmetic, a KL divergence within its
    float32 rounding of the smallest one (onnxruntime sums in float32; tests/test_calib.py)."""
    if theirs == ours:
        return
    start, stop, div = onnxruntime_divergences(hist.astype(np.int64), nqb)
    picked = [i for i in range(len(start)) if (max(float(edges[start[i]]), float(vmin)),
                                                min(float(edges[stop[i]]), float(vmax))) == theirs]
    assert picked and div[picked[0]] - div.min() < 2e-6 * max(1.0, abs(div.min())), (theirs, ours)


def test_weights_are_refimpls_symmetric_narrow_per_channel_codes(mnist1d, ort_models):
    _, onx, _ = mnist1d
    q = ort_models["minmax", "int8"]
    float_inits = {t.name: numpy_helper.to_array(t) for t in onx.graph.initializer}
    q_inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    producers = {n.output[0]: n for n in q.graph.node}
    float_nodes = {n.name: n for n in onx.graph.node}
    spec = QuantSpec(8, symmetric=True, narrow_range=True, axis=0)
    layers = ties = 0
    for node in q.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        dq = producers[node.input[1]]
        assert dq.op_type == "DequantizeLinear" and {a.name: a.i for a in dq.attribute}.get("axis", 1) == 0
        codes, scale, zp = (q_inits[i] for i in dq.input)
        w = float_inits[float_nodes[node.name].input[1]].copy()
        assert codes.dtype == np.int8 and codes.shape == w.shape and (zp == 0).all()
        assert codes.min() >= -127                                   # narrow range
        lo, hi = minmax(torch.from_numpy(w), spec)
        s_ref, z_ref = qparams(lo, hi, spec)
        np.testing.assert_array_equal(scale, s_ref.numpy())
        assert (z_ref == 0).all()
        ref = quantize(torch.from_numpy(w), s_ref, z_ref, spec).numpy()
        v = w / scale.reshape((-1,) + (1,) * (w.ndim - 1))           # onnxruntime's quotient
        near_tie = np.abs(np.abs(v - np.floor(v)) - 0.5) <= 4 * np.spacing(np.abs(v).astype(np.float32))
        assert (codes == ref)[~near_tie].all()
        ties += int((codes != ref).sum())
        layers += 1
    assert layers == 7 and ties <= 2


# ---- accuracy and the optimised graph -------------------------------------------------------

def test_ort_qdq_models_keep_the_float_accuracy(mnist1d, ort_models):
    """W8A8, per-channel weights, min-max ranges: 8-bit PTQ of this network costs well under a
    point of accuracy (book chapter 3); a wrong scale, zero point or op would agree on ~10 %.
    The bound (2 points, 95 % agreement) is coarse on purpose: onnxruntime's integer kernels
    differ between CPUs (see tests/test_deploy_onnx.py)."""
    folded, onx, data = mnist1d
    y = data.y_test.numpy()
    with torch.no_grad():
        ref = folded(data.x_test).argmax(1).numpy()
    acc_float = (ref == y).mean()
    for key, q in ort_models.items():
        for optimize in (False, True):
            pred = ort_run(q, data.x_test, optimize=optimize).argmax(1)
            assert (pred == y).mean() >= acc_float - 0.02, (key, optimize)
            assert (pred == ref).mean() >= 0.95, (key, optimize)


def test_optimized_ops(mnist1d, ort_models):
    _, onx, _ = mnist1d
    q = ort_models["minmax", "uint8"]
    plain = ort_optimized_ops(q, optimize=False)
    assert plain["QuantizeLinear"] == len(calibration_ranges(q)) and plain["Conv"] == 6
    ops = ort_optimized_ops(q)
    qlinear = {k: v for k, v in ops.items() if "QLinear" in k}
    assert sum(v for k, v in qlinear.items() if k.endswith("QLinearConv")) == 6 and "Conv" not in ops
    assert ops.get("QuantizeLinear", 0) <= 1 and ops.get("DequantizeLinear", 0) <= 1   # in at the input, out at the logits
    flt = ort_optimized_ops(onx)
    assert not any("QLinear" in k for k in flt)
    assert flt == ort_optimized_ops(onx)                          # deterministic


EMULATED = ["Haswell-v4", "EPYC-Rome-v1"]
# ort_optimized_ops without refimpl (whose import needs torch, slow under emulation)
OPS_SNIPPET = """
import collections, json, sys, tempfile, onnx, onnxruntime as ort
out = {}
for name in sys.argv[2:]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        so.optimized_model_filepath = tmp + "/o.onnx"
        ort.InferenceSession(sys.argv[1] + "/" + name + ".onnx", so, providers=["CPUExecutionProvider"])
        m = onnx.load(tmp + "/o.onnx")
    c = collections.Counter(n.op_type if n.domain in ("", "ai.onnx") else n.domain + "." + n.op_type
                            for n in m.graph.node)
    out[name] = dict(sorted(c.items()))
print(json.dumps(out))
"""


@pytest.mark.skipif(not numerics.is_x86_64(), reason="the emulated CPUs are x86-64 ones; compare on an x86-64 host")
@pytest.mark.skipif(shutil.which("qemu-x86_64") is None,
                    reason="qemu-user is not installed (Debian package qemu-user; .ci/run installs it)")
def test_optimized_ops_under_emulated_cpus(tmp_path):
    """The op counts of float and QDQ models (1-d ResNet, 2-d MobileNetV2, whose float Convs
    onnxruntime's NCHWc transformer rewrites) on this CPU equal those under emulated AVX2-only
    CPUs without AVX-512 or VNNI (Intel Haswell, AMD Zen 2)."""
    torch.manual_seed(0)
    x1, x2 = torch.randn(64, 1, 40), torch.randn(64, 1, 8, 8)
    models = {"resnet1d": export_float(fold_all_bn(randomize_bn(ResNetCNN(1, 10, width=16, dims=1))), x1[:2]),
              "mobilenet2d": export_float(fold_all_bn(randomize_bn(MobileNetV2CNN(width=16))), x2[:2])}
    models["resnet1d-qdq"] = ort_quantize_static(models["resnet1d"], x1, activation_type="uint8")
    models["mobilenet2d-qdq"] = ort_quantize_static(models["mobilenet2d"], x2, activation_type="uint8")
    for name, m in models.items():
        onnx.save(m, str(tmp_path / f"{name}.onnx"))
    here = {n: ort_optimized_ops(m) for n, m in models.items()}
    assert any(k.startswith("com.microsoft.nchwc.") for k in here["mobilenet2d"])   # the CPU-specific layout
    for prefix in ([], *(["qemu-x86_64", "-cpu", cpu] for cpu in EMULATED)):
        out = subprocess.run([*prefix, sys.executable, "-c", OPS_SNIPPET, str(tmp_path), *models],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        assert json.loads(out.stdout) == here, prefix


def test_latency_is_measured_for_every_model(mnist1d, ort_models):
    _, onx, data = mnist1d
    q = ort_models["minmax", "uint8"]
    t = ort_latency({"float": onx, "qdq": q, "qdq-plain": ort_session(q, optimize=False)}, data.x_test[:8],
                    repeats=5, warmup=1)
    assert list(t) == ["float", "qdq", "qdq-plain"] and all(0 < v < 1 for v in t.values())


# ---- bad arguments ----------------------------------------------------------------------------

def test_bad_arguments(mnist1d, ort_models):
    _, onx, data = mnist1d
    x = data.x_calib
    cases = [
        (lambda: ort_quantize_static(onx, x, method="percentile"), ValueError, "method must be one of 'minmax', 'entropy'"),
        (lambda: ort_quantize_static(onx, x, activation_type="int4"), ValueError, "activation_type must be one of"),
        (lambda: ort_quantize_static(onx, x, weight_type="fp8"), ValueError, "weight_type must be one of"),
        (lambda: ort_quantize_static(onx, x, per_channel=1), TypeError, "per_channel must be a bool"),
        (lambda: ort_quantize_static(onx, x, batch_size=0), ValueError, "batch_size must be >= 1"),
        (lambda: ort_quantize_static(onx, x, method="entropy", batch_size=100), ValueError, "batch_size must divide"),
        (lambda: ort_quantize_static(onx, x.double()), TypeError, "calibration must be float32"),
        (lambda: ort_quantize_static(onx, x[:, 0]), ValueError, "calibration must have the model input's rank 3"),
        (lambda: ort_quantize_static(onx, x[:0]), ValueError, "calibration must be a non-empty batch"),
        (lambda: ort_quantize_static(onx.SerializeToString(), x), TypeError, "float_model must be an onnx.ModelProto"),
        (lambda: ort_quantize_static(ort_models["minmax", "int8"], x), ValueError, "already has"),
        (lambda: ort_session(onx, threads=0), ValueError, "threads must be >= 1"),
        (lambda: ort_session(onx, optimize="yes"), TypeError, "optimize must be a bool"),
        (lambda: ort_run("m.onnx", x), TypeError, "model_or_session must be"),
        (lambda: ort_run(onx, x, batch_size=0), ValueError, "batch_size must be >= 1"),
        (lambda: ort_latency({}, x), ValueError, "models must be a non-empty dict"),
        (lambda: ort_latency({"a": 3}, x), TypeError, r"models\['a'\] must be"),
        (lambda: ort_latency({"a": onx}, x, repeats=0), ValueError, "repeats must be >= 1"),
        (lambda: calibration_ranges(onx), ValueError, "no QuantizeLinear"),
        (lambda: ort_optimized_ops(None), TypeError, "model must be an onnx.ModelProto"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()
    # the caller's model is left as it was (quantize_static rewrites a ModelProto it is given)
    before = onx.SerializeToString()
    ort_quantize_static(onx, x)
    assert onx.SerializeToString() == before

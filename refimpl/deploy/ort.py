"""onnxruntime's own static quantization of a float ONNX model, and what onnxruntime runs.

Beside refimpl's QDQ export (``refimpl.deploy.onnx.export_qdq``) the chapter puts the model that
onnxruntime's quantization tool makes of the same float graph (``refimpl.deploy.onnx.export_float``):
:func:`ort_quantize_static` wraps ``onnxruntime.quantization.quantize_static`` (QDQ format,
MinMax or Entropy calibration), :func:`calibration_ranges` reads back the activation grids it
chose, :func:`ort_session` / :func:`ort_run` run a model with onnxruntime's graph optimisations
on or off, :func:`ort_optimized_ops` lists the kernels onnxruntime runs after optimising the
graph (QLinearConv instead of DequantizeLinear -> Conv -> QuantizeLinear), and
:func:`ort_latency` times models interleaved in one process.

References: onnxruntime's quantization guide
(https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html) and graph
optimisations (https://onnxruntime.ai/docs/performance/model-optimizations/graph-optimizations.html);
the ONNX operators QuantizeLinear / DequantizeLinear (opset 13).
"""

from __future__ import annotations

import contextlib
import io
import logging
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from .._checks import check_choice, check_int
from .onnx import site_tensors

__all__ = ["ORT_METHODS", "ORT_TYPES", "ort_quantize_static", "calibration_ranges", "ort_session", "ort_run",
           "ort_optimized_ops", "ort_latency"]

ORT_METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy}
"""The calibration methods :func:`ort_quantize_static` accepts: name -> onnxruntime's
``CalibrationMethod``."""

ORT_TYPES = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
"""The activation and weight types :func:`ort_quantize_static` accepts: name -> onnxruntime's
``QuantType``."""

_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def _check_model_proto(model, name: str = "model") -> onnx.ModelProto:
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"{name} must be an onnx.ModelProto (e.g. from refimpl.deploy.onnx.export_float), "
                        f"got {type(model).__name__}")
    return model


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def _as_array(x, name: str) -> np.ndarray:
    """x (numpy array or torch tensor, float32, at least 1-d, finite) as a C-contiguous numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or a torch.Tensor, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise TypeError(f"{name} must be float32 (the models' input type), got {x.dtype}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch (N, ...), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return np.ascontiguousarray(x)


def _input_rank(model: onnx.ModelProto) -> int:
    inputs = {i.name for i in model.graph.initializer}
    real = [i for i in model.graph.input if i.name not in inputs]
    if len(real) != 1:
        raise ValueError(f"the model must have one input, got {[i.name for i in real]}")
    return len(real[0].type.tensor_type.shape.dim)


class _BatchReader(CalibrationDataReader):
    """onnxruntime's calibration data reader over an array: batches of ``batch_size`` rows."""

    def __init__(self, x: np.ndarray, input_name: str, batch_size: int):
        self.x, self.input_name, self.batch_size, self.start = x, input_name, batch_size, 0

    def get_next(self):
        if self.start >= len(self.x):
            return None
        batch = self.x[self.start:self.start + self.batch_size]
        self.start += self.batch_size
        return {self.input_name: batch}

    def __len__(self):
        return -(-len(self.x) // self.batch_size)


class _DropPreprocessAdvice(logging.Filter):
    """Drops quantize_static's "consider pre-processing" warning (see ort_quantize_static)."""

    def filter(self, record):
        return "pre-processing" not in record.getMessage()


def ort_quantize_static(float_model: onnx.ModelProto, calibration, *, method: str = "minmax",
                        per_channel: bool = True, activation_type: str = "int8", weight_type: str = "int8",
                        batch_size: int = 64) -> onnx.ModelProto:
    """onnxruntime's static quantization of a float ONNX model, in QDQ form: the model
    onnxruntime's own tool makes, to put beside ``refimpl.deploy.onnx.export_qdq``.

    Reference: ``onnxruntime.quantization.quantize_static`` (onnxruntime's quantization guide,
    https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html), called with
    ``quant_format=QuantFormat.QDQ``, ``calibrate_method`` MinMax or Entropy (``method``),
    ``per_channel``, ``activation_type`` / ``weight_type`` (:data:`ORT_TYPES`), a calibration
    data reader over ``calibration`` in batches of ``batch_size``, and ``reduce_range=False``;
    everything else is onnxruntime's default (onnxruntime 1.32):

    * activations: asymmetric (``ActivationSymmetric=False``), per tensor, on the full type range
      ([-128, 127] or [0, 255]); onnxruntime widens the calibrated range to contain 0, then
      ``scale = (rmax - rmin) / (qmax - qmin)`` (float64, stored float32),
      ``zero_point = round_half_even(qmin - rmin / scale)``. A Conv output read only by a Relu
      gets the Relu output's range and the Relu is removed (the grid clips at 0);
    * weights: symmetric (``WeightSymmetric`` defaults to True for int8; per-channel weights are
      always symmetric), int8 on the narrow range [-127, 127], zero point 0,
      ``scale = max|w| / 127`` per output channel (axis 0 of Conv, of Gemm's transB weight);
      ``reduce_range=False`` (True would use 7-bit weights, [-64, 64]); codes
      ``clip(round_half_even(w / scale), -128, 127)``;
    * biases: int32 codes with scale = input scale * weight scale, zero point 0 (read through a
      DequantizeLinear); onnxruntime may enlarge a weight scale whose bias scale would be too
      small (``QDQDisableWeightAdjustForInt32Bias=False``);
    * Entropy: onnxruntime's ``HistogramCollector`` with its defaults, 128 bins and 128
      quantized bins, which ``quantize_static`` does not let a caller change. With 128 bins the
      search has a single candidate window, the whole histogram, so the range is the data's
      [min, max]: Entropy gives exactly MinMax's grids. (onnxruntime stacks the batches of one
      ``collect_data`` call into one array before the histogram, so the batches must have equal
      sizes; ``len(calibration)`` must be a multiple of ``batch_size``.)

    onnxruntime's model pre-processing (``quant_pre_process``: symbolic shape inference, graph
    optimisation) is not run: the graphs of ``export_float`` are BN-folded already and have
    static shapes but the batch, and ``quantize_static`` runs ONNX shape inference itself (on
    the MNIST-1D ResNet, pre-processing only removes the output Identity and gives the same
    grids, weight codes and optimised kernels); its "consider pre-processing" warning and its
    progress prints are therefore silenced. The float
    model is written to a temporary directory first: ``quantize_static`` given a ModelProto
    rewrites that ModelProto's initializers into references to an external file it then deletes.

    float_model: a float32 ``onnx.ModelProto`` with one input (not already quantized).
    calibration: float32 numpy array or torch tensor (N, ...) of the model's input rank.
    method: "minmax" or "entropy" (:data:`ORT_METHODS`). per_channel: per-output-channel weight
    scales. activation_type, weight_type: "int8" or "uint8". batch_size: rows per calibration
    batch (>= 1).
    Returns the quantized ``onnx.ModelProto`` (QuantizeLinear/DequantizeLinear around float
    ops; same input and output names as ``float_model``).

    Raises TypeError for arguments of the wrong type, ValueError naming the parameter and its
    allowed values for a bad method, type or batch_size, a calibration array of the wrong rank,
    and a model that already has QuantizeLinear/DequantizeLinear nodes.

    Why one function: the body is the argument checks and one call of onnxruntime's tool; the
    length is the docstring, which records what onnxruntime does by default.

    Used in :ref:`ch12-sec-the-whole-model`.
    """
    _check_model_proto(float_model, "float_model")
    check_choice(method, "method", tuple(ORT_METHODS))
    check_choice(activation_type, "activation_type", tuple(ORT_TYPES))
    check_choice(weight_type, "weight_type", tuple(ORT_TYPES))
    _check_bool(per_channel, "per_channel")
    check_int(batch_size, "batch_size", 1)
    x = _as_array(calibration, "calibration")
    quantized = sorted({n.op_type for n in float_model.graph.node if n.op_type in _QDQ_OPS})
    if quantized:
        raise ValueError(f"float_model already has {quantized} nodes: ort_quantize_static takes a float model "
                         "(refimpl.deploy.onnx.export_float)")
    rank = _input_rank(float_model)
    if x.ndim != rank:
        raise ValueError(f"calibration must have the model input's rank {rank}, got shape {x.shape}")
    if method == "entropy" and len(x) % batch_size:
        raise ValueError(f"batch_size must divide len(calibration) = {len(x)} for method='entropy' "
                         f"(onnxruntime stacks the batches into one array), got {batch_size}")
    name = next(i.name for i in float_model.graph.input if i.name not in {t.name for t in float_model.graph.initializer})
    advice = _DropPreprocessAdvice()
    with tempfile.TemporaryDirectory(prefix="refimpl-ort-") as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "qdq.onnx"
        onnx.save(float_model, str(src))
        logging.getLogger().addFilter(advice)
        try:
            with contextlib.redirect_stdout(io.StringIO()):          # the Entropy calibrator prints progress
                quantize_static(str(src), str(dst), _BatchReader(x, name, batch_size), quant_format=QuantFormat.QDQ,
                                per_channel=per_channel, reduce_range=False,
                                activation_type=ORT_TYPES[activation_type], weight_type=ORT_TYPES[weight_type],
                                calibrate_method=ORT_METHODS[method])
        finally:
            logging.getLogger().removeFilter(advice)
        return onnx.load(str(dst))


def calibration_ranges(quantized_model: onnx.ModelProto) -> dict[str, tuple[np.float32, np.integer]]:
    """The activation grids of a QDQ model: ``{tensor name: (scale, zero_point)}`` for the input
    of every QuantizeLinear node whose input is not an initializer, in graph order.

    Reference: ONNX QuantizeLinear (opset 13): ``y = saturate(round(x / y_scale) + y_zero_point)``.
    Works for onnxruntime's models (``ort_quantize_static``; tensor names are the float graph's)
    and refimpl's (``export_qdq``).

    quantized_model: an ``onnx.ModelProto``.
    Returns numpy scalars: scale float32, zero point of the quantized type (int8 or uint8); a
    per-channel QuantizeLinear gives 1-d arrays.
    Raises TypeError for a non-ModelProto, ValueError for a model with no activation
    QuantizeLinear, or one whose scale or zero point is not an initializer.
    """
    _check_model_proto(quantized_model, "quantized_model")
    inits = {t.name: t for t in quantized_model.graph.initializer}
    constants = {n.output[0]: n.attribute[0].t for n in quantized_model.graph.node
                 if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    inits.update(constants)
    out = {}
    for n in quantized_model.graph.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in inits:
            continue
        if len(n.input) < 3 or n.input[1] not in inits or n.input[2] not in inits:
            raise ValueError(f"QuantizeLinear {n.name!r}: scale and zero point must be initializers")
        scale, zp = numpy_helper.to_array(inits[n.input[1]]), numpy_helper.to_array(inits[n.input[2]])
        out[n.input[0]] = (scale[()], zp[()])
    if not out:
        raise ValueError("quantized_model has no QuantizeLinear on an activation: is it a QDQ model?")
    return out


def _session_options(optimize: bool, threads: int) -> ort.SessionOptions:
    _check_bool(optimize, "optimize")
    check_int(threads, "threads", 1)
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3          # errors only: a chapter cell must not write to stderr
    return so


def ort_session(model: onnx.ModelProto, *, optimize: bool = True, threads: int = 1) -> ort.InferenceSession:
    """An onnxruntime ``InferenceSession`` of ``model`` on the CPU execution provider.

    optimize=False: ``ORT_DISABLE_ALL``: onnxruntime runs the graph's operators as the ONNX
    spec defines them; a QDQ model then runs float Conv/Gemm on dequantized tensors and
    QuantizeLinear/DequantizeLinear as ops (what the graph *means*). optimize=True:
    ``ORT_ENABLE_ALL``: constant folding, fusions, and the QDQ transformer, which fuses each
    DequantizeLinear -> op -> QuantizeLinear group into an integer kernel (QLinearConv,
    QLinearMatMul, QLinearAdd, QLinearGlobalAveragePool; see :func:`ort_optimized_ops`).
    Reference: onnxruntime's graph optimisations
    (https://onnxruntime.ai/docs/performance/model-optimizations/graph-optimizations.html).

    threads: ``intra_op_num_threads`` (>= 1; 1 by default, for timings that do not depend on
    the machine's other load); ``inter_op_num_threads`` 1, sequential execution. onnxruntime's
    log is set to errors only (its warnings would go to stderr).
    Returns the session. Raises TypeError for a non-ModelProto or a non-bool optimize, and
    TypeError/ValueError naming ``threads``.
    """
    _check_model_proto(model)
    so = _session_options(optimize, threads)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def ort_run(model_or_session, x, *, batch_size: int = 256, optimize: bool = True, threads: int = 1,
            outputs=None):
    """The output of a one-input, one-output model on x, run by onnxruntime in batches.

    model_or_session: an ``onnx.ModelProto`` (run in an :func:`ort_session` with ``optimize``
    and ``threads``) or an ``onnxruntime.InferenceSession`` (optimize and threads then unused).
    x: float32 numpy array or torch tensor (N, ...). batch_size: rows per run (>= 1), which
    bounds the memory of the intermediate tensors. outputs: None, or activation sites of an
    :func:`~refimpl.deploy.onnx.export_qdq` graph (a ModelProto; see
    :func:`~refimpl.deploy.onnx.site_tensors`) whose dequantized tensors to return instead, as
    {site: float32 array}; they are added as graph outputs, which can keep the optimiser from
    fusing around them, so ``optimize=False`` is the meaningful setting.
    Returns float32 numpy (N, ...), the batches' outputs concatenated (or the dict).
    Raises TypeError for other model types or an x that is not float32, ValueError for a model
    with other than one input and one output, an unknown site, or bad batch_size/threads.

    Used in :ref:`ch12-sec-one-convolution-three-ways`.
    """
    check_int(batch_size, "batch_size", 1)
    wanted = None
    if outputs is not None:
        if not isinstance(model_or_session, onnx.ModelProto):
            raise TypeError("outputs needs model_or_session to be an onnx.ModelProto from export_qdq")
        tensors = site_tensors(model_or_session)
        unknown = [o for o in outputs if o not in tensors]
        if unknown:
            raise ValueError(f"outputs {unknown} are not activation sites of this graph; its sites: {list(tensors)}")
        model = onnx.ModelProto()
        model.CopyFrom(model_or_session)
        wanted = [tensors[o] for o in outputs]
        model.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in wanted)
        model_or_session = model
    if isinstance(model_or_session, onnx.ModelProto):
        sess = ort_session(model_or_session, optimize=optimize, threads=threads)
    elif isinstance(model_or_session, ort.InferenceSession):
        sess = model_or_session
    else:
        raise TypeError(f"model_or_session must be an onnx.ModelProto or an onnxruntime.InferenceSession, "
                        f"got {type(model_or_session).__name__}")
    x = _as_array(x, "x")
    if len(sess.get_inputs()) != 1 or len(sess.get_outputs()) != 1 + len(wanted or ()):
        raise ValueError("ort_run handles models with one input and one output")
    name = sess.get_inputs()[0].name
    if wanted is not None:
        runs = [sess.run(wanted, {name: x[i:i + batch_size]}) for i in range(0, len(x), batch_size)]
        return {o: np.concatenate([r[k] for r in runs]).astype(np.float32, copy=False)
                for k, o in enumerate(outputs)}
    outs = [sess.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs).astype(np.float32, copy=False)


def ort_optimized_ops(model: onnx.ModelProto, *, optimize: bool = True) -> dict[str, int]:
    """The operators onnxruntime runs for ``model``: ``{op: count}`` of the graph after its
    optimisations (``SessionOptions.optimized_model_filepath``, written to a temporary
    directory), sorted by op. An op outside the ONNX domain is named with its domain, e.g.
    ``"com.microsoft.QLinearAdd"``.

    Reference: onnxruntime's graph optimisations
    (https://onnxruntime.ai/docs/performance/model-optimizations/graph-optimizations.html): with
    ``optimize=True`` (``ORT_ENABLE_ALL``, as :func:`ort_session`) a QDQ model's groups
    DequantizeLinear -> Conv -> QuantizeLinear become QLinearConv, and what remains of
    QuantizeLinear/DequantizeLinear shows where the graph leaves the integer domain; with
    ``optimize=False`` the graph is returned as given.

    What it shows on x86 (onnxruntime 1.32): a QDQ model with uint8 activations becomes integer
    kernels throughout (ResNetCNN: 6 ``com.microsoft.QLinearConv``, 2 ``QLinearAdd``,
    ``QLinearGlobalAveragePool``, ``QGemm``, one QuantizeLinear in, one DequantizeLinear out).
    With int8 activations onnxruntime's x86 optimiser first rewrites int8 QuantizeLinear /
    DequantizeLinear pairs to uint8 (``QDQS8ToU8Transformer``); in ResNetCNN it skipped the two
    grids read by two consumers each (the residual forks), and the 4 convolutions reading or
    writing those int8 grids stayed float Conv between DequantizeLinear and QuantizeLinear
    (2 QLinearConv of 6).

    Whether the counts depend on the CPU: onnxruntime's layout transformer (NCHWc, level
    ``ORT_ENABLE_ALL``) rewrites *float* 2-d Convs into ``com.microsoft.nchwc`` ops, with a
    channel block of 16 on AVX-512 and 8 on AVX2, so the number of layout reorders of a float
    2-d model can differ between CPUs: measured for ResNetCNN/MobileNetV2CNN of width 4 and 8
    (``com.microsoft.nchwc.ReorderOutput`` 4-7 on this AVX-512 CPU against 1-5 under an emulated
    AVX2 Haswell), not for width 16. 1-d models and QDQ models (QLinear kernels) gave the same
    counts on this CPU and under emulated Intel Haswell and AMD Zen 2 CPUs (qemu-user; AVX2, no
    AVX-512, no VNNI); ``tests/test_deploy_ort.py`` re-checks that. Which instructions a
    QLinearConv uses (VNNI or not) is decided inside the kernel and does not show here.

    Returns dict[str, int]. Raises TypeError for a non-ModelProto or a non-bool optimize.

    Used in :ref:`ch12-sec-latency`.
    """
    _check_model_proto(model)
    so = _session_options(optimize, 1)
    with tempfile.TemporaryDirectory(prefix="refimpl-ort-") as tmp:
        path = Path(tmp) / "optimized.onnx"
        so.optimized_model_filepath = str(path)
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        optimized = onnx.load(str(path))
    counts = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
                     for n in optimized.graph.node)
    return dict(sorted(counts.items()))


def ort_latency(models: dict, x, *, repeats: int = 50, warmup: int = 5, threads: int = 1,
                optimize: bool = True) -> dict[str, float]:
    """Median wall-clock seconds of one ``session.run`` on x for each model, measured
    interleaved in this process.

    Each repeat runs every model once, round robin, starting one model further each repeat
    (so no model always runs right after the same other one); slow and fast phases of a shared
    machine then hit all models alike, and the ratios of the medians are what to compare. The
    first ``warmup`` rounds are not counted (allocations, caches, thread start-up).
    ``time.perf_counter`` around ``InferenceSession.run`` with x already a contiguous float32
    array; the output's conversion to numpy is included (as in any caller).

    models: ``{name: onnx.ModelProto or onnxruntime.InferenceSession}``; a ModelProto runs in an
    :func:`ort_session` with ``optimize`` and ``threads`` (single-threaded by default:
    ``intra_op_num_threads=1``, ``inter_op_num_threads=1``); pass a session to time, e.g., a QDQ
    model with optimisations off in the same run. x: float32 numpy array or torch tensor
    (N, ...), one batch. repeats >= 1, warmup >= 0.
    Returns ``{name: median seconds}`` in the order of ``models``.
    Raises TypeError/ValueError naming the bad argument (an empty models dict included).

    Used in :ref:`ch12-sec-latency`.
    """
    if not isinstance(models, dict) or not models:
        raise ValueError("models must be a non-empty dict {name: onnx.ModelProto or onnxruntime.InferenceSession}")
    check_int(repeats, "repeats", 1)
    check_int(warmup, "warmup", 0)
    x = _as_array(x, "x")
    sessions = {}
    for name, m in models.items():
        if isinstance(m, onnx.ModelProto):
            sessions[name] = ort_session(m, optimize=optimize, threads=threads)
        elif isinstance(m, ort.InferenceSession):
            sessions[name] = m
        else:
            raise TypeError(f"models[{name!r}] must be an onnx.ModelProto or an onnxruntime.InferenceSession, "
                            f"got {type(m).__name__}")
    names = list(sessions)
    feeds = {n: {sessions[n].get_inputs()[0].name: x} for n in names}
    times: dict[str, list] = {n: [] for n in names}
    for r in range(warmup + repeats):
        for k in range(len(names)):
            n = names[(r + k) % len(names)]
            t0 = time.perf_counter()
            sessions[n].run(None, feeds[n])
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[n].append(dt)
    return {n: statistics.median(times[n]) for n in names}

"""The white paper's standard PTQ pipeline and its debugging flow, composed from refimpl's parts.

* :func:`standard_pipeline` — Nagel et al. 2021 ("A White Paper on Neural Network Quantization"),
  its section "Standard PTQ pipeline" (§11.3.5 of the book-chapter version, Fournarakis et al.
  2022): cross-layer equalization (with BN folding, and high-bias absorption), quantizer
  insertion, weight range setting, AdaRound (or bias correction when no data can be spared),
  activation range setting.
* :func:`pipeline_accuracy` — the test accuracy of one pipeline; :func:`pipeline_accuracies` —
  of several that differ only in AdaRound and bias correction, sharing the steps before them.
* :func:`quantization_sensitivity` — the paper's "Debugging" flow chart for PTQ: check the
  simulated-quantization model without quantizers against FP32, then quantize weights only and
  activations only, then one layer (or one activation site) at a time, to find the layers that
  break the accuracy.

Book: chapter 5.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .._api import renamed
from .._checks import check_choice
from ..fold import bn_statistics, fold_all_bn
from ..qmodel import (QuantConfig, act_quantizers, calibrate, quant_layers, quantize_model, set_quant_state,
                      weight_quantizers)
from ..train import evaluate
from .adaround import adaround as run_adaround
from .bias_correction import bias_correction_analytic, bias_correction_empirical
from .cle import cross_layer_equalization, high_bias_absorption

__all__ = ["PipelineResult", "standard_pipeline", "pipeline_accuracy", "pipeline_accuracies",
           "quantization_sensitivity", "with_config", "BIAS_CORRECTIONS"]

BIAS_CORRECTIONS = (None, "empirical", "analytic")


@dataclass
class PipelineResult:
    """What :func:`standard_pipeline` produced: the simulated-quantized ``qmodel``, the FP32
    model it was built from after BN folding and CLE (``fp_model``, the reference for AdaRound
    and bias correction), the ``steps`` taken in order, and the per-layer AdaRound report
    (empty without AdaRound) and CLE report (empty without CLE)."""
    qmodel: nn.Module
    fp_model: nn.Module
    steps: list = field(default_factory=list)
    adaround_report: list = field(default_factory=list)
    cle_report: object = None


def _has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@renamed(rounding="adaround")
def standard_pipeline(fp_model: nn.Module, x_calib: torch.Tensor, config: QuantConfig, *,
                      cle: bool = True, bias_absorption: bool = True, adaround: bool = True,
                      bias_correction: str | None = None, adaround_kw: dict | None = None,
                      progress: bool = True) -> PipelineResult:
    """Post-training quantization of ``fp_model`` as the white paper's standard pipeline does.

    Steps (the white paper's standard PTQ pipeline), each optional where the paper makes it so:

    1. fold BatchNorm (§2.3.1) and, with ``cle``, cross-layer equalization, then with
       ``bias_absorption`` high-bias absorption from the folded BNs' statistics;
    2. insert quantizers (``config``; the paper sets weight ranges with MSE:
       ``config.weight_range_method``);
    3. activation range setting on ``x_calib`` (``config.act_range_method``; the paper: MSE);
    4. ``adaround=True``: AdaRound (needs ``x_calib``), else round-to-nearest; ``bias_correction``
       "empirical" (on ``x_calib``) or "analytic" (from BN statistics) — the paper uses bias
       correction where AdaRound is not run;
    5. activation ranges are set again, since steps 4 changed the weights.

    The paper sets activation ranges last; we also set them before AdaRound because AdaRound's
    layer inputs come from the quantized model with its activation quantizers on.

    fp_model: float model (any fx-traceable model of Conv/Linear/BN/ReLU(6)/adds); untouched.
    x_calib: float ``(N, *input_shape)`` calibration inputs. ``progress``: show the progress of each
    step. Returns a :class:`PipelineResult`.

    Used in :ref:`ch5-sec-adaround-learning-to-round`.
    """
    if not isinstance(fp_model, nn.Module):
        raise TypeError(f"fp_model must be an nn.Module, got {type(fp_model).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    _check_ending(adaround, bias_correction)
    steps, model, bn_stats, cle_report = _prepare(fp_model, x_calib, config, cle, bias_absorption, progress)
    qmodel = _quantize(model, x_calib, config, steps)
    return _finish(qmodel, model, bn_stats, x_calib, config, steps, cle_report, adaround, bias_correction,
                   adaround_kw, progress)


def _check_ending(adaround, bias_correction) -> None:
    if not isinstance(adaround, bool):
        raise TypeError(f"adaround must be a bool, got {adaround!r}")
    check_choice(bias_correction, "bias_correction", BIAS_CORRECTIONS)


def _prepare(fp_model, x_calib, config, cle, bias_absorption, progress):
    """Step 1 of :func:`standard_pipeline`: BN folding, CLE, high-bias absorption."""
    steps = []
    model = copy.deepcopy(fp_model).eval()
    bn_stats = bn_statistics(model) if _has_bn(model) else {}
    if bn_stats:
        model = fold_all_bn(model)
        steps.append("fold BatchNorm")
    cle_report = None
    if cle:
        model, cle_report = cross_layer_equalization(model, return_report=True, progress=progress)
        bn_stats = cle_report.rescale_bn_statistics(bn_stats) if bn_stats else bn_stats
        steps.append("cross-layer equalization")
    if bias_absorption and bn_stats:
        model, bn_stats = high_bias_absorption(model, bn_stats, return_report=True)
        steps.append("high-bias absorption")
    return steps, model, bn_stats, cle_report


def _quantize(reference, x_calib, config, steps):
    """Steps 2-3 of :func:`standard_pipeline`: quantizers, activation ranges."""
    qmodel = quantize_model(reference, config)
    steps.append(f"quantizers ({config.weight_bits}-bit weights, {config.weight_range_method} ranges)")
    if config.act_bits is not None:
        calibrate(qmodel, x_calib)
        steps.append(f"activation ranges ({config.act_range_method})")
    return qmodel


def _finish(qmodel, reference, bn_stats, x_calib, config, steps, cle_report, adaround, bias_correction,
            adaround_kw, progress):
    """Steps 4-5 of :func:`standard_pipeline`: rounding, bias correction, activation ranges again."""
    adaround_report = []
    if adaround:
        adaround_report = run_adaround(qmodel, reference, x_calib, progress=progress, **(adaround_kw or {}))
        steps.append("AdaRound")
    if bias_correction == "empirical":
        qmodel = bias_correction_empirical(qmodel, reference, x_calib, progress=progress)
        steps.append("bias correction (empirical)")
    elif bias_correction == "analytic":
        if not bn_stats:
            raise ValueError("bias_correction='analytic' needs BatchNorm statistics; fp_model has no BatchNorm")
        qmodel = bias_correction_analytic(qmodel, bn_stats)
        steps.append("bias correction (analytic)")
    if config.act_bits is not None and (adaround or bias_correction):
        calibrate(qmodel, x_calib)
        steps.append("activation ranges again")
    return PipelineResult(qmodel, reference, steps, adaround_report, cle_report)


def pipeline_accuracy(fp_model: nn.Module, data, config: QuantConfig, **pipeline_kw) -> float:
    """Test accuracy (%) of ``standard_pipeline(fp_model, data.x_calib, config, **pipeline_kw)``
    on ``data.x_test``/``data.y_test``. data: a :class:`refimpl.data.DataSplit`."""
    result = standard_pipeline(fp_model, data.x_calib, config, **pipeline_kw)
    return evaluate(result.qmodel, data.x_test, data.y_test)


def pipeline_accuracies(fp_model: nn.Module, data, config: QuantConfig, endings: dict, *,
                        cle: bool = True, bias_absorption: bool = True, adaround_kw: dict | None = None,
                        progress: bool = True) -> dict:
    """Test accuracies (%) of several pipelines that differ only in their last steps:
    ``{name: pipeline_accuracy(fp_model, data, config, cle=cle, bias_absorption=bias_absorption,
    adaround_kw=adaround_kw, **ending)}`` for ``endings`` {name: {"adaround": bool, "bias_correction":
    ...}} ("adaround" required; no "bias_correction": none). The common steps (BN folding, CLE,
    absorption, quantizers, activation ranges) run once; each ending continues from a copy, so the
    numbers are those of separate :func:`pipeline_accuracy` calls (tests/test_pipeline.py).

    Used in :ref:`ch5-sec-per-tensor-weights-and-the`.
    """
    if not isinstance(fp_model, nn.Module):
        raise TypeError(f"fp_model must be an nn.Module, got {type(fp_model).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    for name, ending in endings.items():
        unknown = set(ending) - {"adaround", "bias_correction"}
        if unknown:
            raise ValueError(f"ending {name!r} has keys {sorted(unknown)}: only adaround and bias_correction"
                             + (" ('rounding' is now spelled 'adaround': True or False)" if "rounding" in unknown else ""))
        if "adaround" not in ending:
            raise ValueError(f"ending {name!r} needs adaround (True or False)")
        _check_ending(ending["adaround"], ending.get("bias_correction"))
    steps, model, bn_stats, cle_report = _prepare(fp_model, data.x_calib, config, cle, bias_absorption, progress)
    qmodel = _quantize(model, data.x_calib, config, steps)
    accuracies = {}
    for name, ending in endings.items():
        result = _finish(copy.deepcopy(qmodel), copy.deepcopy(model), copy.deepcopy(bn_stats), data.x_calib, config, list(steps),
                         cle_report, ending["adaround"], ending.get("bias_correction"),
                         adaround_kw, progress)
        accuracies[name] = evaluate(result.qmodel, data.x_test, data.y_test)
    return accuracies


def quantization_sensitivity(qmodel: nn.Module, x: torch.Tensor, y: torch.Tensor,
                             per_layer: bool = True) -> dict:
    """The white paper's PTQ debugging flow as accuracies (%) on (x, y).

    Returns {"fp32": quantizers off (must equal the FP32 model), "weights": weights only,
    "activations": activations only, "full": both, "layers": {layer: accuracy with only that
    layer's weights quantized}, "sites": {site: accuracy with only that activation quantizer on}}.
    Each quantizer's on/off state is restored afterwards. qmodel: from
    :func:`refimpl.qmodel.quantize_model`, calibrated; x float (N, ...), y int64 (N,).

    Used in :ref:`ch5-sec-the-results-table`.
    """
    before_w = {n: q.enabled for n, q in weight_quantizers(qmodel).items()}
    before_a = {n: q.state for n, q in act_quantizers(qmodel).items()}
    report = {}
    try:
        for key, w, a in (("fp32", False, False), ("weights", True, False),
                          ("activations", False, True), ("full", True, True)):
            set_quant_state(qmodel, weights=w, acts=a)
            report[key] = evaluate(qmodel, x, y)
        if per_layer:
            report["layers"] = {}
            for name in quant_layers(qmodel):
                set_quant_state(qmodel, weights=False, acts=False)
                set_quant_state(qmodel, weights=True, acts=False, layers=[name])
                report["layers"][name] = evaluate(qmodel, x, y)
            report["sites"] = {}
            for site in act_quantizers(qmodel):
                set_quant_state(qmodel, weights=False, acts=False)
                set_quant_state(qmodel, weights=False, acts=True, layers=[site])
                report["sites"][site] = evaluate(qmodel, x, y)
    finally:
        for n, q in weight_quantizers(qmodel).items():
            q.enabled = before_w[n]
        for n, q in act_quantizers(qmodel).items():
            q.set_state(before_a[n])
    return report


def with_config(config: QuantConfig, **changes) -> QuantConfig:
    """A copy of ``config`` with ``changes`` (a dataclass replace, validated by QuantConfig)."""
    return replace(config, **changes)

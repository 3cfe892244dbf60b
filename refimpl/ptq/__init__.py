"""Post-training quantization: from a trained FP32 model to a quantized one without retraining.

* ``channels``: per-channel geometry of a layer's weight (ranges, rescaling, bias edits);
* ``cle``: cross-layer equalization and high-bias absorption (DFQ §4.1; white paper §3.2);
* ``bias_correction``: analytic and empirical bias correction (DFQ §4.2; white paper §3.3);
* ``adaround``: learned rounding, layer by layer (Nagel et al. 2020; white paper §3.4);
* ``pipeline``: the white paper's standard PTQ pipeline and its debugging flow (§3.6, §3.7);
* ``easyquant``: scales searched layer by layer for the cosine of each layer's output
  (EasyQuant, Wu et al. 2020, eq. 4).

Book: chapter 5; EasyQuant in its own chapter.
"""

from .adaround import adaround
from .bias_correction import bias_correction_analytic, bias_correction_empirical, relu6_mean, relu_mean
from .channels import weight_ranges
from .cle import CLEPair, CLEReport, cross_layer_equalization, find_equalization_chains, high_bias_absorption
from .easyquant import EASYQUANT_VARIANTS, EasyQuantLayer, easyquant, easyquant_baseline, easyquant_config
from .pipeline import (BIAS_CORRECTIONS, PipelineResult, pipeline_accuracies, pipeline_accuracy,
                       quantization_sensitivity, standard_pipeline, with_config)

__all__ = [
    "cross_layer_equalization", "CLEReport", "CLEPair", "high_bias_absorption", "find_equalization_chains",
    "bias_correction_empirical", "bias_correction_analytic", "weight_ranges", "relu_mean", "relu6_mean",
    "adaround", "standard_pipeline", "PipelineResult", "pipeline_accuracy", "pipeline_accuracies",
    "quantization_sensitivity", "with_config", "BIAS_CORRECTIONS",
    "easyquant", "easyquant_config", "easyquant_baseline", "EasyQuantLayer", "EASYQUANT_VARIANTS",
]

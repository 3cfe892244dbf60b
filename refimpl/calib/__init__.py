"""Quantization range setting: pure functions that choose the range (xmin, xmax) of a quantizer.

The white paper (Nagel et al. 2021, "A White Paper on Neural Network Quantization") §3.1
"Quantization range setting" lists min-max, MSE, cross-entropy and BN-based ranges; to these we
add the running (exponential moving average) min-max of quantization-aware training, percentile
clipping, and the KL-divergence ("entropy") calibration of TensorRT (Migacz 2017, "8-bit
Inference with TensorRT") together with onnxruntime's variant of it. Book chapter 3, "Range
setting", uses and compares them all.

Every range function returns ``(xmin, xmax)``: float32 tensors on the input's device, 0-d when
``spec.axis is None`` and 1-d (one value per slice along ``spec.axis``) otherwise, ready for
``refimpl.quant.qparams(xmin, xmax, spec)``. Nothing here keeps state between calls: the running
statistics of ``ema_minmax`` are passed in and returned.

One file per job: ``ranges`` (min-max, its running average, percentiles), ``mse``,
``cross_entropy`` (both on ``scale_search``), ``entropy`` (TensorRT's and onnxruntime's KL
calibration), ``bn`` (BatchNorm-based), ``aciq`` (the clipping-versus-rounding curve, measured and
analytic), ``compare`` (named range methods, applying and comparing them); ``common`` holds what
they share.

>>> import torch
>>> from refimpl.calib import minmax
>>> from refimpl.quant import QuantSpec
>>> minmax(torch.tensor([-1.0, 0.5, 2.0]), QuantSpec(8))
(tensor(-1.), tensor(2.))
"""

from .aciq import DISTRIBUTIONS, aciq_mse, aciq_optimal_clip, quantization_mse, standard_samples
from .bn import batchnorm_beta_gamma, bn_based, bn_relu_ranges
from .compare import RANGE_METHODS, calibrate_ranges, ema_minmax_trace, range_method_fn, range_report
from .cross_entropy import cross_entropy
from .entropy import entropy_onnxruntime, kl_onnxruntime, kl_tensorrt
from .mse import mse
from .ranges import ema_minmax, minmax, percentile

__all__ = [
    "minmax", "ema_minmax", "percentile", "mse", "cross_entropy", "kl_tensorrt", "kl_onnxruntime",
    "entropy_onnxruntime", "bn_based", "batchnorm_beta_gamma", "bn_relu_ranges",
    "DISTRIBUTIONS", "standard_samples", "quantization_mse", "aciq_mse", "aciq_optimal_clip",
    "RANGE_METHODS", "range_method_fn", "calibrate_ranges", "range_report", "ema_minmax_trace",
]

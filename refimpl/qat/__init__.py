"""Quantization-aware training (QAT): the straight-through gradients and the white paper's QAT pipeline.

White paper: Nagel et al. 2021, "A White Paper on Neural Network Quantization" (arXiv 2106.08295),
§4 "Quantization-aware training": §4.1 "Simulating quantization for backward path" (the
straight-through estimator, STE), §4.2 "Batch normalization folding and QAT", §4.3
"Initialization for QAT", §4.4 "Standard QAT pipeline" (Fig. 11 there, the flowchart).

* :func:`ste_gradients` (``refimpl.qat.ste``) -- the closed-form local derivatives of the
  asymmetric fake quantizer x_hat = s * (clamp(round(x/s) + z, qmin, qmax) - z) (white paper
  eq. 7) w.r.t. x, the scale s and the zero point z, under the STE d round(y)/dy := 1, in the
  three regions (inside the grid, clipped below, clipped above); :func:`gradient_check`
  compares them with autograd and finite differences (the chapter's table).
* :func:`qat_pipeline` (``refimpl.qat.pipeline``) -- fold BN, quantize, PTQ-initialise the
  ranges, learn weights and quantization parameters with Adam.
* :func:`mqbench_qat` (``refimpl.qat.mqbench``) -- one QAT algorithm under one hardware
  backend's rules (MQBench, Li et al. 2021), the cell of its benchmark table.
"""

from .mqbench import MQBENCH_ALGORITHMS, Algorithm, mqbench_qat
from .pipeline import BN_MODES, qat_kinds, qat_pipeline
from .ste import REGIONS, gradient_check, ste_gradients

__all__ = ["ste_gradients", "gradient_check", "qat_pipeline", "qat_kinds", "BN_MODES", "mqbench_qat",
           "MQBENCH_ALGORITHMS", "Algorithm"]

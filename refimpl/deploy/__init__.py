"""A trained model as deployed integer code sees it (book chapter 4, "Integer inference on ARM").

``refimpl.deploy.gemm``: a trained convolution lowered to the integer GEMM operands that
:func:`refimpl.neon.run_gemm` executes, with PyTorch's integer and quantized convolutions as
references.

``refimpl.deploy.integer``: the same model as integer-only steps in NumPy (int32 accumulators,
fixed-point requantisation), with PyTorch's quantized kernels as the per-layer reference.
``refimpl.deploy.grid``: the affine grid a runtime executes for a quantizer (shared check).
``refimpl.deploy.torchq``: PyTorch's quantized engine as the integer reference (shared by both).

``refimpl.deploy.onnx``: a calibrated, frozen ``quantize_model`` graph exported to ONNX in QDQ form
(QuantizeLinear/DequantizeLinear), which onnxruntime runs; and a float model's ONNX graph
(``export_float``), translated by the same code.

``refimpl.deploy.ort``: onnxruntime's own static quantization of that float graph, the grids it
chose, the kernels onnxruntime runs after optimising a graph, and interleaved latency timing.
"""

from .gemm import IntegerConv, integer_conv_operands, torch_integer_conv, torch_quantized_conv
from .grid import affine_grid
from .integer import (ADD_LEFT_SHIFT, REQUANT_MODES, Grid, IntegerModel, IntegerStep, integer_model, layer_accumulators, layer_operands,
                      pair_saturating_matmul, simulated_codes, site_agreement, torch_quantized_layer)
from .onnx import ONNX_OPSET, SITE_TENSORS_KEY, export_float, export_qdq, site_tensors
from .ort import (ORT_METHODS, ORT_TYPES, calibration_ranges, ort_latency, ort_optimized_ops, ort_quantize_static,
                  ort_run, ort_session)

__all__ = ["IntegerConv", "integer_conv_operands", "torch_integer_conv", "torch_quantized_conv", "affine_grid",
           "REQUANT_MODES", "ADD_LEFT_SHIFT", "Grid", "IntegerStep", "IntegerModel", "integer_model",
           "simulated_codes", "site_agreement", "torch_quantized_layer", "layer_operands", "layer_accumulators", "pair_saturating_matmul",
           "ONNX_OPSET", "SITE_TENSORS_KEY", "export_qdq", "export_float", "site_tensors", "ORT_METHODS", "ORT_TYPES", "ort_quantize_static",
           "calibration_ranges", "ort_session", "ort_run", "ort_optimized_ops", "ort_latency"]

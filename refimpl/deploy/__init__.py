"""A trained model as deployed integer code sees it (book chapter 4, "Integer inference on ARM").

``refimpl.deploy.gemm``: a trained convolution lowered to the integer GEMM operands that
:func:`refimpl.neon.run_gemm` executes, with PyTorch's integer and quantized convolutions as
references.

``refimpl.deploy.integer``: the same model as integer-only steps in NumPy (int32 accumulators,
fixed-point requantisation), with PyTorch's quantized kernels as the per-layer reference.
``refimpl.deploy.grid``: the affine grid a runtime executes for a quantizer (shared check).

``refimpl.deploy.onnx``: a calibrated, frozen ``quantize_model`` graph exported to ONNX in QDQ form
(QuantizeLinear/DequantizeLinear), which onnxruntime runs.
"""

from .gemm import IntegerConv, integer_conv_operands, torch_integer_conv, torch_quantized_conv
from .grid import affine_grid
from .integer import (ADD_LEFT_SHIFT, REQUANT_MODES, Grid, IntegerModel, IntegerStep, integer_model, layer_operands, pair_saturating_matmul, simulated_codes,
                      site_agreement, torch_quantized_layer)
from .onnx import ONNX_OPSET, export_qdq

__all__ = ["IntegerConv", "integer_conv_operands", "torch_integer_conv", "torch_quantized_conv", "affine_grid",
           "REQUANT_MODES", "ADD_LEFT_SHIFT", "Grid", "IntegerStep", "IntegerModel", "integer_model",
           "simulated_codes", "site_agreement",
           "torch_quantized_layer", "layer_operands", "pair_saturating_matmul", "ONNX_OPSET", "export_qdq"]

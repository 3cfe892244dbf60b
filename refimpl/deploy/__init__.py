"""A trained model as deployed integer code sees it (book chapter 4, "Integer inference on ARM").

``refimpl.deploy.gemm``: a trained convolution lowered to the integer GEMM operands that
:func:`refimpl.neon.run_gemm` executes, with PyTorch's integer and quantized convolutions as
references.
"""

from .gemm import IntegerConv, integer_conv_operands, torch_integer_conv, torch_quantized_conv

__all__ = ["IntegerConv", "integer_conv_operands", "torch_integer_conv", "torch_quantized_conv"]

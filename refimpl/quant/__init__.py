"""Uniform quantization: the integer grid (``QuantSpec``), its parameters and the (fake) quantizer.

>>> from refimpl.quant import QuantSpec, qparams, quantize, dequantize, fake_quant
"""

from .functional import (
    ROUNDING_MODES,
    dequantize,
    fake_quant,
    lsq_fake_quant,
    lsq_grad_scale,
    qparams,
    quantize,
    round_to_int,
)
from .spec import QuantSpec

__all__ = [
    "QuantSpec", "qparams", "quantize", "dequantize", "fake_quant", "round_to_int",
    "lsq_fake_quant", "lsq_grad_scale", "ROUNDING_MODES",
]

"""Uniform quantization: the integer grid (``QuantSpec``), its parameters and the (fake) quantizer.

>>> from refimpl.quant import QuantSpec, qparams, quantize, dequantize, fake_quant
"""

from .dsq import dsq, dsq_hard, dsq_phi, dsq_ste
from .functional import (
    ROUNDING_MODES,
    broadcast_qparams,
    dequantize,
    fake_quant,
    in_grid,
    lsq_fake_quant,
    lsq_grad_scale,
    pot_scale,
    qparams,
    quantize,
    round_to_int,
)
from .apot import (apot_alpha_search, apot_levels, apot_quant, apot_terms, apot_weight_terms,
                   bitshift_dot, log_levels, log_quant, pot_levels, pot_quant, weight_norm)
from .nonuniform import pow2_levels, quantize_to_levels
from .dorefa import dorefa_act, dorefa_normalize, dorefa_weight
from .pact import pact_quant, pact_range
from .qil import qil_act, qil_transform, qil_weight
from .pwlq import (
    PWLQ_BREAKPOINT_METHODS,
    PWLQ_SCHEMES,
    PWLQDecomposition,
    pwlq,
    pwlq_bias_correction,
    pwlq_breakpoint,
    pwlq_decompose,
)
from .spec import QuantSpec
from .ste import ste_derivatives, ste_fake_quant

__all__ = [
    "QuantSpec", "qparams", "quantize", "dequantize", "fake_quant", "round_to_int", "in_grid",
    "broadcast_qparams", "pow2_levels", "quantize_to_levels",
    "log_levels", "log_quant", "bitshift_dot", "pot_levels", "pot_quant", "apot_levels", "apot_quant", "apot_terms", "apot_weight_terms", "apot_alpha_search", "weight_norm",
    "pwlq", "pwlq_breakpoint", "pwlq_bias_correction", "pwlq_decompose", "PWLQDecomposition",
    "PWLQ_SCHEMES", "PWLQ_BREAKPOINT_METHODS",
    "lsq_fake_quant", "lsq_grad_scale", "pot_scale", "ROUNDING_MODES", "ste_fake_quant", "ste_derivatives",
    "dsq", "dsq_hard", "dsq_phi", "dsq_ste",
    "pact_quant", "pact_range", "dorefa_normalize", "dorefa_weight", "dorefa_act",
    "qil_transform", "qil_weight", "qil_act",
]

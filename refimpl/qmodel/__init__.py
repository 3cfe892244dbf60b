"""Simulated quantization of a whole model: quantizers inserted into a torch.fx graph.

White paper (Nagel et al. 2021, arXiv 2106.08295) §2.3 "Quantization simulation", Fig. 4; §3
(PTQ): weight ranges are static and set at insertion, activation ranges are calibrated; §4
(QAT): quantizers with learnable parameters. The package, by job:

* ``config``: :class:`QuantConfig`, how a model is quantized;
* ``backends``: :class:`Backend`, a deployment target's rules as data (MQBench's table:
  ``get_backend``, ``backend_names``, ``register_backend``);
* ``observers``: :class:`Observer`, statistics for activation ranges;
* ``quantizers``: :class:`WeightQuantizer`, :class:`ActQuantizer` and the registry of quantizer
  kinds (``register_kind``, ``quantizer_kinds``): "fixed", "ste", "lsq", "pwlq", "dsq", "pot",
  "apot", and each new kind;
* ``learned_kinds``: the kinds "pact", "dorefa" and "qil" (MQBench's QAT algorithms), registered
  on import;
* ``layers``: ``QuantConv1d/2d/3d``, ``QuantLinear``;
* ``insertion``: :func:`quantize_model` (where quantizers sit), :func:`first_last_bits`,
  :func:`input_sites`;
* ``control``: :func:`calibrate`, :func:`set_quant_state`, :func:`set_trainable`,
  :func:`set_kind_options`, :func:`freeze`, :func:`merge_bn` and the accessors;
* ``bnfold``: MQBench's BN-folding strategies for QAT (:data:`BN_FOLDS`): :func:`fuse_bn`,
  :func:`unfuse_bn` and the fused modules ``QuantConvBN1d/2d/3d``, ``QuantLinearBN``.

Activation quantizers have three states: ``"observe"`` (pass through, record statistics),
``"quantize"`` and ``"off"``. What it cannot handle: models torch.fx cannot trace symbolically
(ValueError quoting torch.fx's message); BatchNorm (fold it first, or ``keep_bn=True`` and
``merge_bn`` after QAT).

>>> import torch
>>> from refimpl.fold import fold_all_bn
>>> from refimpl.models import ResNetCNN
>>> model = ResNetCNN(1, 10, width=4, num_blocks=1).eval()
>>> qm = quantize_model(fold_all_bn(model), QuantConfig(weight_bits=8, act_bits=8))
>>> calibrate(qm, torch.randn(16, 1, 8, 8))
>>> list(act_quantizers(qm))[:2]
['input', 'stem.conv']
"""

from ..quant import ste_fake_quant
from .backends import BACKENDS, Backend, backend_names, get_backend, register_backend
from .bnfold import (BN_FOLDS, FUSED_CLASSES, QuantConvBN1d, QuantConvBN2d, QuantConvBN3d, QuantLayerBN,
                     QuantLinearBN, fuse_bn, fuse_layer_bn, unfuse_bn)
from .config import ACT_RANGES, INSERTION_PATTERNS, WEIGHT_RANGES, QuantConfig
from .control import (act_quantizers, calibrate, freeze, merge_bn, quant_layers, set_kind_options, set_quant_state,
                      set_trainable, weight_quantizers)
from .insertion import first_last_bits, input_sites, quantize_model
from .layers import QUANT_CLASSES, QuantConv1d, QuantConv2d, QuantConv3d, QuantLayer, QuantLinear
from .observers import KEPT_SAMPLES, Observer, tensor_range
from .quantizers import (ACT_STATES, ActQuantizer, Quantizer, QuantizerKind, WeightQuantizer, get_kind,
                         quantizer_kinds, register_kind, unregister_kind)
from . import learned_kinds  # noqa: F401  (registers "pact", "dorefa", "qil")

__all__ = [
    "QuantConfig", "WEIGHT_RANGES", "ACT_RANGES", "INSERTION_PATTERNS", "Backend", "BACKENDS", "get_backend",
    "backend_names", "register_backend", "Observer", "KEPT_SAMPLES", "tensor_range",
    "QuantizerKind", "register_kind", "unregister_kind", "quantizer_kinds", "get_kind", "Quantizer", "WeightQuantizer",
    "ActQuantizer", "ACT_STATES", "QuantLayer", "QuantConv1d", "QuantConv2d", "QuantConv3d", "QuantLinear",
    "QUANT_CLASSES", "quantize_model", "input_sites", "first_last_bits", "calibrate", "set_quant_state",
    "set_trainable", "set_kind_options", "freeze", "weight_quantizers", "act_quantizers", "quant_layers", "merge_bn", "ste_fake_quant",
    "BN_FOLDS", "QuantLayerBN", "QuantConvBN1d", "QuantConvBN2d", "QuantConvBN3d", "QuantLinearBN", "FUSED_CLASSES",
    "fuse_layer_bn", "fuse_bn", "unfuse_bn",
]

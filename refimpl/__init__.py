"""refimpl: a reference implementation of neural-network quantization.

Layers, bottom to top (a module imports only its own layer or lower ones; README, "Layout of
refimpl"; tests/test_layers.py):

0. ``refimpl.numerics`` (the configuration under which results are bit-identical on every x86-64
   CPU with AVX2; a portable ``sqrt``), ``refimpl._checks``, ``refimpl._api``;
1. pure math: ``refimpl.quant`` (grids, fake quantization, STE, LSQ, AdaRound's soft weight,
   integer arithmetic), ``refimpl.calib`` (range setting), ``refimpl.metrics``; beside them
   ``refimpl.neon``, the AArch64 NEON simulator (numpy only, never imports torch or any other
   refimpl module);
2. state and structure: ``refimpl.quant.modules``, ``refimpl.models``, ``refimpl.graph``
   (tracing, layer and activation kinds), ``refimpl.capture`` (activation capture), and
   ``refimpl.qmodel``'s config, observers, quantizers (the registry of quantizer kinds) and layers;
3. model-level transforms: ``refimpl.qmodel`` (insertion, control), ``refimpl.fold``,
   ``refimpl.simulate``, ``refimpl.data``, ``refimpl.train``;
4. algorithms and pipelines: ``refimpl.ptq``, ``refimpl.qat``, ``refimpl.deploy``, ``refimpl.zoo``;
5. the chapters' support: ``refimpl.book``.
"""

__version__ = "0.1.0"

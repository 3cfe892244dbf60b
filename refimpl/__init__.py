"""refimpl: a reference implementation of neural-network quantization.

Layers, bottom to top (a lower layer never imports an upper one):

* pure tensor math, no state: ``refimpl.numerics`` (the configuration under which results are
  bit-identical on every x86-64 CPU with AVX2; a portable ``sqrt``), ``refimpl.quant``
  (``functional``, ``integer``, ``nonuniform``), ``refimpl.calib``, ``refimpl.metrics``; beside
  them ``refimpl.neon``, the AArch64 NEON simulator (numpy only, never imports torch or any other
  refimpl module);
* modules holding learnable or observed state: ``refimpl.quant.modules``, ``refimpl.models``;
* model-level transforms and pipelines: ``refimpl.transforms``, ``refimpl.hooks``,
  ``refimpl.analysis``, ``refimpl.data``, ``refimpl.train``, ``refimpl.deploy`` (a trained
  layer as the integer operands a deployed kernel, or ``refimpl.neon``, runs);
* the chapters' support: ``refimpl.book``, ``refimpl.plots``, ``refimpl.experiments``.
"""

__version__ = "0.1.0"

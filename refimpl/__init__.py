"""refimpl: a reference implementation of neural-network quantization.

Layers, bottom to top (a lower layer never imports an upper one):

* ``refimpl.quant.functional``, ``refimpl.calib`` — pure tensor math, no state;
* ``refimpl.quant.modules`` — ``nn.Module`` s holding learnable or observed state;
* ``refimpl.data``, ``refimpl.models``, ``refimpl.train`` — data, models, training;
* ``refimpl.book`` — notebook set-up and plotting helpers for the chapters.
"""

__version__ = "0.1.0"

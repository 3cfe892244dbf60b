"""The affine grid a deployed runtime executes for one of ``refimpl.qmodel``'s quantizers.

Shared by the ONNX export (:mod:`refimpl.deploy.onnx`) and integer-only inference
(:mod:`refimpl.deploy.integer`): both can run a quantizer only when its forward pass *is* the affine
grid of its ``export()`` (white paper eqs. 4-6), at most 8 bits wide.
"""

from __future__ import annotations

import numpy as np
import torch

from ..qmodel import Quantizer

__all__ = ["affine_grid"]


def affine_grid(q: Quantizer, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(scale float32, zero point int64) numpy arrays of a quantizer a runtime can run exactly.

    q: a ``refimpl.qmodel`` weight or activation quantizer of kind "fixed" (``refimpl.qmodel.freeze``
    turns the trained kinds into it), ``spec.bits`` <= 8. Shapes: () per tensor, (C,) per channel.
    where: how error messages name the quantizer ("weight of layer 'head'", "activation site 'pool'").
    Raises TypeError for a kind whose forward is not an affine grid (PoT/APoT/PWLQ grids, DoReFa,
    PACT and QIL weights, quoting the kind's own reason) or a training form ("dsq", "lsq" before
    ``freeze``); ValueError for more than 8 bits, a zero point outside int8/uint8, or a scale that is
    not finite and positive.

    Used by :func:`refimpl.deploy.integer.integer_model`.
    """
    if q.kind != "fixed":
        try:
            q.export()
        except TypeError as e:
            raise TypeError(f"{where}: quantizer kind {q.kind!r} is not an affine grid a runtime can "
                            f"execute: {e}") from None
        if q.kind_impl.affine:
            raise TypeError(f"{where}: quantizer kind {q.kind!r} is a training form whose forward is not the "
                            "affine grid it exports; call refimpl.qmodel.freeze(qmodel) to switch it to the "
                            "'fixed' grid")
        raise TypeError(f"{where}: quantizer kind {q.kind!r} is not deployed: only 'fixed' quantizers are, whose "
                        "forward is exactly the affine grid of export()")
    spec = q.spec
    if spec.bits > 8:
        raise ValueError(f"{where}: a {spec.bits}-bit grid does not fit int8/uint8; deployment handles up to "
                         "8 bits")
    grid = q.export()
    scale = grid["scale"].detach().cpu().to(torch.float32).numpy()
    zp = grid["zero_point"].detach().cpu().to(torch.int64).numpy()
    info = np.iinfo(np.int8 if spec.signed else np.uint8)
    if bool((zp < info.min).any()) or bool((zp > info.max).any()):
        raise ValueError(f"{where}: zero point {zp.tolist()} outside [{info.min}, {info.max}]")
    if not bool(np.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise ValueError(f"{where}: scale must be finite and > 0, got {scale.tolist()}")
    return scale, zp

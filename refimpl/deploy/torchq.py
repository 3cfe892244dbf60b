"""PyTorch's quantized CPU kernels as a reference for deployed integer code.

PyTorch 2.13 deprecates its quantized tensors, but its quantized kernels (QNNPACK, FBGEMM/x86) are
still the independent integer implementation the book checks against: chapter 4 (one convolution
through ``refimpl.deploy.gemm``) and chapter 12 (every layer of ``refimpl.deploy.integer``).
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch

__all__ = ["quantized_engine", "as_quint8"]


@contextlib.contextmanager
def quantized_engine(engine: str = "qnnpack"):
    """Run the block with ``torch.backends.quantized.engine = engine``, restored afterwards.

    engine: one of ``torch.backends.quantized.supported_engines`` (ValueError otherwise);
    "qnnpack" is PyTorch's ARM backend, "x86"/"fbgemm" its x86 one. The deprecation warning of
    quantized tensor creation is silenced inside the block.

    Used by :func:`refimpl.deploy.gemm.torch_quantized_conv` and
    :func:`refimpl.deploy.integer.torch_quantized_layer`.
    """
    engines = torch.backends.quantized.supported_engines
    if engine not in engines:
        raise ValueError(f"engine must be one of {engines}, got {engine!r}")
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            yield
    finally:
        torch.backends.quantized.engine = previous


def as_quint8(codes, scale: float, zero_point: int, signed: bool) -> torch.Tensor:
    """Integer codes as a PyTorch quint8 tensor; a signed grid is carried shifted by 128 (zero point
    too), the same integers once a kernel subtracts the zero point.

    codes: integer numpy array or tensor of codes on the grid (int8 range if signed, uint8 if not).
    Returns a per-tensor quint8 tensor on the CPU. Call inside :func:`quantized_engine`.
    """
    off = 128 if signed else 0
    q = torch.as_tensor(np.asarray(codes, dtype=np.int64) + off)
    return torch._make_per_tensor_quantized_tensor(q.to(torch.uint8).cpu(), float(scale), int(zero_point) + off)

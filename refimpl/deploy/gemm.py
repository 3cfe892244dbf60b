"""A trained convolution lowered to the integer GEMM operands a deployed kernel runs, and PyTorch's
own integer conv as reference (book chapter 4, "Integer inference on ARM").

:func:`integer_conv_operands` quantizes a real ``nn.Conv2d`` and a real input batch (activations
per-tensor symmetric int8, weights per-output-channel symmetric narrow-range int8, white paper
§2.2-2.3) and lowers the convolution to a GEMM by im2col, the (M, K) x (K, O) form that
:func:`refimpl.neon.run_gemm` executes. Two independent references close the loop:
:func:`torch_integer_conv` (``torch.nn.functional.conv2d`` on the integer codes in float64,
exact for any realistic K) for the int32 accumulators, and :func:`torch_quantized_conv`
(PyTorch's quantized engine, ``torch.ao.nn.quantized.functional.conv2d``) for the requantized
int8 output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .._checks import check_int
from ..calib import minmax
from ..quant import QuantSpec, qparams, quantize
from ..quant.integer import im2col
from .torchq import as_quint8, quantized_engine

__all__ = ["IntegerConv", "integer_conv_operands", "torch_integer_conv", "torch_quantized_conv"]


@dataclass
class IntegerConv:
    """The integer operands of one convolution lowered to a GEMM.

    a_codes: (M, K) int8, M = N * H_out * W_out im2col rows, K = C * kh * kw.
    w_codes: (K, O) int8, the weight codes, one column per output channel.
    act_scale: the activations' per-tensor step size (zero_point 0).
    weight_scale: (O,) float64, the weights' per-channel step sizes (zero_point 0).
    x_codes: (N, C, H, W) int8 tensor and w_codes_oihw: (O, C, kh, kw) int8 tensor, the same codes
    before lowering; out_shape (N, O, H_out, W_out); stride and padding of the convolution.
    """
    a_codes: np.ndarray
    w_codes: np.ndarray
    act_scale: float
    weight_scale: np.ndarray
    x_codes: torch.Tensor
    w_codes_oihw: torch.Tensor
    out_shape: tuple
    stride: int
    padding: int

    def to_nchw(self, gemm_out: np.ndarray) -> np.ndarray:
        """(M, O) GEMM rows back to the (N, O, H_out, W_out) layout of the convolution."""
        n, o, h, w = self.out_shape
        if gemm_out.shape != (n * h * w, o):
            raise ValueError(f"gemm_out must have shape {(n * h * w, o)}, got {gemm_out.shape}")
        return gemm_out.reshape(n, h, w, o).transpose(0, 3, 1, 2)

    def real_scale(self, out_scale: float) -> np.ndarray:
        """(O,) float64: the factor act_scale * weight_scale / out_scale that requantizes int32
        accumulators to an output grid of step ``out_scale`` (Jacob et al. 2018, eq. 5)."""
        if not out_scale > 0:
            raise ValueError(f"out_scale must be > 0, got {out_scale}")
        return self.act_scale * self.weight_scale / out_scale


def _square(v, name):
    v = v if isinstance(v, tuple) else (v, v)
    if v[0] != v[1]:
        raise ValueError(f"only square {name} is supported, got {v}")
    return int(v[0])


def integer_conv_operands(conv: nn.Conv2d, x: torch.Tensor, act_bits: int = 8,
                          weight_bits: int = 8) -> IntegerConv:
    """Quantize ``conv``'s weights and its input ``x`` and lower the convolution to GEMM operands.

    Activations: signed symmetric per-tensor, min-max range (white paper §3.1); weights: signed
    symmetric narrow-range per-output-channel (gemmlowp's [-127, 127], which keeps SMULL+SMLAL
    pairs from overflowing int16). conv: an ungrouped, undilated ``nn.Conv2d`` with square
    kernel, stride and padding and zero padding mode; x: float (N, C, H, W). The bias is not part
    of the integer GEMM. act_bits, weight_bits: 2..8.

    Used in :ref:`ch4-sec-a-real-layer-through-a-kernel`.
    """
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1 or conv.dilation not in ((1, 1), 1) or conv.padding_mode != "zeros":
        raise ValueError("conv must have groups=1, dilation=1 and padding_mode='zeros'")
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != conv.in_channels:
        raise ValueError(f"x must be a (N, {conv.in_channels}, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    act_bits = check_int(act_bits, "act_bits", 2, 8)
    weight_bits = check_int(weight_bits, "weight_bits", 2, 8)
    stride, padding = _square(conv.stride, "stride"), _square(conv.padding, "padding")
    kh, kw = conv.kernel_size
    with torch.no_grad():
        a_spec = QuantSpec(act_bits)
        a_scale, a_zp = qparams(*minmax(x, a_spec), a_spec)
        x_codes = quantize(x, a_scale, a_zp, a_spec)
        w = conv.weight.detach()
        w_spec = QuantSpec(weight_bits, narrow_range=True, axis=0)
        w_scale, w_zp = qparams(*minmax(w, w_spec), w_spec)
        w_codes = quantize(w, w_scale, w_zp, w_spec)
    n, _, h, wd = x.shape
    h_out, w_out = (h + 2 * padding - kh) // stride + 1, (wd + 2 * padding - kw) // stride + 1
    a = im2col(x_codes, (kh, kw), stride, padding).cpu().numpy().astype(np.int8)
    b = w_codes.reshape(conv.out_channels, -1).T.contiguous().cpu().numpy().astype(np.int8)
    return IntegerConv(a, b, float(a_scale), w_scale.double().cpu().numpy(), x_codes, w_codes,
                       (n, conv.out_channels, h_out, w_out), stride, padding)


def torch_integer_conv(op: IntegerConv) -> np.ndarray:
    """The exact int32 accumulators of ``op`` by ``torch.nn.functional.conv2d`` on the codes.

    float64 represents every partial sum exactly while K * 2^14 < 2^53. Returns (N, O, H_out,
    W_out) int64.

    Used in :ref:`ch4-sec-a-real-layer-through-a-kernel`.
    """
    out = torch.nn.functional.conv2d(op.x_codes.double(), op.w_codes_oihw.double(),
                                     stride=op.stride, padding=op.padding)
    return out.round().to(torch.int64).cpu().numpy()


def torch_quantized_conv(op: IntegerConv, out_scale: float, out_zero_point: int = 0,
                         engine: str | None = None) -> np.ndarray:
    """``op`` through PyTorch's quantized conv (default engine QNNPACK, its ARM backend), to int8.

    The signed codes are carried as quint8 with zero_point 128 (the same integers after the
    kernel subtracts it); the output grid is step ``out_scale`` with signed zero point
    ``out_zero_point``. PyTorch requantizes in float (acc * real scale, rounded to nearest),
    so it may differ from a fixed-point epilogue by one code on near-ties. With engine "x86"
    (FBGEMM) and activation codes above 127 the result departs from the exact one (measured
    here); PyTorch's x86 observers default to ``reduce_range=True`` (7-bit activations) for
    this reason. Returns (N, O, H_out, W_out) int64 codes in [-128, 127].

    Used in :ref:`ch4-sec-a-real-layer-through-a-kernel`.
    """
    out_zero_point = check_int(out_zero_point, "out_zero_point", -128, 127)
    if not out_scale > 0:
        raise ValueError(f"out_scale must be > 0, got {out_scale}")
    with quantized_engine(engine or "qnnpack"):
        qx = as_quint8(op.x_codes.cpu(), op.act_scale, 0, signed=True)
        scales = torch.as_tensor(op.weight_scale, dtype=torch.float64)
        qw = torch._make_per_channel_quantized_tensor(
            op.w_codes_oihw.to(torch.int8).cpu(), scales, torch.zeros_like(scales, dtype=torch.int64), 0)
        out = torch.ao.nn.quantized.functional.conv2d(
            qx, qw, bias=None, stride=op.stride, padding=op.padding, scale=out_scale,
            zero_point=out_zero_point + 128, dtype=torch.quint8)
    return out.int_repr().to(torch.int64).numpy() - 128

"""Integer arithmetic as deployed kernels do it: fixed-width accumulators that wrap or saturate."""

from __future__ import annotations

import torch

from .._checks import check_choice, check_int

__all__ = ["wrap_to_bits", "saturate_to_bits", "integer_matmul", "im2col", "integer_conv2d"]

OVERFLOW_MODES = ("wrap", "saturate")
_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _check_int_tensor(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")


def wrap_to_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Two's-complement wrap-around of integers to a signed ``bits``-wide register (int64 result)."""
    _check_int_tensor(x, "x")
    bits = check_int(bits, "bits", 2, 63)
    m = 1 << bits
    return torch.remainder(x.to(torch.int64) + (m >> 1), m) - (m >> 1)


def saturate_to_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Clamp integers to a signed ``bits``-wide register's range (int64 result)."""
    _check_int_tensor(x, "x")
    bits = check_int(bits, "bits", 2, 63)
    return torch.clamp(x.to(torch.int64), -(1 << (bits - 1)), (1 << (bits - 1)) - 1)


def integer_matmul(qa: torch.Tensor, qb: torch.Tensor, acc_bits: int = 32, overflow: str = "wrap"
                   ) -> torch.Tensor:
    """qa @ qb accumulated in a signed ``acc_bits``-wide register, product by product along K.

    qa: (M, K), qb: (K, N) integer tensors. Each step adds one product qa[:, k] * qb[k, :] to the
    accumulator and wraps (two's complement, as ADD/MLA on integer lanes) or saturates (as
    saturating instructions such as SQADD) — so with ``saturate`` the result depends on the order.
    Returns (M, N) int64 holding the register's values.
    """
    _check_int_tensor(qa, "qa")
    _check_int_tensor(qb, "qb")
    check_choice(overflow, "overflow", OVERFLOW_MODES)
    acc_bits = check_int(acc_bits, "acc_bits", 2, 63)
    if qa.ndim != 2 or qb.ndim != 2 or qa.shape[1] != qb.shape[0]:
        raise ValueError(f"qa and qb must be (M, K) and (K, N) matrices, got {tuple(qa.shape)} and {tuple(qb.shape)}")
    a, b = qa.to(torch.int64), qb.to(torch.int64)
    if overflow == "wrap":
        # wrap-around addition is associative modulo 2^acc_bits: one exact product, then one wrap
        return wrap_to_bits(a @ b, acc_bits)
    acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int64, device=a.device)
    for k in range(a.shape[1]):
        acc = saturate_to_bits(acc + a[:, k, None] * b[None, k, :], acc_bits)
    return acc


def im2col(qx: torch.Tensor, kernel_size: tuple[int, int], stride: int = 1, padding: int = 0
           ) -> torch.Tensor:
    """Integer codes of every receptive field as rows: the GEMM operand of a lowered convolution.

    qx: (N, C, H, W) integer tensor. Returns (N * H_out * W_out, C * kh * kw) int64, rows in
    (n, h_out, w_out) order and columns in (c, i, j) order, matching ``qw.reshape(O, -1)``.
    Padding inserts the code 0 (real zero only for zero-point-free codes).
    """
    _check_int_tensor(qx, "qx")
    if qx.ndim != 4:
        raise ValueError(f"qx must be (N, C, H, W), got shape {tuple(qx.shape)}")
    if not (isinstance(kernel_size, (tuple, list)) and len(kernel_size) == 2):
        raise TypeError(f"kernel_size must be a (kh, kw) pair, got {kernel_size!r}")
    kh, kw = (check_int(k, "kernel_size", 1) for k in kernel_size)
    stride = check_int(stride, "stride", 1)
    padding = check_int(padding, "padding", 0)
    _, c, h, w = qx.shape
    if h + 2 * padding < kh or w + 2 * padding < kw:
        raise ValueError(f"the kernel {kh}x{kw} does not fit the padded input {h + 2 * padding}x{w + 2 * padding}")
    # unfold needs floats; float64 holds every integer code exactly
    cols = torch.nn.functional.unfold(qx.to(torch.float64), (kh, kw), padding=padding, stride=stride)
    return cols.transpose(1, 2).reshape(-1, c * kh * kw).to(torch.int64)


def integer_conv2d(qx: torch.Tensor, qw: torch.Tensor, stride: int = 1, padding: int = 0, acc_bits: int = 32,
                   overflow: str = "wrap") -> torch.Tensor:
    """2-D convolution of integer codes accumulated in a signed ``acc_bits``-wide register.

    Lowered to ``integer_matmul`` by im2col, as integer kernels do: each output position is a row
    of K = C * kh * kw input codes, multiplied by the (K, O) weight matrix. Zero padding inserts
    the code 0, which is real zero only for zero-point-free codes: subtract zero-points first.
    qx: (N, C, H, W) and qw: (O, C, kh, kw) integer tensors. Returns (N, O, H_out, W_out) int64.

    Used in :ref:`ch2-sec-overflow`.
    """
    _check_int_tensor(qx, "qx")
    _check_int_tensor(qw, "qw")
    if qx.ndim != 4 or qw.ndim != 4 or qx.shape[1] != qw.shape[1]:
        raise ValueError(f"qx and qw must be (N, C, H, W) and (O, C, kh, kw) with the same C, "
                         f"got {tuple(qx.shape)} and {tuple(qw.shape)}")
    stride = check_int(stride, "stride", 1)
    padding = check_int(padding, "padding", 0)
    n, _, h, w = qx.shape
    o, c, kh, kw = qw.shape
    h_out, w_out = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    if h_out < 1 or w_out < 1:
        raise ValueError(f"the kernel {kh}x{kw} does not fit the padded input {h + 2 * padding}x{w + 2 * padding}")
    a = im2col(qx, (kh, kw), stride, padding)
    acc = integer_matmul(a, qw.reshape(o, -1).T.to(torch.int64), acc_bits=acc_bits, overflow=overflow)
    return acc.reshape(n, h_out * w_out, o).transpose(1, 2).reshape(n, o, h_out, w_out)

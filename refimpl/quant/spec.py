"""The integer grid of a uniform quantizer: bit-width, signedness, symmetry, granularity."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import check_int

__all__ = ["QuantSpec"]

MAX_BITS = 16


@dataclass(frozen=True)
class QuantSpec:
    """What a uniform quantizer's integer grid is (white paper, Nagel et al. 2021, §2.2).

    ::

        bits:          1..16, the width of the integer codes.
        signed:        codes in [-2^(b-1), 2^(b-1) - 1] (True) or [0, 2^b - 1] (False).
        symmetric:     zero_point fixed (0 for a signed grid, the grid's middle for an unsigned one)
                       and the range set by max|x|; otherwise asymmetric (affine) with a free zero_point.
        narrow_range:  drop the most negative code, so a signed grid is symmetric around 0
                       ([-127, 127] at 8 bits); an unsigned grid starts at 1.
        axis:          None for one (scale, zero_point) per tensor; an int for one per slice along
                       that dimension (per-channel).
        pot_scale:     the scale is a power of two (TVM's constraint, MQBench's "POT" scale form,
                       Li et al. 2021): every function of refimpl.quant that takes this spec uses
                       the nearest power of two of the scale it is given (``pot_scale``).

    Used in :ref:`ch1-sec-uniform-and-non-uniform-grids`, :ref:`ch2-sec-the-affine-map`,
    :ref:`ch3-sec-why-the-range-matters-clipping`,
    :ref:`ch6-sec-the-straight-through-estimator`, :ref:`ch8-sec-the-piecewise-grid`,
    :ref:`ch11-sec-the-algorithms`.
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    narrow_range: bool = False
    axis: int | None = None
    pot_scale: bool = False

    def __post_init__(self):
        check_int(self.bits, "bits", 1, MAX_BITS)
        for name in ("signed", "symmetric", "narrow_range", "pot_scale"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.axis is not None:
            check_int(self.axis, "axis")
        if self.narrow_range and self.bits == 1:
            raise ValueError("narrow_range=True needs bits >= 2 (a 1-bit narrow grid has a single code)")

    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        low = -(2 ** (self.bits - 1)) if self.signed else 0
        return low + 1 if self.narrow_range else low

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def num_levels(self) -> int:
        """Number of codes on the grid."""
        return self.qmax - self.qmin + 1

    @property
    def storage_dtype(self) -> torch.dtype:
        """Smallest torch integer dtype that holds every code (what ``quantize`` returns)."""
        if self.bits <= 8:
            return torch.int8 if self.signed else torch.uint8
        if self.signed or self.bits <= 15:
            return torch.int16
        return torch.int32

    @property
    def symmetric_zero_point(self) -> int:
        """The fixed zero_point of a symmetric grid: 0 when signed, else the middle code.

        The unsigned middle is rounded up, so the grid is the signed one shifted (128 at 8 bits,
        2^15 at 16 bits: PyTorch's observers pick the same for their default quint8/uint16 grids).
        """
        if self.signed:
            return 0
        return (self.qmin + self.qmax + 1) // 2

    def per_channel(self, axis: int) -> "QuantSpec":
        """The same grid with one (scale, zero_point) per slice along ``axis``."""
        return QuantSpec(self.bits, self.signed, self.symmetric, self.narrow_range, axis, self.pot_scale)

    def per_tensor(self) -> "QuantSpec":
        """The same grid with a single (scale, zero_point)."""
        return QuantSpec(self.bits, self.signed, self.symmetric, self.narrow_range, None, self.pot_scale)

    def __str__(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        sign = "int" if self.signed else "uint"
        gran = "per-tensor" if self.axis is None else f"per-channel(axis={self.axis})"
        narrow = ", narrow" if self.narrow_range else ""
        pot = ", pot-scale" if self.pot_scale else ""
        return f"{sign}{self.bits} {kind} {gran}{narrow}{pot} [{self.qmin}, {self.qmax}]"

"""DSQ's deployment argument on the simulator: int8 lanes that wrap under MLA, and the 2/3/4-bit
kernels against int8 ones.

DSQ (Gong et al., ICCV 2019, arXiv 1908.05033; its deployment section, whose text was not
available here beyond the abstract's "up to 1.7x speed up, compared with ... NCNN") multiplies
2-, 3- and 4-bit operands with ``MLA .16b`` into int8 lanes, ``max_accumulations(b, b, 8)`` =
31 / 7 / 1 times, before ``SADDW``/``SADDW2`` widen them (chapter 4's ``mla-lowbit`` kernel).

* :func:`mla_accumulate` runs ``MLA v2.16b, v0.16b, v1.16b`` again and again on a
  :class:`~refimpl.neon.Machine` and records every int8 lane against the exact sum, and where a
  lane first wraps (the int8 counterpart of :func:`refimpl.neon.int7.smlal_accumulate`).
* :data:`DSQ_CONFIGS`: the 2-, 3- and 4-bit ``mla-lowbit`` kernels and the int8 ``smlal`` and
  ``sdot`` kernels, for :func:`refimpl.neon.int7.compare_kernels`.
"""
from __future__ import annotations

from .int7 import AccumulationTrace, KernelConfig, lane_accumulate

__all__ = ["mla_accumulate", "DSQ_CONFIGS"]


def mla_accumulate(a, w, accumulations: int, *, core: str = "cortex-a53") -> AccumulationTrace:
    """Run ``MLA v2.16b, v0.16b, v1.16b`` ``accumulations`` times from a zero accumulator on the
    simulator and record every int8 lane against the exact sum (DSQ's MLA/SADDW count);
    :func:`refimpl.neon.int7.lane_accumulate` ``("mla", ...)``.

    ``a``, ``w``: the int8 operands of the sixteen lanes, scalars or arrays of 1..16 values
    (repeated to fill 16 lanes). ``accumulations`` in 1..4096; ``core``: one of
    :data:`~refimpl.neon.CORES`. Returns an :class:`~refimpl.neon.int7.AccumulationTrace` with
    (accumulations, 16) int8 ``lanes`` and int64 ``exact`` sums. With the worst-case b-bit
    product ``-2^(b-1) * -2^(b-1)`` the first wrap is at ``max_accumulations(b, b, 8) + 1``:
    32, 8 and 2 at 2, 3 and 4 bits.

    Used in :ref:`ch9-sec-what-a-bit-costs-on-arm`.
    """
    return lane_accumulate("mla", a, w, accumulations, core=core)


DSQ_CONFIGS: tuple[KernelConfig, ...] = (
    KernelConfig("int8 SMLAL", "smlal", 8),
    KernelConfig("int8 SDOT", "sdot", 8, baseline="int8 SMLAL"),
    KernelConfig("4-bit MLA", "mla-lowbit", 4, baseline="int8 SMLAL"),
    KernelConfig("3-bit MLA", "mla-lowbit", 3, baseline="int8 SMLAL"),
    KernelConfig("2-bit MLA", "mla-lowbit", 2, baseline="int8 SMLAL"),
)
"""DSQ's low-bit ``MLA`` kernels (2, 3, 4 bits; 31 / 7 / 1 products per int8 lane) and the int8
kernels they are measured against: gemmlowp-style ``SMLAL`` (the baseline of the speed-ups) and
``SDOT`` (ARMv8.2; absent on the A53 and A72), chapter 4's kernels.

Used in :ref:`ch9-sec-what-a-bit-costs-on-arm`.
"""

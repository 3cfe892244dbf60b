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

import numpy as np

from .int7 import AccumulationTrace, KernelConfig
from .machine import CORES, Machine, lanes

__all__ = ["mla_accumulate", "DSQ_CONFIGS"]


def _operand(name, x):
    arr = np.asarray(x)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be an integer or an integer array, got {arr.dtype}")
    if arr.ndim > 1 or (arr.ndim == 1 and not 1 <= arr.shape[0] <= 16):
        raise ValueError(f"{name} must be a scalar or have 1..16 elements (one per int8 lane of "
                         f"MLA .16b), got shape {arr.shape}")
    if arr.size and (arr.min() < -128 or arr.max() > 127):
        raise ValueError(f"{name} values must be int8, in [-128, 127], got range "
                         f"[{arr.min()}, {arr.max()}]")
    out = np.zeros(16, np.int8)
    out[:] = np.resize(arr.astype(np.int8).ravel(), 16) if arr.ndim else arr
    return out


def mla_accumulate(a, w, accumulations: int, *, core: str = "cortex-a53") -> AccumulationTrace:
    """Run ``MLA v2.16b, v0.16b, v1.16b`` ``accumulations`` times from a zero accumulator on the
    simulator and record every int8 lane against the exact sum (DSQ's MLA/SADDW count).

    ``a``, ``w``: the int8 operands of the sixteen lanes, scalars or arrays of 1..16 values
    (repeated to fill 16 lanes). ``accumulations`` in 1..4096; ``core``: one of
    :data:`~refimpl.neon.CORES`. Returns an :class:`~refimpl.neon.int7.AccumulationTrace` with
    (accumulations, 16) int8 ``lanes`` and int64 ``exact`` sums. With the worst-case b-bit
    product ``-2^(b-1) * -2^(b-1)`` the first wrap is at ``max_accumulations(b, b, 8) + 1``:
    32, 8 and 2 at 2, 3 and 4 bits.

    Used in :ref:`ch9-sec-what-a-bit-costs-on-arm`.
    """
    av, wv = _operand("a", a), _operand("w", w)
    if isinstance(accumulations, bool) or not isinstance(accumulations, (int, np.integer)):
        raise TypeError(f"accumulations must be an int, got {type(accumulations).__name__}")
    if not 1 <= accumulations <= 4096:
        raise ValueError(f"accumulations must be in 1..4096, got {accumulations}")
    n = int(accumulations)
    if core not in CORES:
        raise ValueError(f"core must be one of {CORES}, got {core!r}")
    m = Machine(core, 16)
    m.v[0] = av.view(np.uint8)
    m.v[1] = wv.view(np.uint8)
    out = np.zeros((n, 16), np.int8)
    for i in range(n):
        m.run("mla v2.16b, v0.16b, v1.16b")
        out[i] = lanes(m.v[2], "16b")
    exact = np.cumsum(np.tile(av.astype(np.int64) * wv.astype(np.int64), (n, 1)), axis=0)
    bad = np.flatnonzero((out.astype(np.int64) != exact).any(axis=1))
    return AccumulationTrace(out, exact, int(bad[0]) + 1 if bad.size else None, av, wv)


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

"""refimpl.neon: an AArch64 NEON integer simulator (numpy only; no torch).

:mod:`refimpl.neon.asm` parses a documented subset of GNU ``as`` AArch64 syntax (vector integer
ops, element moves, LD1/ST1/LD1R, LDR/STR (x, w, q, d, s, h, b) and LDP/STP (q, d, s) on a flat
memory, scalar loop control), :class:`Machine` executes it bit-exactly (checked against QEMU via
unicorn in the tests), and
:func:`max_accumulations` bounds accumulator headroom. :mod:`refimpl.neon.timing` counts cycles
per core (``Machine.run(...).cycles``, :func:`steady_state_cycles`). Instructions from
architecture extensions (SDOT) run only on cores that have them (:data:`CORE_FEATURES`); others
raise :class:`FeatureError` before executing anything.
"""
from .asm import AsmError, Instruction, parse
from .machine import (CORE_FEATURES, CORES, FEATURES, INSTRUCTION_FEATURES, FeatureError, Machine,
                      RunStats, lanes)
from .kernels import KERNELS as GEMM_KERNELS
from .kernels import (GemmResult, KernelProgram, generate_kernel, quantize_multiplier,
                      requantize_reference, run_gemm)
from .requant import (RequantProgram, RequantResult, build_requant, fixed_point_multiply, quantize_multiplier_any, srshl_ties,
                      requantize, run_requant)
from .timing import Timer, steady_state_cycles

__all__ = ["AsmError", "Instruction", "parse", "Machine", "RunStats", "CORES", "lanes",
           "max_accumulations", "CORE_FEATURES", "FEATURES", "INSTRUCTION_FEATURES",
           "FeatureError", "Timer", "steady_state_cycles", "run_gemm", "GemmResult",
           "KernelProgram", "generate_kernel", "quantize_multiplier", "requantize_reference",
           "GEMM_KERNELS", "fixed_point_multiply", "srshl_ties", "requantize", "quantize_multiplier_any", "run_requant",
           "RequantResult", "build_requant", "RequantProgram"]


def max_accumulations(a_bits: int, w_bits: int, acc_bits: int, *, a_signed: bool = True) -> int:
    """Products of a_bits x w_bits integers a signed acc_bits lane holds without overflow, worst case.

    Convention: the accumulator starts at 0 and every product has the worst-case magnitude;
    weights are signed w_bits (``|w| <= 2^(w_bits-1)``). Activations are signed a_bits
    (``|a| <= 2^(a_bits-1)``) by default, or unsigned a_bits (a <= 2^a_bits - 1) with
    ``a_signed=False``. Returns the largest N with ``N * max|a*w| <= 2^(acc_bits-1) - 1``, so a
    positive run of N products never wraps (a negative run has one more unit of room).
    Worst-case ``|product|``: signed x signed = 2^(a-1) * 2^(w-1) (from MIN*MIN); unsigned a
    gives (2^a - 1) * 2^(w-1).

    Examples: int8 x int8 into int16 -> 1 (2 * 16384 > 32767). DSQ's figures for MLA into
    int8 lanes (31 / 7 / 1 at 2 / 3 / 4 bits, issue 4) are reproduced by signed x signed with
    N * 2^(2b-2) <= 127: 2-bit 127 // 4 = 31, 3-bit 127 // 16 = 7, 4-bit 127 // 64 = 1.

    Used in :ref:`ch4-sec-why-accumulators-overflow`, :ref:`ch9-sec-what-a-bit-costs-on-arm`.
    """
    for name, v in (("a_bits", a_bits), ("w_bits", w_bits), ("acc_bits", acc_bits)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if not 1 <= v <= 64:
            raise ValueError(f"{name} must be in 1..64, got {v}")
    a_max = (1 << (a_bits - 1)) if a_signed else (1 << a_bits) - 1
    prod = a_max * (1 << (w_bits - 1))
    return ((1 << (acc_bits - 1)) - 1) // prod

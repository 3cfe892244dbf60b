"""A standalone requantisation output stage: int32 accumulators -> int8/uint8, in numpy and on the
simulator.

The output stage of a deployed integer kernel (gemmlowp's fixed-point output pipeline, TFLite's
``MultiplyByQuantizedMultiplier``, ruy's AArch64 kernels) takes a layer's int32 accumulators
(row m, output channel n) to the next layer's 8-bit input. Per element, with per-tensor or
per-channel parameters (the contract of :func:`requantize`):

1. ``x = acc + bias`` -- ADD ``.4s`` (wraps modulo 2^32);
2. ``x = SQSHL(x, max(shift, 0))`` -- saturating left shift by register (scales >= 1);
3. ``x = SQRDMULH(x, multiplier)`` -- ``sat32((2 * x * multiplier + 2^31) >> 32)``;
4. ``x = SRSHL(x, min(shift, 0))`` -- rounding arithmetic right shift, ties toward +infinity
   (SRSHL adds ``2^(k-1)`` then shifts; gemmlowp's ``RoundingDivideByPOT`` rounds ties away from
   zero and differs on exact negative ties only, as in :mod:`refimpl.neon.kernels`);
5. ``x = x + zero_point`` -- ADD (wraps);
6. ``x = min(max(x, qmin), qmax)`` -- SMAX/SMIN by vectors;
7. narrow: SQXTN/SQXTN2 to int16, then SQXTN/SQXTN2 to int8, or SQXTUN/SQXTUN2 to uint8.

TFLite's reference code shifts left with ``x * (1 << left_shift)`` in int32 (undefined on
overflow); step 2 saturates instead, as SQSHL does. :func:`quantize_multiplier_any` gives
(multiplier, shift) for any real scale, shift > 0 for scales >= 1 (TFLite's
``QuantizeMultiplier``). Without bias, left shift and clamp (int8 output, multipliers >= 0)
the stage is :func:`refimpl.neon.kernels.requantize_reference`, the GEMM kernels' epilogue;
the tests check the two give the same bits there.

:func:`run_requant` runs the stage as a generated program (:func:`build_requant`) on a
:class:`~refimpl.neon.Machine`. The program holds one column group (16 output channels) of
parameters in v4-v25 and loops over the rows of that column group two at a time (v0-v3 and
v26-v29: eight independent dependency chains hide the latencies; on the in-order cores a row
costs about 10 % over its issue bound, 30 128-bit operations at one a cycle plus the 8 cycles
a 64-byte load holds issue), plus one single row when M is odd; an outer loop walks the
column groups. It clamps on the int16 lanes (after the first narrow), which
gives the same bits as clamping the int32 lanes: SQXTN to int16 is monotone and exact on
[qmin, qmax]; and the final narrow of a clamped value is exact.

Registers (all set by :func:`build_requant`): x0 the accumulators, row-major (M, Np) int32
with Np = N rounded up to 16 (padded columns zero); x1 the parameters, per column group 352
bytes: bias, left shift ``max(shift, 0)``, multiplier, right shift ``min(shift, 0)``, zero
point (16 int32 each), then qmin and qmax (8 int16 each); x2 the output, row-major (M, Np)
bytes; x3 row pairs ``M // 2``; x4 ``M % 2``; x5 column groups ``Np / 16``; x6 the
accumulator row stride ``4 Np`` and x7 the output row stride ``Np`` in bytes; x8-x10 scratch.
The padded columns compute from zero parameters and are cropped.

Cycles are the :class:`~refimpl.neon.timing.Timer` of the Machine's core over the whole run
(``trace=True``); ``trace=False`` computes the output with :func:`requantize` and steps the
same Timer over the program's dynamic instruction stream without executing it, so the cycles
are equal by construction (and tested equal); it is memoised per core and shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from .asm import parse
from .machine import CORES, Machine
from .timing import Timer

__all__ = ["fixed_point_multiply", "srshl_ties", "requantize", "quantize_multiplier_any", "RequantProgram", "build_requant",
           "RequantResult", "run_requant"]

_I32 = (-(1 << 31), (1 << 31) - 1)
_COLS = 16                       # output channels per column group (one 16-byte store)
_GROUP_BYTES = 5 * 64 + 2 * 16   # five int32 vectors of 16 lanes, qmin and qmax as 8 x int16


# ---- arguments --------------------------------------------------------------------------------
def _integer_array(name, v, what):
    arr = np.asarray(v)
    if arr.dtype == object and arr.size and all(isinstance(e, int) and not isinstance(e, bool)
                                                for e in arr.ravel()):
        return arr                 # Python ints beyond int64: the range check names them
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be {what} of integers, got dtype {arr.dtype}")
    return arr


def _in_range(name, arr, lo, hi, allowed):
    if arr.size and (int(arr.min()) < lo or int(arr.max()) > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}] ({allowed}), got values in "
                         f"[{int(arr.min())}, {int(arr.max())}]")


def _per_channel(name, v, n, lo, hi, allowed):
    """A scalar or an (N,) integer array within [lo, hi] -> (N,) int64."""
    arr = _integer_array(name, v, "an integer or an array")
    if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] != n):
        raise ValueError(f"{name} must be a scalar or have shape ({n},) (one per output "
                         f"channel, N = acc.shape[1]), got shape {arr.shape}")
    _in_range(name, arr, lo, hi, allowed)
    return np.broadcast_to(arr.astype(np.int64), (n,))


def _scalar_int(name, v):
    if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    return int(v)


def _check(acc, bias, multiplier, shift, zero_point, qmin, qmax, unsigned):
    """Validate the arguments of :func:`requantize`; int64 arrays and the output signedness."""
    a = _integer_array("acc", acc, "an (M, N) array")
    if a.ndim != 2:
        raise ValueError(f"acc must be 2-D (M, N): rows x output channels, got shape {a.shape}")
    _in_range("acc", a, *_I32, "int32 accumulators")
    n = a.shape[1]
    b = np.zeros(n, np.int64) if bias is None else \
        _per_channel("bias", bias, n, *_I32, "int32, or None for no bias")
    m = _per_channel("multiplier", multiplier, n, 0, _I32[1], "Q31 multipliers, 0..2^31-1")
    s = _per_channel("shift", shift, n, -31, 31, "negative: right shift, positive: left shift")
    z = _per_channel("zero_point", zero_point, n, *_I32, "int32")
    qmin, qmax = _scalar_int("qmin", qmin), _scalar_int("qmax", qmax)
    if unsigned is None:
        unsigned = qmax > 127
    elif not isinstance(unsigned, (bool, np.bool_)):
        raise TypeError(f"unsigned must be True, False or None (from qmax > 127), got "
                        f"{type(unsigned).__name__}")
    lo, hi, kind = (0, 255, "uint8") if unsigned else (-128, 127, "int8")
    if not lo <= qmin <= qmax <= hi:
        raise ValueError(f"qmin and qmax must satisfy {lo} <= qmin <= qmax <= {hi} for {kind} "
                         f"output (unsigned={bool(unsigned)}), got qmin={qmin}, qmax={qmax}")
    return a.astype(np.int64), b, m, s, z, qmin, qmax, bool(unsigned)


# ---- the arithmetic ---------------------------------------------------------------------------
def _wrap32(x):
    return ((x + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


def fixed_point_multiply(x, multiplier, shift, *, single_rounding: bool = False) -> np.ndarray:
    """``x * multiplier * 2^(shift - 31)`` as the output stage computes it: steps 2-4 above.

    x: int32-valued integers (any shape); multiplier, shift: integers broadcasting against x
    (scalars, or per output channel). SQSHL by max(shift, 0), SQRDMULH
    ``sat32((2 x m + 2^31) >> 32)`` (only INT32_MIN * INT32_MIN saturates), SRSHL by
    min(shift, 0): ``(x + 2^(r-1)) >> r`` for r = -shift > 0, ties toward +infinity. That rounds
    twice: SQRDMULH keeps the integer part of ``x m / 2^31`` and the shift divides its rounding
    error by 2^r without removing it. ``single_rounding=True`` rounds the same product once,
    ``(x m + 2^(30 - shift)) >> (31 - shift)`` in 64 bits, saturated to int32 (TFLite's
    ``TFLITE_SINGLE_ROUNDING`` output stage). Returns int64 of the broadcast shape.

    Used by :func:`requantize`, :func:`refimpl.neon.kernels.requantize_reference` and
    :func:`refimpl.deploy.integer.integer_model`.

    Used in :ref:`ch12-sec-one-convolution-three-ways`.
    """
    x = np.asarray(x, dtype=np.int64)
    m = np.asarray(multiplier, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    if single_rounding:
        total = 31 - shift        # >= 0 for shift <= 31; x m < 2^62 fits int64
        return np.clip((x * m + ((np.int64(1) << total) >> 1)) >> total, *_I32)
    x = np.clip(x << np.maximum(shift, 0), *_I32)                         # SQSHL
    # SQRDMULH: (2 x m + 2^31) >> 32 == (x m + 2^30) >> 31; x m <= 2^62 fits int64, and only
    # MIN * MIN exceeds MAX
    x = np.minimum((x * m + (1 << 30)) >> 31, _I32[1])
    rs = -np.minimum(shift, 0)                                            # SRSHL by -rs
    return (x + ((np.int64(1) << rs) >> 1)) >> rs                         # + 2^(rs-1), 0 at rs=0


def srshl_ties(x, shift) -> np.ndarray:
    """Where SRSHL by ``min(shift, 0)`` meets an exact tie: the bits it discards are exactly one half.

    x: integers (e.g. SQRDMULH's outputs); shift: integers broadcasting against x. SRSHL rounds
    such a tie toward +infinity, gemmlowp's ``RoundingDivideByPOT`` away from zero: they differ
    where the tie is negative. Returns a bool array of the broadcast shape (False where the shift
    is >= 0: nothing is discarded).

    Used in :ref:`ch12-sec-conventions`.
    """
    x = np.asarray(x, dtype=np.int64)
    r = -np.minimum(np.asarray(shift, dtype=np.int64), 0)
    half = (np.int64(1) << r) >> 1
    return (r > 0) & ((x & ((np.int64(1) << r) - 1)) == half)


def _output_stage(acc, bias, multiplier, shift, zero_point, qmin, qmax):
    """Steps 1-6 on int64 arrays (broadcasting); int32 values in [qmin, qmax]."""
    x = fixed_point_multiply(_wrap32(acc + bias), multiplier, shift)     # ADD .4s, steps 2-4
    x = _wrap32(x + zero_point)                                           # ADD .4s
    return np.clip(x, qmin, qmax)                                         # SMAX, SMIN


def requantize(acc, bias, multiplier, shift, zero_point, qmin, qmax, *,
               unsigned=None) -> np.ndarray:
    """int32 accumulators (M, N) -> int8 or uint8 (M, N), as a deployed kernel's output stage.

    Per element (column n = output channel n): ``x = acc + bias`` (int32 wrap), SQSHL by
    ``max(shift, 0)`` (saturating), SQRDMULH by ``multiplier``, SRSHL by ``min(shift, 0)``
    (rounding right shift, ties toward +infinity), ``+ zero_point`` (int32 wrap), clamp to
    ``[qmin, qmax]``, narrow (exact after the clamp). The module docstring has each step's
    instruction; gemmlowp's output stage and TFLite's ``MultiplyByQuantizedMultiplier`` are
    the reference (ours saturates the left shift and rounds ties of the right shift up).

    ``acc``: (M, N) integer array within int32. ``bias``: None, or a scalar or (N,) int32.
    ``multiplier``: 0..2^31-1 (Q31, ``real_scale ~= multiplier * 2**(shift - 31)``, see
    :func:`quantize_multiplier_any`); ``shift``: -31..31; ``zero_point``: int32; each a scalar
    (per tensor) or (N,) (per channel). ``qmin <= qmax``: ints within [-128, 127] for int8
    output, or [0, 255] for uint8. ``unsigned``: the output type; None (default) means uint8
    exactly when ``qmax > 127`` (so a range within [0, 127] gives int8 unless
    ``unsigned=True``; the values are the same either way). Returns an (M, N) int8 or uint8
    array. Bad arguments raise TypeError/ValueError naming the parameter.
    """
    a, b, m, s, z, qmin, qmax, unsigned = _check(acc, bias, multiplier, shift, zero_point,
                                                 qmin, qmax, unsigned)
    return _output_stage(a, b, m, s, z, qmin, qmax).astype(np.uint8 if unsigned else np.int8)


def quantize_multiplier_any(real_scale: float) -> tuple[int, int]:
    """Real scale >= 0 -> (multiplier, shift), ``real_scale ~= multiplier * 2**(shift - 31)``.

    TFLite's ``QuantizeMultiplier``: ``real_scale = q * 2**shift`` with q in [0.5, 1),
    ``multiplier = round(q * 2**31)`` in [2^30, 2^31 - 1] (ties away from zero, as
    ``std::round``; a rounding up to 2^31 halves it and increments shift). ``shift`` > 0 for
    scales >= 1 (a left shift before SQRDMULH in :func:`requantize`), <= 0 below 1 (a rounding
    right shift after it), in -31..31. Scales below 2^-32, and 0, give (0, 0) as in TFLite
    (every int32 accumulator then rounds to 0); scales that round to 2^31 or more raise
    ValueError (shift would exceed 31). For scales in [2^-32, 1) this is
    :func:`refimpl.neon.kernels.quantize_multiplier`, which delegates here.
    """
    if isinstance(real_scale, (bool, np.bool_)) or not isinstance(real_scale,
                                                                  (int, float, np.number)):
        raise TypeError(f"real_scale must be a real number, got {type(real_scale).__name__}")
    s = float(real_scale)
    if not math.isfinite(s) or s < 0:
        raise ValueError(f"real_scale must be finite and >= 0, got {real_scale!r}")
    if s == 0.0:
        return 0, 0
    q, shift = math.frexp(s)
    mult = math.floor(q * (1 << 31) + 0.5)     # exact: q * 2^31 has at most 53 significant bits
    if mult == 1 << 31:
        mult //= 2
        shift += 1
    if shift > 31:
        raise ValueError(f"real_scale must be below 2**31 (shift <= 31), got {real_scale!r}")
    if shift < -31:
        return 0, 0
    return int(mult), int(shift)


# ---- the program ------------------------------------------------------------------------------
_STEPS = (("add", 4), ("sqshl", 8), ("sqrdmulh", 12), ("srshl", 16), ("add", 20))


def _compute(rows, narrow):
    """The output stage on rows of 4 int32 registers, stage by stage across all rows (each stage
    4 * len(rows) independent operations); the result bytes end in each row's first register."""
    out = []
    for op, p in _STEPS:
        out += [f"{op} v{r[i]}.4s, v{r[i]}.4s, v{p + i}.4s" for r in rows for i in range(4)]
    out += [f"sqxtn v{r[i]}.4h, v{r[i]}.4s" for r in rows for i in (0, 2)]
    out += [f"sqxtn2 v{r[i]}.8h, v{r[i + 1]}.4s" for r in rows for i in (0, 2)]
    out += [f"smax v{r[i]}.8h, v{r[i]}.8h, v24.8h" for r in rows for i in (0, 2)]
    out += [f"smin v{r[i]}.8h, v{r[i]}.8h, v25.8h" for r in rows for i in (0, 2)]
    out += [f"{narrow} v{r[0]}.8b, v{r[0]}.8h" for r in rows]
    out += [f"{narrow}2 v{r[0]}.16b, v{r[2]}.8h" for r in rows]
    return out


@lru_cache(maxsize=2)
def _sections(unsigned: bool) -> tuple:
    """The program as (name, lines) sections, in order: head, pair, single, tail."""
    narrow = "sqxtun" if unsigned else "sqxtn"
    a, b = (0, 1, 2, 3), (26, 27, 28, 29)
    lists = {r: ", ".join(f"v{r + i}.4s" for i in range(4)) for r in (0, 4, 8, 12, 16, 20, 26)}
    names = ("bias", "left shift max(shift, 0)", "multiplier", "right shift min(shift, 0)",
             "zero point")
    head = ["col:"] + [f"ld1 {{{lists[4 + 4 * i]}}}, [x1], #64      // {what}"
                       for i, what in enumerate(names)]
    head += ["ld1 {v24.8h, v25.8h}, [x1], #32            // qmin, qmax (int16 lanes)",
             "mov x8, x0", "mov x9, x2", "mov x10, x3", "cbz x10, single"]
    load = [f"ld1 {{{lists[r[0]]}}}, [x8], x6" for r in (a, b)]
    pair = ["pair:"] + load + _compute((a, b), narrow) + \
        ["st1 {v0.16b}, [x9], x7", "st1 {v26.16b}, [x9], x7", "subs x10, x10, #1", "b.ne pair"]
    single = ["single:", "cbz x4, next", load[0]] + _compute((a,), narrow) + \
        ["st1 {v0.16b}, [x9], x7"]
    tail = ["next:", "add x0, x0, #64", "add x2, x2, #16", "subs x5, x5, #1", "b.ne col"]
    return (("head", tuple(head)), ("pair", tuple(pair)), ("single", tuple(single)),
            ("tail", tuple(tail)))


@lru_cache(maxsize=2)
def _program_text(unsigned: bool) -> str:
    kind = "uint8 (SQXTUN)" if unsigned else "int8 (SQXTN)"
    top = [f"// requantisation output stage: int32 (M, Np) -> {kind}, 16 channels a store",
           "// x0 acc, x1 parameters, x2 output, x3 M // 2, x4 M % 2, x5 column groups,",
           "// x6 acc row stride (bytes), x7 output row stride (bytes)"]
    lines = [ln if ln.endswith(":") else "    " + ln
             for _, sec in _sections(unsigned) for ln in sec]
    return "\n".join(top + lines) + "\n"


@dataclass(frozen=True)
class RequantProgram:
    """A generated output-stage program with its inputs laid out: ``asm`` (GNU-as text of the
    simulator's subset), ``memory`` (the uint8 image: accumulators, packed parameters, zeroed
    output), ``registers`` (values of x0..x7 before the run), ``out_offset`` (the output's
    address), ``shape`` (M, N) and ``unsigned``. :meth:`output` reads the result back."""
    asm: str
    memory: np.ndarray = field(repr=False)
    registers: tuple
    out_offset: int
    shape: tuple
    unsigned: bool

    @property
    def column_groups(self) -> int:
        """Groups of 16 output channels: N rounded up to 16, over 16."""
        return -(-self.shape[1] // _COLS)

    def output(self, memory: np.ndarray) -> np.ndarray:
        """The (M, N) int8/uint8 result, read from ``memory``: the memory image after a run."""
        m, np_ = self.shape[0], self.column_groups * _COLS
        raw = np.asarray(memory, np.uint8)[self.out_offset:self.out_offset + m * np_]
        out = raw.view(np.uint8 if self.unsigned else np.int8).reshape(m, np_)
        return out[:, :self.shape[1]].copy()


def _pack(b, m, s, z, qmin, qmax, groups):
    """Parameters per column group: bias, left shift, multiplier, right shift, zero point (16
    int32 lanes each, padded columns zero), then qmin and qmax (8 int16 lanes each)."""
    cols = np.zeros((5, groups * _COLS), np.int64)
    for i, v in enumerate((b, np.maximum(s, 0), m, np.minimum(s, 0), z)):
        cols[i, :v.shape[0]] = v
    vec = cols.reshape(5, groups, _COLS).transpose(1, 0, 2).astype("<i4").view(np.uint8)
    clamp = np.repeat(np.array([qmin, qmax], "<i2"), 8).view(np.uint8)
    return np.concatenate([vec.reshape(groups, -1), np.tile(clamp, (groups, 1))], axis=1).ravel()


def _check_nonempty(args):
    if 0 in args[0].shape:
        raise ValueError("acc must have at least one row and one column for the program, got "
                         f"shape {args[0].shape}")
    return args


def build_requant(acc, bias, multiplier, shift, zero_point, qmin, qmax, *,
                  unsigned=None) -> RequantProgram:
    """Lay out :func:`requantize`'s arguments in memory for the generated program; the program
    and the layout are described in :mod:`refimpl.neon.requant`. Arguments as in
    :func:`requantize`; ``acc`` must have at least one row and one column here."""
    return _build(*_check_nonempty(_check(acc, bias, multiplier, shift, zero_point, qmin, qmax,
                                          unsigned)))


def _build(a, b, m, s, z, qmin, qmax, unsigned):
    rows, n = a.shape
    groups = -(-n // _COLS)
    np_ = groups * _COLS
    accp = np.zeros((rows, np_), "<i4")
    accp[:, :n] = a
    params = _pack(b, m, s, z, qmin, qmax, groups)
    p_off = accp.nbytes
    out_off = p_off + params.size
    memory = np.zeros(out_off + rows * np_, np.uint8)
    memory[:p_off] = accp.view(np.uint8).ravel()
    memory[p_off:out_off] = params
    regs = (0, p_off, out_off, rows // 2, rows % 2, groups, 4 * np_, np_)
    return RequantProgram(_program_text(unsigned), memory, regs, out_off, (rows, n), unsigned)


# ---- running ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RequantResult:
    """What :func:`run_requant` computed: ``out`` (M, N) int8/uint8, ``cycles`` on ``core``,
    dynamic ``instructions``, the program's ``asm``, and ``vectors``, the 16-byte stores
    (M x column groups, padded columns included)."""
    out: np.ndarray
    cycles: int
    instructions: int
    asm: str
    core: str
    vectors: int

    @property
    def cycles_per_vector(self) -> float:
        """Cycles per 16 outputs (one store)."""
        return self.cycles / self.vectors


@lru_cache(maxsize=256)
def _stream_cycles(core, rows, groups, unsigned):
    """Timer cycles and instructions of the program's dynamic instruction stream for ``rows`` x
    ``groups``: the sections in the order the branches take them (a branch's timing does not
    depend on whether it is taken)."""
    prog = parse(_program_text(unsigned))
    sizes = [sum(1 for ln in sec if not ln.endswith(":")) for _, sec in _sections(unsigned)]
    starts = np.cumsum([0] + sizes)
    head, pair, single, tail = (prog[starts[i]:starts[i + 1]] for i in range(4))
    group = list(head) + list(pair) * (rows // 2) + list(single[:1]) + \
        (list(single[1:]) if rows % 2 else []) + list(tail)
    timer = Timer(core)
    for _ in range(groups):
        for ins in group:
            timer.step(ins)
    return int(timer.cycles), timer.instructions


def run_requant(acc, bias, multiplier, shift, zero_point, qmin, qmax, *,
                core: str = "cortex-a55", trace: bool = True, unsigned=None) -> RequantResult:
    """Run the requantisation output stage on the simulator: bit-exact output and cycles.

    Arguments as in :func:`requantize` (``acc`` with at least one row and column). ``core``:
    one of :data:`~refimpl.neon.CORES`. ``trace=True`` runs the generated program
    (:func:`build_requant`) on a :class:`~refimpl.neon.Machine`; ``trace=False`` computes the
    output with :func:`requantize` and the cycles by stepping the core's Timer over the same
    dynamic instruction stream (equal to the trace's cycles; memoised per core and shape).

    Used in :ref:`ch12-sec-one-convolution-three-ways`.
    """
    if core not in CORES:
        raise ValueError(f"core must be one of {CORES}, got {core!r}")
    if not isinstance(trace, (bool, np.bool_)):
        raise TypeError(f"trace must be a bool, got {type(trace).__name__}")
    args = _check_nonempty(_check(acc, bias, multiplier, shift, zero_point, qmin, qmax,
                                  unsigned))
    rows, groups, unsigned = args[0].shape[0], -(-args[0].shape[1] // _COLS), args[-1]
    if trace:
        prog = _build(*args)
        machine = Machine(core, prog.memory.size)
        machine.mem[:] = prog.memory
        machine.x[:len(prog.registers)] = prog.registers
        stats = machine.run(prog.asm)
        out, cycles, instructions = prog.output(machine.mem), int(stats.cycles), stats.instructions
    else:
        out = _output_stage(*args[:-1]).astype(np.uint8 if unsigned else np.int8)
        cycles, instructions = _stream_cycles(core, rows, groups, unsigned)
    return RequantResult(out, cycles, instructions, _program_text(unsigned), core, rows * groups)

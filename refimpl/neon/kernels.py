"""Generated int8/low-bit GEMM micro-kernels for the NEON simulator, and :func:`run_gemm`.

Computes ``C = A @ B`` with ``A`` (M, K) activations (the LHS) and ``B`` (K, N) weights (the RHS,
column n = output channel n), both signed integers, as four kernel families would on an AArch64
core. Each kernel is generated as GNU-as text (the :mod:`refimpl.neon.asm` subset) for one
MR x NR output tile: a prologue, one counted K loop (``SUBS`` + ``B.NE``), an epilogue storing
the tile with ``ST1``. Every kernel family is our own code following a published idea:

* ``"smlal"`` -- gemmlowp/ruy's pre-dotprod int8 kernel idea: one SMULL + SMLAL2 pair leaves
  two int8 x int8 products in each int16 lane, SADALP folds the pair sums into int32; depth (k)
  lives in the lanes, so the epilogue reduces with ADDP. Tile MR x 4 (MR 1..4, default 4x4),
  K-step 16. The only int16 overflow is MIN*MIN + MIN*MIN = 32768, which wraps to -32768 in the
  lane: the kernel keeps that wrap (result off by -65536 per such pair), the fast path reproduces
  it exactly, and ``bits=7`` (or weights in [-127, 127], gemmlowp's restriction) rules it out.
  ``accumulations`` (even, default 2) sets the products per int16 lane before SADALP: above 2,
  ``accumulations / 2`` depth groups of 16 go through SMULL/SMLAL + SMLAL2 into one int16
  register per output before one SADALP (EasyQuant's INT7 argument, Wu et al. 2020 Fig. 2, in
  the same kernel), K-step ``8 * accumulations``, and a straight-line tail block of fewer groups
  takes the rest of K (padded to 16 only); the MR x 4 int16 registers stay live across the
  groups, which limits MR to 1..3 (default tile 2 x 4).
* ``"sdot"`` -- ruy's dotprod kernel idea (ARMv8.2 FEAT_DotProd): ``SDOT acc.4s, b.16b,
  a.4b[i]``; each 32-bit lane takes a 4-deep dot product, output columns in the lanes, no
  reduction. Tile MR x NR with MR in {4, 8, 12}, NR in {4, 8, 12, 16} (default 8x8), K-step
  4 * unroll (default unroll 2). Raises :class:`~refimpl.neon.FeatureError` on cores without
  dotprod (cortex-a53, cortex-a72), before running anything.
* ``"int7"`` -- EasyQuant (Wu et al. 2020) INT7: 7-bit operands let SMLAL accumulate
  ``max_accumulations(7, 7, 16)`` = 7 products in an int16 lane before SADALP widens to int32.
  Layout (ours): each register pairs two consecutive k of one output column (B packed as
  [k-pair][n][2], A's two bytes broadcast with ``LD1R .8h``), so SADALP's adjacent-lane pairing
  sums the two k of the same column. Tile MR x 8 (MR 1..6, default 4x8), one segment of
  ``accumulations`` k-pairs per loop iteration (K-step 2 * accumulations).
* ``"mla-lowbit"`` -- DSQ (Gong et al. 2019) low-bit MLA: ``bits`` in {2, 3, 4}, MUL/MLA
  ``.16b`` accumulate ``max_accumulations(bits, bits, 8)`` (31 / 7 / 1) products in int8 lanes,
  then SADDW/SADDW2 widen into int16; every 256 segments (and at the end) SADDW/SADDW2 widen the
  int16 lanes into int32. 256 segments of int8 values in [-128, 127] sum to [-32768, 32512], so
  the int16 stage cannot wrap whatever the int8 lanes hold. Columns in the lanes, A broadcast
  with ``LD1R .16b``. Tile MR x 16 (MR 1..4, default 3x16: the registers MR=4 leaves free
  cannot double-buffer the broadcasts, which costs more than the wider tile saves), K-step
  ``accumulations`` x the segments unrolled per loop iteration (enough for >= 4 products: 4
  segments at 4 bits, 1 at 2 and 3 bits).

Packing (like gemmlowp/ruy pack panels): K is zero-padded to a multiple of the K-step, M and N
to multiples of MR and NR (zeros add nothing; the result is cropped). With ``g`` the kernel's
depth group (16 smlal, 4 sdot, 2 int7, 1 mla-lowbit), the A panel of row block ``i`` is
``A[i*MR:(i+1)*MR].reshape(MR, K/g, g).transpose(1, 0, 2)`` (k-group major, then row, then the
g consecutive k) and the B panel of column block ``j`` is ``B[:, j*NR:(j+1)*NR]`` as
(K/g, NR, g). The kernel reads them sequentially (x0: A panel, x1: B panel), writes the tile
row-major to x2 (int32, or int8 with requant) and reads requant parameters from x3.

Requantisation (``requant=(multiplier, shift, zero_point)``, gemmlowp's fixed-point output
stage, per tensor or per output channel): SQRDMULH by the multiplier, SRSHL by ``shift`` <= 0
(a rounding right shift by -shift, ties toward +infinity: SRSHL's rounding, not gemmlowp's
ties-away-from-zero RoundingDivideByPOT, which needs an extra fix-up; they differ only on exact
negative ties), ADD the zero point, SQXTN/SQXTN2 to int16, SQXTN/SQXTN2 to int8;
:func:`requantize_reference` is the same arithmetic in numpy.

Fast path (``trace=False``): numpy, bit-exact with the trace: an exact float64 matmul (exact for
integers below 2^53) wherever the kernel provably cannot wrap, and otherwise an emulation of the
lane wraps (SMLAL's MIN*MIN pairs; int16/int8 segment sums when ``accumulations`` exceeds the
safe count), then int32 wrap. Cycles: tiles x (straight-line parts timed once with
:class:`~refimpl.neon.timing.Timer` + loop iterations x
:func:`~refimpl.neon.timing.steady_state_cycles` of the loop body). Trace (``trace=True``):
packs into a :class:`~refimpl.neon.Machine`'s memory and runs the kernel per tile; cycles are
the sum of the runs' ``RunStats.cycles``. Both count every tile of the padded problem (a
partial edge tile costs a full one, as it would on the core).

Why one module (~830 lines): the four families are built from the same prologue, loop, packing
and requantisation-epilogue pieces, and checked by the same reference and fast paths; split
apart, each file would import the others' private builders.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import numpy as np

from .asm import parse
from .machine import CORE_FEATURES, CORES, FEATURES, INSTRUCTION_FEATURES, FeatureError, Machine
from .requant import fixed_point_multiply, quantize_multiplier_any
from .timing import Timer, steady_state_cycles

__all__ = ["KERNELS", "GemmResult", "KernelProgram", "generate_kernel", "run_gemm",
           "requantize_reference", "quantize_multiplier", "pack_a", "pack_b"]

KERNELS = ("smlal", "sdot", "int7", "mla-lowbit")
_GROUP = {"smlal": 16, "sdot": 4, "int7": 2, "mla-lowbit": 1}     # depth group of the packing
_BITS = {"smlal": range(2, 9), "sdot": range(2, 9), "int7": range(2, 8), "mla-lowbit": (2, 3, 4)}
_DEFAULT_BITS = {"smlal": 8, "sdot": 8, "int7": 7}
_DEFAULT_TILE = {"smlal": (4, 4), "sdot": (8, 8), "int7": (4, 8), "mla-lowbit": (3, 16)}
_WIDEN_EVERY = 256        # mla-lowbit: int8 segments summed in int16 before widening to int32
_MAX_ACCUMULATIONS = 256  # cap of the accumulations override (the segment is unrolled in text)


def _max_acc(a_bits, w_bits, acc_bits):
    from . import max_accumulations  # the package's definition (imported lazily: no cycle)
    return max_accumulations(a_bits, w_bits, acc_bits)


# ---- kernel programs --------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelProgram:
    """One generated micro-kernel: ``asm`` for one MR x NR tile over all of (padded) K.

    ``account`` lists the dynamic pieces for cycle accounting: ``("once", text, count)`` is
    straight-line code executed ``count`` times (timed with a fresh Timer), ``("loop", text,
    count)`` a loop body (label, body, SUBS, B.NE) run ``count`` iterations (steady state).
    """
    kernel: str
    mr: int
    nr: int
    kstep: int           # k values consumed per loop iteration
    k_padded: int
    bits: int
    accumulations: int   # products per narrow lane before widening (smlal: 2 unless set; sdot:
    #                      4, SDOT's dot length into an int32 lane, nothing narrow)
    requant: bool
    asm: str
    account: tuple = field(repr=False)

    @cached_property
    def instructions(self) -> int:
        """Dynamic instructions per tile (labels excluded)."""
        return sum(n * len(parse(text)) for _, text, n in self.account)

    @cached_property
    def mnemonic_counts(self) -> dict:
        """Dynamic instructions per tile by mnemonic, e.g. ``{"smlal": 96, "sadalp": 8, ...}``
        (most frequent first); the values sum to :attr:`instructions`."""
        counts: dict[str, int] = {}
        for _, text, n in self.account:
            for ins in parse(text):
                counts[ins.mnemonic] = counts.get(ins.mnemonic, 0) + n
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _ld1(regs, arr, ptr):
    """LD1 lines loading consecutive registers ``regs`` (post-incremented), at most 4 a list."""
    out = []
    for i in range(0, len(regs), 4):
        grp = regs[i:i + 4]
        lst = ", ".join(f"v{r}.{arr}" for r in grp)
        out.append(f"ld1 {{{lst}}}, [{ptr}], #{16 * len(grp)}")
    return out


def _st1_runs(regs, arr="4s", ptr="x2"):
    """ST1 lines storing registers ``regs`` in order, in runs of up to 4 consecutive registers."""
    out, run = [], []
    for r in regs:
        if run and (r != run[-1] + 1 or len(run) == 4):
            out.append(f"st1 {{{', '.join(f'v{q}.{arr}' for q in run)}}}, [{ptr}], #{16 * len(run)}")
            run = []
        run.append(r)
    out.append(f"st1 {{{', '.join(f'v{q}.{arr}' for q in run)}}}, [{ptr}], #{16 * len(run)}")
    return out


def _requant_epilogue(result_regs, nr, free):
    """Requantise the int32 tile in ``result_regs`` (row-major, 4 columns each) and store int8.

    Per column group g (4 columns): LD1 its multiplier, shift and zero-point vectors from x3
    (packed (NR/4, 3, 4) int32 per column block), then SQRDMULH, SRSHL, ADD on each register of
    that group; then narrow 4 registers at a time (SQXTN/SQXTN2 .4s -> .8h, .8h -> .16b) into
    16 bytes = 16 consecutive int8 outputs of the row-major tile, ST1.
    """
    groups = nr // 4
    trio = next(r for r in free if r + 1 in free and r + 2 in free)
    temps = [r for r in free if r not in (trio, trio + 1, trio + 2)][:2]
    lines = []
    for g in range(groups):
        lines.append(f"ld1 {{v{trio}.4s, v{trio + 1}.4s, v{trio + 2}.4s}}, [x3], #48")
        for i, r in enumerate(result_regs):
            if i % groups == g:
                lines += [f"sqrdmulh v{r}.4s, v{r}.4s, v{trio}.4s",
                          f"srshl v{r}.4s, v{r}.4s, v{trio + 1}.4s",
                          f"add v{r}.4s, v{r}.4s, v{trio + 2}.4s"]
    t0, t1 = temps
    for c in range(0, len(result_regs), 4):
        a, b, d, e = result_regs[c:c + 4]
        lines += [f"sqxtn v{t0}.4h, v{a}.4s", f"sqxtn2 v{t0}.8h, v{b}.4s",
                  f"sqxtn v{t1}.4h, v{d}.4s", f"sqxtn2 v{t1}.8h, v{e}.4s",
                  f"sqxtn v{t0}.8b, v{t0}.8h", f"sqxtn2 v{t0}.16b, v{t1}.8h",
                  f"st1 {{v{t0}.16b}}, [x2], #16"]
    return lines


def _store(result_regs, nr, requant):
    if not requant:
        return _st1_runs(result_regs)
    free = [r for r in range(32) if r not in result_regs]
    return _requant_epilogue(result_regs, nr, free)


def _loop(label, body, counter="x4"):
    return "\n".join([f"{label}:"] + body + [f"subs {counter}, {counter}, #1", f"b.ne {label}"])


def _pipeline(steps, double_buffered):
    """Emit ``steps`` = [(loads, compute)] with step p+1's loads interleaved into step p's
    compute (one load after each compute instruction), so an in-order core issues them in the
    shadow of the multiplies instead of stalling on load-to-use latency. Only valid when step
    p+1 loads into registers step p does not read (``double_buffered``); else sequential."""
    if not double_buffered:
        return [ins for loads, comp in steps for ins in loads + comp]
    out = list(steps[0][0])
    for p, (_, comp) in enumerate(steps):
        nxt = list(steps[p + 1][0]) if p + 1 < len(steps) else []
        for ins in comp:
            out.append(ins)
            if nxt:
                out.append(nxt.pop(0))
        out += nxt
    return out


def _gen_smlal(mr, nr, kp, requant):
    # registers: A rows v0.., B columns next, int16 temps, int32 accumulators v(32-4MR)..v31
    a = list(range(mr))
    b = list(range(mr, mr + 4))
    acc = [[32 - 4 * mr + 4 * m + n for n in range(4)] for m in range(mr)]
    temps = list(range(mr + 4, 32 - 4 * mr))
    pro = [f"movi v{r}.4s, #0" for row in acc for r in row] + [f"mov x4, #{kp // 16}"]
    pairs = [(m, n) for m in range(mr) for n in range(4)]
    steps, loaded = [], set()
    # chunks of len(temps) independent pairs: SMULL all, SMLAL2 all, SADALP all (latency
    # hiding); a chunk's operand rows are loaded (single-register LD1) during the previous chunk
    for c in range(0, len(pairs), len(temps)):
        chunk = list(zip(pairs[c:c + len(temps)], temps))
        loads = []
        for (m, n), _ in chunk:
            for reg, ptr in ((a[m], "x0"), (b[n], "x1")):
                if reg not in loaded:
                    loaded.add(reg)
                    loads.append((reg, ptr))
        # A rows and B columns are consecutive in their panels: keep each stream's order
        loads = sorted(loads, key=lambda rp: (rp[1], rp[0]))
        loads = [f"ld1 {{v{r}.16b}}, [{ptr}], #16" for r, ptr in loads]
        comp = [f"smull v{t}.8h, v{a[m]}.8b, v{b[n]}.8b" for (m, n), t in chunk]
        comp += [f"smlal2 v{t}.8h, v{a[m]}.16b, v{b[n]}.16b" for (m, n), t in chunk]
        comp += [f"sadalp v{acc[m][n]}.4s, v{t}.8h" for (m, n), t in chunk]
        steps.append((loads, comp))
    body = _pipeline(steps, True)   # later chunks load registers earlier chunks do not read
    # epilogue: each accumulator holds 4 partial sums over k; ADDP twice gives one row of 4
    epi, t0, t1 = [], temps[0], temps[1]
    for m in range(mr):
        r = acc[m]
        epi += [f"addp v{t0}.4s, v{r[0]}.4s, v{r[1]}.4s", f"addp v{t1}.4s, v{r[2]}.4s, v{r[3]}.4s",
                f"addp v{a[m]}.4s, v{t0}.4s, v{t1}.4s"]
    epi += _store(a, nr, requant)
    return pro, [("loop", "smlal_k", body, kp // 16)], epi


def _after_last_use(steps):
    """Emit ``steps`` = [(loads, compute)] with each load of step p+1 placed right after the last
    instruction of step p that reads its destination register (single-buffered registers: the
    next step's operands arrive as early as the current step lets them)."""
    out = list(steps[0][0])
    for p, (_, comp) in enumerate(steps):
        nxt = steps[p + 1][0] if p + 1 < len(steps) else []
        after: dict[int, list] = {}
        for ld in nxt:
            dest = ld.split("{")[1].split(".")[0] + "."            # "v5."
            last = max((i for i, ins in enumerate(comp) if dest in ins.split(None, 1)[1]),
                       default=-1)
            after.setdefault(last, []).append(ld)
        out += after.get(-1, [])
        for i, ins in enumerate(comp):
            out.append(ins)
            out += after.get(i, [])
    return out


def _gen_smlal_acc(mr, kp, acc_n, requant):
    # smlal with acc_n > 2 products per int16 lane: acc_n / 2 depth groups of 16 accumulate into
    # one int16 register per output (SMULL/SMLAL low halves, SMLAL2 high halves), one SADALP
    # per output per loop iteration. Registers: int32 accumulators v(32-4MR).., int16 v(32-8MR)..,
    # operands below (two sets when they fit: the next group loads during this one)
    acc = [[32 - 4 * mr + 4 * m + n for n in range(4)] for m in range(mr)]
    t16 = [[32 - 8 * mr + 4 * m + n for n in range(4)] for m in range(mr)]
    free = list(range(32 - 8 * mr))
    per = mr + 4
    sets = 2 if len(free) >= 2 * per else 1
    pairs = [(m, n) for m in range(mr) for n in range(4)]

    def block(groups):
        steps = []
        for g in range(groups):
            regs = free[(g % sets) * per:(g % sets + 1) * per]
            ra, rb = regs[:mr], regs[mr:]
            loads = [f"ld1 {{v{r}.16b}}, [x0], #16" for r in ra] + \
                [f"ld1 {{v{r}.16b}}, [x1], #16" for r in rb]
            op = "smull" if g == 0 else "smlal"    # SMULL starts the int16 segment: no zeroing
            comp = [f"{op} v{t16[m][n]}.8h, v{ra[m]}.8b, v{rb[n]}.8b" for m, n in pairs]
            comp += [f"smlal2 v{t16[m][n]}.8h, v{ra[m]}.16b, v{rb[n]}.16b" for m, n in pairs]
            steps.append((loads, comp))
        body = _pipeline(steps, True) if sets == 2 else _after_last_use(steps)
        return body + [f"sadalp v{acc[m][n]}.4s, v{t16[m][n]}.8h" for m, n in pairs]

    # K (padded to 16) = full blocks of acc_n / 2 groups in the loop + a shorter tail block
    # (fewer products per lane, so no new wrap), as a real kernel handles the K remainder
    full, tail = divmod(kp // 16, acc_n // 2)
    pro = [f"movi v{r}.4s, #0" for row in acc for r in row]
    parts = []
    if full:
        pro.append(f"mov x4, #{full}")
        parts.append(("loop", "smlal_acc", block(acc_n // 2), full))
    if tail:
        parts.append(("once", block(tail), 1))
    rows = free[:mr]
    epi, t0, t1 = [], t16[0][0], t16[0][1]
    for m in range(mr):
        r = acc[m]
        epi += [f"addp v{t0}.4s, v{r[0]}.4s, v{r[1]}.4s", f"addp v{t1}.4s, v{r[2]}.4s, v{r[3]}.4s",
                f"addp v{rows[m]}.4s, v{t0}.4s, v{t1}.4s"]
    epi += _store(rows, 4, requant)
    return pro, parts, epi


def _gen_sdot(mr, nr, kp, unroll, requant):
    ra, rb = mr // 4, nr // 4                      # registers per k-step: 4 rows / 4 columns each
    a = [[s * ra + i for i in range(ra)] for s in range(unroll)]
    b = [[unroll * ra + s * rb + j for j in range(rb)] for s in range(unroll)]
    nacc = mr * rb
    acc = [[32 - nacc + i * rb + j for j in range(rb)] for i in range(mr)]
    pro = [f"movi v{r}.4s, #0" for row in acc for r in row] + [f"mov x4, #{kp // (4 * unroll)}"]
    steps = []
    for s in range(unroll):   # each k-step has its own registers: the next one loads meanwhile
        loads = _ld1(a[s], "16b", "x0") + _ld1(b[s], "16b", "x1")
        comp = [f"sdot v{acc[i][j]}.4s, v{b[s][j]}.16b, v{a[s][i // 4]}.4b[{i % 4}]"
                for i in range(mr) for j in range(rb)]
        steps.append((loads, comp))
    body = _pipeline(steps, True)
    epi = _store([r for row in acc for r in row], nr, requant)
    return pro, [("loop", "sdot_k", body, kp // (4 * unroll))], epi


def _gen_int7(mr, nr, kp, acc_n, requant):
    acc = [[32 - 2 * mr + 2 * m, 33 - 2 * mr + 2 * m] for m in range(mr)]   # cols 0-3, 4-7
    t16 = [[32 - 4 * mr + 2 * m, 33 - 4 * mr + 2 * m] for m in range(mr)]
    free = list(range(32 - 4 * mr))
    sets = 2 if len(free) >= 2 * (mr + 1) else 1   # double-buffer B and the A broadcasts
    pro = [f"movi v{r}.4s, #0" for row in acc for r in row] + [f"mov x4, #{kp // (2 * acc_n)}"]
    steps = []
    for p in range(acc_n):                          # one k-pair: one product per int16 lane
        regs = free[(p % sets) * (mr + 1):(p % sets + 1) * (mr + 1)]
        rb, bc = regs[0], regs[1:]
        loads = [f"ld1 {{v{rb}.16b}}, [x1], #16"] + [f"ld1r {{v{r}.8h}}, [x0], #2" for r in bc]
        op, op2 = ("smull", "smull2") if p == 0 else ("smlal", "smlal2")
        comp = []
        for m in range(mr):
            comp += [f"{op} v{t16[m][0]}.8h, v{rb}.8b, v{bc[m]}.8b",
                     f"{op2} v{t16[m][1]}.8h, v{rb}.16b, v{bc[m]}.16b"]
        steps.append((loads, comp))
    body = _pipeline(steps, sets == 2)
    for m in range(mr):  # adjacent int16 lanes = the two k of one column: SADALP sums them
        body += [f"sadalp v{acc[m][0]}.4s, v{t16[m][0]}.8h",
                 f"sadalp v{acc[m][1]}.4s, v{t16[m][1]}.8h"]
    epi = _store([r for row in acc for r in row], nr, requant)
    return pro, [("loop", "int7_seg", body, kp // (2 * acc_n))], epi


def _gen_mla(mr, nr, kp, acc_n, seg_per_iter, requant):
    acc32 = [[32 - 4 * mr + 4 * m + c for c in range(4)] for m in range(mr)]
    acc16 = [[32 - 6 * mr + 2 * m, 33 - 6 * mr + 2 * m] for m in range(mr)]
    acc8 = [32 - 7 * mr + m for m in range(mr)]
    free = list(range(32 - 7 * mr))
    sets = 2 if len(free) >= 2 * (mr + 1) else 1
    steps = []
    for s in range(seg_per_iter):
        for p in range(acc_n):
            q = s * acc_n + p
            op = "mul" if p == 0 else "mla"    # MUL starts the int8 segment: no zeroing needed
            if len(free) < mr + 1:   # too few registers for every row's broadcast: reuse them
                rb, bc = free[0], free[1:]
                loads, comp = [f"ld1 {{v{rb}.16b}}, [x1], #16"], []
                for m in range(mr):
                    r = bc[(q * mr + m) % len(bc)]
                    comp += [f"ld1r {{v{r}.16b}}, [x0], #1",
                             f"{op} v{acc8[m]}.16b, v{rb}.16b, v{r}.16b"]
            else:
                regs = free[(q % sets) * (mr + 1):(q % sets + 1) * (mr + 1)]
                rb, bc = regs[0], regs[1:]
                loads = [f"ld1 {{v{rb}.16b}}, [x1], #16"] + \
                    [f"ld1r {{v{r}.16b}}, [x0], #1" for r in bc]
                comp = [f"{op} v{acc8[m]}.16b, v{rb}.16b, v{bc[m]}.16b" for m in range(mr)]
            if p == acc_n - 1:   # segment done: widen the int8 lanes into int16
                for m in range(mr):
                    comp += [f"saddw v{acc16[m][0]}.8h, v{acc16[m][0]}.8h, v{acc8[m]}.8b",
                             f"saddw2 v{acc16[m][1]}.8h, v{acc16[m][1]}.8h, v{acc8[m]}.16b"]
            steps.append((loads, comp))
    seg = _pipeline(steps, sets == 2)
    widen = []
    for m in range(mr):
        for h in range(2):
            widen += [f"saddw v{acc32[m][2 * h]}.4s, v{acc32[m][2 * h]}.4s, v{acc16[m][h]}.4h",
                      f"saddw2 v{acc32[m][2 * h + 1]}.4s, v{acc32[m][2 * h + 1]}.4s, "
                      f"v{acc16[m][h]}.8h"]
    zero16 = [f"movi v{r}.8h, #0" for row in acc16 for r in row]
    iters = kp // (acc_n * seg_per_iter)
    group = _WIDEN_EVERY // seg_per_iter          # loop iterations per int16 -> int32 widening
    full, rest = divmod(iters, group)
    pro = [f"movi v{r}.4s, #0" for row in acc32 for r in row] + zero16
    parts = []
    if full:
        pro.append(f"mov x5, #{full}")
        parts.append(("asm", "outer:"))
        parts.append(("once", f"mov x4, #{group}", full))
        parts.append(("loop", "mla_seg", seg, group * full))
        parts.append(("once", widen + zero16 + ["subs x5, x5, #1", "b.ne outer"], full))
    if rest:
        parts.append(("once", f"mov x4, #{rest}", 1))
        parts.append(("loop", "mla_tail", seg, rest))
        parts.append(("once", widen, 1))
    epi = _store([r for row in acc32 for r in row], nr, requant)
    return pro, parts, epi


def generate_kernel(kernel: str, k: int, *, tile=None, bits=None, accumulations=None,
                    unroll=None, requant: bool = False) -> KernelProgram:
    """Generate the micro-kernel text for one MR x NR tile over depth ``k`` (padded to the K-step).

    Arguments are validated as in :func:`run_gemm`; ``k`` is the GEMM depth. Returns a
    :class:`KernelProgram` (``asm``, padded depth, K-step, cycle-accounting pieces).

    Used in :ref:`ch4-sec-four-kernels`.
    """
    kernel, mr, nr, bits, acc_n, unroll = _check_config(kernel, tile, bits, accumulations, unroll,
                                                        requant)
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return _generate(kernel, mr, nr, int(k), bits, acc_n, unroll, bool(requant))


@lru_cache(maxsize=128)
def _generate(kernel, mr, nr, k, bits, acc_n, unroll, requant):
    # mla-lowbit: short segments are unrolled to >= 4 products per iteration (so the next
    # step's loads can overlap); 256 (the widening period) stays a multiple of it
    seg_per_iter = 1 if kernel != "mla-lowbit" else \
        next(d for d in (1, 2, 4, 8, 16, 32, 64, 128, 256) if d * acc_n >= 4)
    kstep = {"smlal": 8 * (acc_n or 2), "sdot": 4 * unroll, "int7": 2 * (acc_n or 0),
             "mla-lowbit": (acc_n or 0) * seg_per_iter}[kernel]
    pad_to = 16 if kernel == "smlal" else kstep      # smlal: a tail block takes the remainder
    kp = -(-k // pad_to) * pad_to
    if kernel == "smlal" and acc_n != 2:
        pro, parts, epi = _gen_smlal_acc(mr, kp, acc_n, requant)
    elif kernel == "smlal":
        pro, parts, epi = _gen_smlal(mr, nr, kp, requant)
    elif kernel == "sdot":
        pro, parts, epi = _gen_sdot(mr, nr, kp, unroll, requant)
    elif kernel == "int7":
        pro, parts, epi = _gen_int7(mr, nr, kp, acc_n, requant)
    else:
        pro, parts, epi = _gen_mla(mr, nr, kp, acc_n, seg_per_iter, requant)
    head = [f"// {kernel} micro-kernel: {mr}x{nr} int32 tile, K = {kp} (K-step {kstep}), "
            f"{bits}-bit operands" + (", requantised to int8" if requant else ""),
            "// x0: packed A panel, x1: packed B panel, x2: output tile"
            + (", x3: requant parameters" if requant else "")]
    text, account = head + pro, [("once", "\n".join(pro), 1)]
    for part in parts:
        if part[0] == "asm":
            text.append(part[1])
        elif part[0] == "loop":
            _, label, body, n = part
            loop = _loop(label, body)
            text.append(loop)
            account.append(("loop", loop, n))
        else:
            _, lines, n = part
            lines = [lines] if isinstance(lines, str) else lines
            text += lines
            # a branch to a label outside the piece: define it at the end so the piece parses
            tail = [ln.split()[-1] + ":" for ln in lines if ln.startswith("b.")]
            account.append(("once", "\n".join(lines + tail), n))
    text += epi
    account.append(("once", "\n".join(epi), 1))
    acc_report = {"smlal": acc_n, "sdot": 4, "int7": acc_n, "mla-lowbit": acc_n}[kernel]
    return KernelProgram(kernel, mr, nr, kstep, kp, bits, acc_report, requant,
                         "\n".join(text) + "\n", tuple(account))


# ---- validation -------------------------------------------------------------------------------
def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_accumulations(kernel, accumulations, bits, mr, tile):
    if kernel in ("int7", "mla-lowbit"):
        safe = _max_acc(7, 7, 16) if kernel == "int7" else _max_acc(bits, bits, 8)
        if accumulations is None:
            accumulations = safe
        if not _is_int(accumulations) or not 1 <= accumulations <= _MAX_ACCUMULATIONS:
            raise ValueError(f"accumulations must be an int in 1..{_MAX_ACCUMULATIONS}, got "
                             f"{accumulations!r}")
        accumulations = int(accumulations)
    elif kernel == "smlal":
        accumulations = 2 if accumulations is None else accumulations
        if (not _is_int(accumulations) or not 2 <= accumulations <= _MAX_ACCUMULATIONS
                or accumulations % 2):
            raise ValueError(f"accumulations for kernel 'smlal' must be an even int in "
                             f"2..{_MAX_ACCUMULATIONS} (SMULL/SMLAL + SMLAL2 add two products "
                             f"per int16 lane per depth group of 16), got {accumulations!r}")
        accumulations = int(accumulations)
        if accumulations > 2 and mr > 3:
            raise ValueError(f"tile for kernel 'smlal' with accumulations={accumulations} must "
                             f"have MR in 1..3 (MR x 4 int16 and int32 sums stay live), got "
                             f"{tile!r}")
    elif accumulations is not None:
        raise ValueError("accumulations applies to kernels 'smlal', 'int7' and 'mla-lowbit' only, "
                         f"got accumulations={accumulations!r} for {kernel!r}")
    return accumulations


def _check_config(kernel, tile, bits, accumulations, unroll, requant):
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if bits is None:
        if kernel == "mla-lowbit":
            raise ValueError("bits is required for kernel 'mla-lowbit': one of (2, 3, 4)")
        bits = _DEFAULT_BITS[kernel]
    if not _is_int(bits) or int(bits) not in _BITS[kernel]:
        raise ValueError(f"bits for kernel {kernel!r} must be one of {tuple(_BITS[kernel])}, "
                         f"got {bits!r}")
    bits = int(bits)
    if tile is None:
        tile = _DEFAULT_TILE[kernel]
        if kernel == "smlal" and accumulations not in (None, 2):
            tile = (2, 4)         # 4 x 4 has no registers for 16 live int16 sums
    if (not isinstance(tile, (tuple, list)) or len(tile) != 2 or not all(map(_is_int, tile))):
        raise ValueError(f"tile must be a pair (MR, NR) of ints, got {tile!r}")
    mr, nr = map(int, tile)
    allowed = {"smlal": "MR in 1..4, NR = 4", "sdot": "MR in {4, 8, 12}, NR in {4, 8, 12, 16}",
               "int7": "MR in 1..6, NR = 8", "mla-lowbit": "MR in 1..4, NR = 16"}[kernel]
    ok = {"smlal": 1 <= mr <= 4 and nr == 4,
          "sdot": mr in (4, 8, 12) and nr in (4, 8, 12, 16),
          "int7": 1 <= mr <= 6 and nr == 8,
          "mla-lowbit": 1 <= mr <= 4 and nr == 16}[kernel]
    if not ok:
        raise ValueError(f"tile for kernel {kernel!r} must have {allowed}, got {tile!r}")
    if kernel == "sdot":
        unroll = 2 if unroll is None else unroll
        if not _is_int(unroll) or not 1 <= unroll <= 4:
            raise ValueError(f"unroll must be an int in 1..4, got {unroll!r}")
        unroll = int(unroll)
        regs = unroll * (mr + nr) // 4 + mr * nr // 4
        if regs > 32:
            raise ValueError(f"tile {tile!r} with unroll {unroll} needs {regs} vector registers "
                             "(> 32); use a smaller tile or unroll")
    elif unroll is not None:
        raise ValueError(f"unroll applies to kernel 'sdot' only, got unroll={unroll!r} for "
                         f"{kernel!r}")
    else:
        unroll = 1
    accumulations = _check_accumulations(kernel, accumulations, bits, mr, tile)
    if requant and mr * nr % 16:
        raise ValueError(f"requant needs MR*NR to be a multiple of 16 (16 int8 outputs per "
                         f"store), got tile {tile!r}")
    return kernel, mr, nr, bits, accumulations, unroll


def _check_operand(name, x, bits):
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.dtype == np.bool_ or not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"{name} must have an integer dtype (int8, or integers within range), "
                        f"got {x.dtype}")
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(f"{name} must be a non-empty 2-D array, got shape {x.shape}")
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if x.dtype != np.int8 or bits < 8:
        xmin, xmax = int(x.min()), int(x.max())
        if xmin < lo or xmax > hi:
            raise ValueError(f"{name} values must fit the kernel's {bits}-bit operands "
                             f"[{lo}, {hi}] (parameter bits={bits}), got range [{xmin}, {xmax}]")
    return x if x.dtype == np.int8 else x.astype(np.int8)


def _check_requant(requant, n):
    if requant is None:
        return None
    if not isinstance(requant, (tuple, list)) or len(requant) != 3:
        raise ValueError("requant must be (multiplier, shift, zero_point), scalars or arrays of "
                         f"length N={n}, got {requant!r}")
    out = []
    for name, v, lo, hi in (("multiplier", requant[0], -(1 << 31), (1 << 31) - 1),
                            ("shift", requant[1], -31, 0), ("zero_point", requant[2], -128, 127)):
        arr = np.asarray(v)
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"requant {name} must be an integer or integer array, got {arr.dtype}")
        if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] != n):
            raise ValueError(f"requant {name} must be a scalar or have shape ({n},) (one per "
                             f"output channel), got shape {arr.shape}")
        if arr.size and (arr.min() < lo or arr.max() > hi):
            raise ValueError(f"requant {name} must be in [{lo}, {hi}], got {arr}")
        out.append(np.broadcast_to(arr.astype(np.int64), (n,)))
    return tuple(out)


# ---- requantisation ---------------------------------------------------------------------------
def quantize_multiplier(real_scale: float) -> tuple[int, int]:
    """Real scale in (0, 1) -> (multiplier, shift), ``real_scale ~= multiplier * 2**(shift - 31)``.

    gemmlowp/TFLite's QuantizeMultiplier convention (:func:`~refimpl.neon.requant.quantize_multiplier_any`,
    restricted to what the GEMM kernels' epilogue runs): ``real_scale = q * 2**shift`` with q in
    [0.5, 1), ``multiplier = round(q * 2**31)`` in [2^30, 2^31 - 1] (ties away from zero; a
    rounding up to 2^31 halves it and increments shift), ``shift <= 0`` meaning a rounding right
    shift by -shift after SQRDMULH. Scales >= 1 (a left shift) are not supported by the kernels'
    epilogue.

    Used in :ref:`ch4-sec-a-real-layer-through-a-kernel`.
    """
    if isinstance(real_scale, (bool, np.bool_)) or not isinstance(real_scale, (int, float, np.number)):
        raise TypeError(f"real_scale must be a real number, got {type(real_scale).__name__}")
    real_scale = float(real_scale)
    if not 0.0 < real_scale < 1.0:
        raise ValueError(f"real_scale must be in (0, 1), got {real_scale!r}")
    mult, shift = quantize_multiplier_any(real_scale)
    if shift > 0:
        raise ValueError(f"real_scale {real_scale!r} rounds to 1.0; the epilogue needs shift <= 0")
    if mult == 0:  # below 2^-32 every int32 accumulator maps to 0 or -1 anyway
        raise ValueError(f"real_scale must be >= 2**-32, got {real_scale!r}")
    return mult, shift


def requantize_reference(acc, multiplier, shift, zero_point) -> np.ndarray:
    """numpy of the kernels' epilogue: int32 (M, N) -> int8 (M, N), per tensor or per column.

    SQRDMULH: ``sat32((2*acc*multiplier + 2**31) >> 32)`` (only MIN*MIN saturates); SRSHL by
    ``shift`` <= 0: ``(x + 2**(-shift-1)) >> -shift`` (ties toward +inf; identity at 0); ADD
    zero_point with int32 wrap; SQXTN to int16 then to int8 (saturating, so a clip to int8).
    ``multiplier``, ``shift``, ``zero_point``: scalars or (N,) arrays (one per output channel).
    """
    s = np.asarray(shift, np.int64)
    if np.any(s > 0):
        raise ValueError(f"shift must be <= 0, got {shift!r}")
    out = fixed_point_multiply(acc, multiplier, s) + np.asarray(zero_point, np.int64)
    out = ((out + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)   # ADD .4s wraps
    return np.clip(out, -128, 127).astype(np.int8)


# ---- packing ----------------------------------------------------------------------------------
def _pad(x, rows, cols):
    if x.shape == (rows, cols):
        return x
    out = np.zeros((rows, cols), x.dtype)
    out[:x.shape[0], :x.shape[1]] = x
    return out


def pack_a(a: np.ndarray, mr: int, kp: int, group: int) -> np.ndarray:
    """Pack A (M, K) int8 into (M/MR, K/g * MR * g) uint8 panels: [k-group][row][g] per block."""
    mp = -(-a.shape[0] // mr) * mr
    ap = _pad(a, mp, kp).view(np.uint8)
    return ap.reshape(mp // mr, mr, kp // group, group).transpose(0, 2, 1, 3).reshape(mp // mr, -1)


def pack_b(b: np.ndarray, nr: int, kp: int, group: int) -> np.ndarray:
    """Pack B (K, N) int8 into (N/NR, K/g * NR * g) uint8 panels: [k-group][column][g]."""
    np_ = -(-b.shape[1] // nr) * nr
    bp = _pad(b, kp, np_).view(np.uint8)
    panels = bp.reshape(kp // group, group, np_ // nr, nr).transpose(2, 0, 3, 1)
    return panels.reshape(np_ // nr, -1)


def _pack_params(rq, nr, nt):
    """(multiplier, shift, zero_point) per column -> (N/NR, NR/4 * 3 * 4) int32 little-endian."""
    cols = np.zeros((3, nt * nr), np.int64)
    for i, v in enumerate(rq):
        cols[i, :v.shape[0]] = v
    return cols.reshape(3, nt, nr // 4, 4).transpose(1, 2, 0, 3).reshape(nt, -1).astype("<i4")


# ---- fast path --------------------------------------------------------------------------------
def _wrap(x, bits):
    half = 1 << (bits - 1)
    return ((x + half) & ((1 << bits) - 1)) - half


def _exact(a, b):
    # float64 matmul (BLAS) is exact here: |products| <= 2^14, K * 2^14 < 2^53
    return np.rint(a.astype(np.float64) @ b.astype(np.float64)).astype(np.int64)


def _segment_sums(a, b, kp, seg, group, lane_bits):
    """Sum of wrapped lane partials: segments of ``seg`` consecutive depth groups of ``group``
    k, each k-phase in its own lane; every partial wraps to ``lane_bits`` before summing."""
    m, n = a.shape[0], b.shape[1]
    ap = _pad(a, m, kp).astype(np.float64).reshape(m, kp // (seg * group), seg, group)
    bp = _pad(b, kp, n).astype(np.float64).reshape(kp // (seg * group), seg, group, n)
    total = np.zeros((m, n), np.int64)
    for s in range(ap.shape[1]):
        for q in range(group):
            part = np.rint(ap[:, s, :, q] @ bp[s, :, q, :]).astype(np.int64)
            total += _wrap(part, lane_bits)
    return total


def _fast_result(prog, a, b):
    kernel = prog.kernel
    if kernel == "smlal" and prog.accumulations != 2:
        # lane j of a block of 8 * accumulations k holds k = 8 i + j, i < accumulations
        bound = int(np.abs(a.astype(np.int64)).max()) * int(np.abs(b.astype(np.int64)).max())
        if prog.accumulations * bound <= (1 << 15) - 1:
            c = _exact(a, b)
        else:
            k1 = prog.k_padded // prog.kstep * prog.kstep      # the loop's blocks, then the tail
            c = _segment_sums(a[:, :k1], b[:k1], k1, prog.accumulations, 8, 16) if k1 else 0
            if k1 < a.shape[1]:
                c = c + _segment_sums(a[:, k1:], b[k1:], prog.k_padded - k1,
                                      (prog.k_padded - k1) // 8, 8, 16)
    elif kernel == "smlal":
        c = _exact(a, b)
        if (a == -128).any() and (b == -128).any():
            # lane j of a 16-deep block holds k = j and j + 8: MIN*MIN twice = 32768 wraps
            kp = prog.k_padded
            pa = (_pad(a, a.shape[0], kp) == -128).reshape(a.shape[0], kp // 16, 2, 8)
            pb = (_pad(b, kp, b.shape[1]) == -128).reshape(kp // 16, 2, 8, b.shape[1])
            ia = (pa[:, :, 0] & pa[:, :, 1]).reshape(a.shape[0], -1).astype(np.float64)
            ib = (pb[:, 0] & pb[:, 1]).reshape(-1, b.shape[1]).astype(np.float64)
            c -= 65536 * np.rint(ia @ ib).astype(np.int64)
    elif kernel == "sdot":
        c = _exact(a, b)
    elif kernel == "int7":
        if prog.accumulations <= _max_acc(prog.bits, prog.bits, 16):
            c = _exact(a, b)
        else:
            c = _segment_sums(a, b, prog.k_padded, prog.accumulations, 2, 16)
    else:
        if prog.accumulations <= _max_acc(prog.bits, prog.bits, 8):
            c = _exact(a, b)
        else:
            c = _segment_sums(a, b, prog.k_padded, prog.accumulations, 1, 8)
    return _wrap(c, 32).astype(np.int32)


# ---- cycles -----------------------------------------------------------------------------------
@lru_cache(maxsize=1024)
def _once_cycles(text, core):
    t = Timer(core)
    for ins in parse(text):
        t.step(ins)
    return float(t.cycles)


@lru_cache(maxsize=1024)
def _loop_cycles(text, core):
    return float(steady_state_cycles(text, core))


def tile_cycles(prog: KernelProgram, core: str) -> float:
    """Cycles of one tile: straight-line pieces timed once (x their count) + loop iterations x
    the loop body's steady-state cycles per iteration."""
    total = 0.0
    for kind, text, n in prog.account:
        total += n * (_loop_cycles(text, core) if kind == "loop" else _once_cycles(text, core))
    return total


# ---- trace ------------------------------------------------------------------------------------
def _trace(prog, a, b, rq, core):
    mt, nt = -(-a.shape[0] // prog.mr), -(-b.shape[1] // prog.nr)
    g = _GROUP[prog.kernel]
    pa, pb = pack_a(a, prog.mr, prog.k_padded, g), pack_b(b, prog.nr, prog.k_padded, g)
    out_bytes = prog.mr * prog.nr * (1 if prog.requant else 4)
    params = _pack_params(rq, prog.nr, nt).view(np.uint8) if prog.requant else \
        np.zeros((nt, 0), np.uint8)
    offs, size = {}, 0
    for name, arr in (("a", pa), ("b", pb), ("p", params)):
        offs[name] = size
        size += arr.size
    offs["c"] = size
    size += mt * nt * out_bytes
    m = Machine(core, size + 64)
    m.mem[offs["a"]:offs["a"] + pa.size] = pa.ravel()
    m.mem[offs["b"]:offs["b"] + pb.size] = pb.ravel()
    m.mem[offs["p"]:offs["p"] + params.size] = params.ravel()
    cycles, instructions = 0.0, 0
    for i in range(mt):
        for j in range(nt):
            m.x[0] = offs["a"] + i * pa.shape[1]
            m.x[1] = offs["b"] + j * pb.shape[1]
            m.x[2] = offs["c"] + (i * nt + j) * out_bytes
            m.x[3] = offs["p"] + j * params.shape[1]
            stats = m.run(prog.asm)
            instructions += stats.instructions
            cycles += float(stats.cycles)          # the Machine's Timer for its core
    raw = m.mem[offs["c"]:offs["c"] + mt * nt * out_bytes]
    dt = np.int8 if prog.requant else np.dtype("<i4")
    tiles = raw.view(dt).reshape(mt, nt, prog.mr, prog.nr)
    c = tiles.transpose(0, 2, 1, 3).reshape(mt * prog.mr, nt * prog.nr)
    return c[:a.shape[0], :b.shape[1]].astype(np.int8 if prog.requant else np.int32), cycles, \
        instructions


# ---- public entry point -----------------------------------------------------------------------
@dataclass(frozen=True)
class GemmResult:
    """What :func:`run_gemm` computed: ``result`` (M, N) int32 (int8 with requant), simulated
    ``cycles`` for the whole GEMM, dynamic ``instructions``, ``macs`` = M*K*N (unpadded), the
    ``asm`` of the micro-kernel that ran and its :class:`KernelProgram`."""
    result: np.ndarray
    cycles: float
    instructions: int
    macs: int
    asm: str
    program: KernelProgram = field(repr=False)
    tiles: int = 0

    @property
    def cycles_per_mac(self) -> float:
        return self.cycles / self.macs


def run_gemm(A, B, kernel: str = "sdot", core: str = "cortex-a55", bits=None, trace: bool = False,
             requant=None, *, tile=None, accumulations=None, unroll=None) -> GemmResult:
    """Run ``A @ B`` through a generated NEON micro-kernel; bit-exact result, simulated cycles.

    A: (M, K) activations, B: (K, N) weights (column n = output channel n), int8 arrays or
    integer arrays within the ``bits``-bit signed range (else ValueError naming the parameter).
    ``kernel``: "smlal" (gemmlowp/ruy SMULL+SMLAL2+SADALP), "sdot" (ARMv8.2 dotprod), "int7"
    (EasyQuant SMLAL x7 + SADALP), "mla-lowbit" (DSQ MLA .16b + SADDW). ``bits``: operand width
    (default 8, 8, 7; required for mla-lowbit: 2, 3 or 4). ``requant``: (multiplier, shift,
    zero_point), scalars or (N,) arrays, gives an int8 result (see :func:`requantize_reference`).
    ``tile``: (MR, NR); ``unroll``: sdot's K-loop unroll (K-step 4*unroll).
    ``accumulations`` (smlal, int7, mla-lowbit; UNSAFE above the default): products per narrow
    lane before widening (smlal: even, default 2; above 2 the tile's MR must be 1..3, default
    tile 2 x 4); above ``max_accumulations`` the lanes can wrap, and the result (fast path and
    trace alike) is what the kernel computes, not A @ B (INT7 operands in the narrow range
    [-63, 63] fit 8 products per int16 lane: 8 * 63^2 = 31752).
    ``trace=True`` runs the kernel on a :class:`~refimpl.neon.Machine` for every tile (small
    sizes); ``trace=False`` computes the same bits in numpy and cycles from per-tile accounting.
    Raises :class:`~refimpl.neon.FeatureError` for sdot on a core without dotprod.

    Used in :ref:`ch4-sec-what-a-bit-costs-cycles-per`.
    """
    if core not in CORES:
        raise ValueError(f"core must be one of {CORES}, got {core!r}")
    if not isinstance(trace, (bool, np.bool_)):
        raise TypeError(f"trace must be a bool, got {type(trace).__name__}")
    kernel, mr, nr, bits, acc_n, unroll = _check_config(kernel, tile, bits, accumulations, unroll,
                                                        requant is not None)
    if kernel == "sdot":   # the same check Machine.run makes, up front (also for the fast path)
        feat = INSTRUCTION_FEATURES["sdot"]
        if feat not in CORE_FEATURES[core]:
            have = ", ".join(c for c in CORES if feat in CORE_FEATURES[c])
            raise FeatureError(f"kernel 'sdot': SDOT needs {FEATURES[feat]}, which {core} does "
                               f"not implement (cores with it: {have})")
    a = _check_operand("A", A, bits)
    b = _check_operand("B", B, bits)
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"A is {a.shape} and B is {b.shape}: A's columns (K) must equal B's rows")
    rq = _check_requant(requant, b.shape[1])
    prog = _generate(kernel, mr, nr, a.shape[1], bits, acc_n, unroll, rq is not None)
    tiles = (-(-a.shape[0] // mr)) * (-(-b.shape[1] // nr))
    macs = a.shape[0] * a.shape[1] * b.shape[1]
    if trace:
        c, cycles, instructions = _trace(prog, a, b, rq, core)
    else:
        c = _fast_result(prog, a, b)
        if rq is not None:
            c = requantize_reference(c, *rq)
        cycles = tiles * tile_cycles(prog, core)
        instructions = tiles * prog.instructions
    return GemmResult(c, cycles, instructions, macs, prog.asm, prog, tiles)

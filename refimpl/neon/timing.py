"""Per-core cycle model for the :mod:`refimpl.neon.asm` subset, from published pipeline figures.

:class:`Timer` accounts executed instructions one at a time (program order) and keeps
``cycles``, ``instructions`` and ``stalls`` (cause -> cycles). Two machine models:

* **in-order dual-issue** (Cortex-A53, Cortex-A55): instructions issue in program order, up to
  two per cycle, each when its source operands are ready (RAW) and its pipelines are free; a
  Q-form (128-bit) vector instruction takes both 64-bit vector pipes and may only issue in the
  first slot of a pair (Cortex-A55 SWOG, dual-issue rules; LLVM's AArch64SchedA55.td encodes
  the same as ``BeginGroup`` on its ``WriteVq`` resources); a 128-bit vector load issues alone
  and holds issue for its two 64-bit load-path cycles (measured by ncnn and onnxruntime, cited
  at the A55 table). Stall causes: ``"operand"`` (waiting for a source), ``"pipe"`` (pipeline
  busy, or issue held by a 128-bit load), ``"issue_width"`` (could not pair with the previous
  instruction: slot full or slot rule).
* **out-of-order** (Cortex-A72, Cortex-A76): in-order dispatch of ``width`` instructions and
  ``uop_width`` micro-ops per cycle (a post-indexed access is one more micro-op, the base
  writeback) into a ``window``-entry reorder buffer, register renaming (no WAR/WAW stalls); each
  micro-op issues at the earliest cycle its operands are ready and a pipeline of its kind is
  free, older micro-ops claiming pipeline slots first; in-order retirement. Stall causes:
  ``"operand"``, ``"pipe"``, ``"issue_width"`` (dispatch group full), ``"window"`` (ROB full).

Common assumptions, stated once: loads hit L1; the base-register writeback of a pre/post-indexed
access is ready one cycle after issue (address generation), independent of the data (unlike
llvm-mca's Cortex-A55 model, which serialises it); branches are predicted correctly (taken loop
branches cost no refetch penalty); no memory-ordering or bank conflicts. Multiply-accumulate
instructions read their destination; where the guide gives an accumulate latency in
parentheses (e.g. ``4(1)``), a dependent accumulation from a similar micro-op sees that shorter
latency (late forwarding of the accumulator).

SIMD&FP LDR/STR (q/d/s/h/b, any addressing mode) and LDP/STP (q/d/s) get no rows of their own:
they move the same bytes over the same load/store path as an LD1/ST1 of one (two) registers, so
:func:`klass` files them under ``"ld1"``/``"st1"`` and the bytes-scaled rule of each core applies
(A55/A53: 64 bits a cycle of the load path, a 128-bit load issues alone; A72/A76: one load
micro-op per register). No new latency is introduced. Cross-check with llvm-mca-19
``-instruction-info`` (LLVM's scheduling models): equal for LDR b/h/s/d (A55 3; A57 and N1 5)
and for LDR q on A57/N1 (5) and LDP q on A55 (6); LLVM differs for LDR q on A55 (3, one load
cycle; the LD1 rule here, from ncnn's and onnxruntime's measurements, gives 4 and two cycles),
LDR with a register offset (A55 4, A57/N1 6 for q; here 3/4 and 5) and LDP q on A57/N1 (6/7;
here 5). MOVI ``msl`` has MOVI's row (LLVM's three models give msl and lsl the same figures).
SQSHL (register) has SRSHL's row, ``"rshl"``: the A72 and Neoverse N1 guides list [SU]QSHL with
[SU]RSHL as "ASIMD shift by register, complex" (LLVM's A57 and N1 models agree, SQSHL = SRSHL);
LLVM's A55 model has no row of its own for SQSHL and gives it its default 4 cycles, one more than
SRSHL's 3 (the A55 rows here give both 3).

Wiring into the interpreter: create ``Timer(core)`` once per run and call ``timer.step(ins)``
for every executed :class:`~refimpl.neon.asm.Instruction`, in dynamic order (after or before
executing it; only the operands are used, never register values), then read ``timer.cycles``
and ``timer.stalls``. Steady-state figures for a loop body: :func:`steady_state_cycles`; the
same with llvm-mca-19: :func:`llvm_mca_steady_state`; representative loops and the comparison
table: :mod:`refimpl.neon.loops`.

Why one module (~750 lines): about a third is data, the per-core latency and pipeline tables with
their sources; the two machine models read those tables and nothing else, and the steady-state
and llvm-mca helpers time loops with them.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

from .asm import ARRANGEMENTS, ELEM_BYTES, GReg, Instruction, Mem, SReg, VElem, VList, VReg, parse

__all__ = ["Timer", "CoreModel", "Entry", "CORE_MODELS", "reads_writes", "steady_state_cycles",
           "full_run_cycles",
           "llvm_mca_steady_state", "LLVM_MCA_CPU", "klass"]

FLAGS = "nzcv"


# ---- register reads and writes ---------------------------------------------------------------
def _vname(op) -> str:
    return f"v{op.n}"


def _gname(op: GReg):
    return None if op.zr else f"x{op.n}"  # w and x views are one register; zr is no register


# Instructions that read their destination: accumulators, INS (other lanes kept) and the "2"
# narrowing forms (they write the upper half and keep the lower one).
ACCUMULATING = frozenset({"mla", "mls", "smlal", "smlal2", "sadalp", "sdot"})
_READS_DEST = ACCUMULATING | {"ins", "sqxtn2", "sqxtun2", "xtn2"}


def reads_writes(ins: Instruction) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Registers an instruction reads and writes: names ``v0``..``v31``, ``x0``..``x30`` (w-forms
    name their x register; zr is omitted) and ``nzcv`` for the flags. Derived from the operands
    (ARM ARM DDI 0487 C6/C7 semantics): LDR/LDP/LD1/LD1R write their registers and, written
    back, their base; a register offset's index is read; stores read their data; MLA/MLS/SMLAL(2)/SADALP/SDOT/INS/SQXTN2/SQXTUN2/XTN2 read their
    destination; SUBS/CMP write the flags and B.cond reads them."""
    mn, ops = ins.mnemonic, ins.operands
    reads: list[str] = []
    writes: list[str] = []

    def add(lst, name):
        if name is not None and name not in lst:
            lst.append(name)

    if mn == "b":
        return (), ()
    if mn.startswith("b."):
        return (FLAGS,), ()
    if mn in ("cbz", "cbnz"):
        return tuple(x for x in (_gname(ops[0]),) if x), ()
    if ops and isinstance(ops[-1], Mem):
        *what, mem = ops
        add(reads, f"x{mem.base}")
        if mem.reg is not None:
            add(reads, f"x{mem.reg}")
        regs = []
        for t in what:
            regs += ([f"v{(t.n + i) % 32}" for i in range(t.count)] if isinstance(t, VList)
                     else [_vname(t)] if isinstance(t, SReg) else [_gname(t)])
        for r in regs:
            add(writes if mn in ("ldr", "ldp", "ld1", "ld1r") else reads, r)
        if mem.mode in ("pre", "post"):
            add(writes, f"x{mem.base}")
        return tuple(reads), tuple(writes)
    if mn == "cmp":
        for o in ops:
            if isinstance(o, GReg):
                add(reads, _gname(o))
        return tuple(reads), (FLAGS,)
    dest, srcs = ops[0], ops[1:]
    for o in srcs:
        if isinstance(o, (VReg, VElem, SReg)):
            add(reads, _vname(o))
        elif isinstance(o, GReg):
            add(reads, _gname(o))
    if isinstance(dest, GReg):
        add(writes, _gname(dest))
    else:
        add(writes, _vname(dest))
        if mn in _READS_DEST or (mn == "mov" and isinstance(dest, VElem)):
            add(reads, _vname(dest))
    if mn == "subs":
        add(writes, FLAGS)
    return tuple(reads), tuple(writes)


# ---- instruction classes ---------------------------------------------------------------------
_KLASS = {"mul": "mul", "sqdmulh": "mul", "sqrdmulh": "mul", "mla": "mla", "mls": "mla",
          "smull": "mull", "smull2": "mull", "smlal": "mlal", "smlal2": "mlal",
          "smax": "minmax", "smin": "minmax", "addp": "addp", "saddl": "addl", "saddl2": "addl",
          "saddw": "addl", "saddw2": "addl", "saddlp": "addlp", "sadalp": "adalp", "addv": "addv",
          "movi": "movi", "ext": "ext", "umov": "umov", "sdot": "dot", "sshr": "shr",
          "srshr": "rshr", "srshl": "rshl", "sqshl": "rshl", "sqxtn": "qxtn", "sqxtn2": "qxtn",
          "sqxtun": "qxtn", "sqxtun2": "qxtn", "xtn": "xtn", "xtn2": "xtn", "ldr": "ldr", "str": "str",
          "ld1": "ld1", "ld1r": "ld1r", "st1": "st1", "cbz": "branch", "cbnz": "branch",
          "b": "branch", "subs": "int", "cmp": "int"}


def klass(ins: Instruction) -> str:
    """Timing class of an instruction (the row of the guides' tables it falls in), e.g. ``"mla"``,
    ``"int"`` (scalar ALU), ``"ld1"``; raises ``ValueError`` for a mnemonic outside the model.

    LDR/STR of a SIMD&FP register (q/d/s/h/b) and LDP/STP (q/d/s) are vector loads/stores of
    the same bytes as an LD1/ST1 of one (two) registers, so they take the ``"ld1"``/``"st1"``
    class and its bytes-scaled rule (``CoreModel.entry``)."""
    mn, ops = ins.mnemonic, ins.operands
    if mn.startswith("b."):
        return "branch"
    if mn in ("ldp", "stp") or mn in ("ldr", "str") and isinstance(ops[0], SReg):
        return "ld1" if mn.startswith("ld") else "st1"
    if mn in ("add", "sub"):
        return "int" if isinstance(ops[0], GReg) else "alu"
    if mn == "mov":
        if isinstance(ops[0], GReg):
            return "umov" if isinstance(ops[1], VElem) else "int"
        return "ins" if isinstance(ops[1], VElem) else "ins_gpr"
    if mn == "ins":
        return "ins" if isinstance(ops[1], VElem) else "ins_gpr"
    if mn == "dup":
        return "dup" if isinstance(ops[1], VElem) else "dup_gpr"
    if mn in _KLASS:
        return _KLASS[mn]
    raise ValueError(f"no timing class for mnemonic {mn!r} ({ins.text!r})")


def _is_q(ins: Instruction) -> bool:
    """True for a 128-bit (Q-form) vector operation: any 128-bit register operand."""
    for o in ins.operands:
        if isinstance(o, (VReg, VList)):
            e, n = ARRANGEMENTS[o.arr]
            if e * n == 16:
                return True
    return False


def _mem_shape(ins: Instruction) -> tuple[int, int]:
    """(bytes moved, registers transferred) of a vector load/store (LD1/ST1/LD1R, or LDR/STR/
    LDP/STP of SIMD&FP registers)."""
    ops = ins.operands
    if isinstance(ops[0], SReg):
        regs = len(ops) - 1
        return (16 if ops[0].size == "q" else ELEM_BYTES[ops[0].size]) * regs, regs
    lst = ops[0]
    e, n = ARRANGEMENTS[lst.arr]
    return (e if ins.mnemonic == "ld1r" else e * n * lst.count), lst.count


# ---- core tables -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One table row: result latency (cycles), accumulate latency for late forwarding (or None),
    and micro-ops, each ``(pipes it may use, cycles it occupies that pipe)``; an in-order core
    issues all micro-ops of an instruction in the same cycle."""
    lat: int
    uops: tuple
    acc: int | None = None


def _e(lat, *uops, acc=None):
    return Entry(lat, tuple((tuple(p.split("|")), occ) for p, occ in uops), acc)


@dataclass
class CoreModel:
    """A core's pipeline description: ``kind`` "inorder"/"ooo", ``width`` (issue width, or
    dispatch width for out-of-order), ``window`` (ROB entries), ``rows`` class -> (D-form Entry,
    Q-form Entry), ``wb`` (pipes of the base-register writeback micro-op), the accumulate
    forwarding groups, classes the core does not implement (-> reason), and ``source``."""
    name: str
    kind: str
    width: int
    window: int
    rows: dict
    wb: tuple
    fwd_groups: tuple
    absent: dict = field(default_factory=dict)
    source: str = ""
    single_issue: frozenset = frozenset()
    block_wide_loads: bool = False
    uop_width: int = 0     # out-of-order: micro-ops dispatched per cycle (0: no limit)

    def entry(self, ins: Instruction) -> Entry:
        try:
            k = klass(ins)
        except ValueError as e:
            raise ValueError(f"{self.name} timing model: {e}") from None
        if k in self.absent:
            raise ValueError(f"{ins.mnemonic.upper()} on {self.name}: {self.absent[k]}")
        if k not in self.rows:
            raise ValueError(f"no timing for mnemonic {ins.mnemonic!r} on {self.name}")
        d, q = self.rows[k]
        if k in ("ld1", "st1", "ld1r"):
            return self._mem(k, ins)
        return q if _is_q(ins) else d

    def _mem(self, k, ins):
        """Vector loads/stores scale with the bytes moved; the per-core rule is in ``rows``."""
        d, q = self.rows[k]
        nbytes, regs = _mem_shape(ins)
        if k == "ld1r":
            return d
        return self.mem_rule(k, nbytes, regs, d, q)

    def mem_rule(self, k, nbytes, regs, d, q):
        raise NotImplementedError


def _fwd(*groups):
    return tuple(frozenset(g) for g in groups)


class _InOrder64(CoreModel):
    """A53/A55: 64-bit load and store paths, so a vector access occupies its pipe bytes/8 cycles."""

    def mem_rule(self, k, nbytes, regs, d, q):
        occ = max(1, nbytes // 8)
        pipe = d.uops[0][0]
        if k == "ld1":  # D-form one register: d.lat; each further 64 bits one cycle more
            return Entry(d.lat + occ - 1, ((pipe, occ),))
        return Entry(d.lat, ((pipe, occ),))


class _OoO(CoreModel):
    """A72/A76: one load/store micro-op per register; latency from the 1-2 / 3-4 register rows."""

    def mem_rule(self, k, nbytes, regs, d, q):
        base = q if regs > 2 else d
        return Entry(base.lat, base.uops * regs)


_V = "V0|V1"


def _a55_vec(lat, acc=None):
    """A55 vector row: D-form on either 64-bit pipe, Q-form on both at once."""
    return (_e(lat, (_V, 1), acc=acc), _e(lat, ("V0", 1), ("V1", 1), acc=acc))


def _a55_q(lat, acc=None):  # rows whose operation is 128-bit wide in every form
    q = _e(lat, ("V0", 1), ("V1", 1), acc=acc)
    return (q, q)


A55_ROWS = {
    # Cortex-A55 Software Optimization Guide (ARM-EPM-128372 v3.0), instruction tables (cited
    # by table title; section numbers are not re-checked here except 4.15, which LLVM's
    # AArch64SchedA55.td quotes): integer ALU (1 cycle with forwarding, 2 pipes), loads (L1
    # hit 3 cycles; the load path is 64-bit, so a Q-form load takes 2 cycles of the pipe),
    # stores, branch; 4.15 "Advanced SIMD integer instructions": arith basic 2, arith pairwise/long/complex 3, pairwise add
    # accumulate 4, reduce 3, max/min 2, multiply (incl. SQ(R)DMULH) 4, multiply accumulate
    # (long) 4(1), dot product 4, shift by immediate basic 2, rounding shift (immediate and
    # register) 3, saturating narrow 4, narrow (XTN) 2, move/dup/insert/extract 2, dup and
    # insert from a general register 3 and 2, move to general register 2.
    # Accumulate latency 1 (late forwarding MLA/MLAL <- MLA/MLAL/MUL/MULL): cross-checked with
    # Arm's SLOTHY Cortex-A55 model (slothy/targets/aarch64/cortex_a55.py, "accumulate_latency=1").
    # A Q-form (128-bit) vector load issues alone and holds issue for its 2 load-path cycles
    # (measured, not in the guide's tables: Tencent ncnn docs/developer-guide/
    # arm-a53-a55-dual-issue.md "128bit vector load cannot be dual issued with fmla, wait 2
    # cycles"; onnxruntime commit 50a6f095, A55 QGEMM: "a 128b load instruction would block
    # the pipeline for 2 whole cycles"), see ``block_wide_loads``.
    "int": (_e(1, ("I0|I1", 1)),) * 2,
    "branch": (_e(1, ("B", 1)),) * 2,
    "alu": _a55_vec(2), "minmax": _a55_vec(2), "movi": _a55_vec(2), "dup": _a55_vec(2),
    "ext": _a55_vec(2), "ins": _a55_vec(2), "xtn": _a55_q(2), "shr": _a55_vec(2),
    "addp": _a55_vec(3), "addl": _a55_q(3), "addlp": _a55_vec(3), "addv": _a55_q(3),
    "rshr": _a55_vec(3), "rshl": _a55_vec(3),
    # MUL/MULL carry accumulate latency 1 too: their result reaches a dependent MLA/MLAL's
    # accumulator after 1 cycle (SLOTHY A55: MUL->MLA, MULL->MLAL forwarding)
    "adalp": _a55_vec(4), "qxtn": _a55_q(4), "mul": _a55_vec(4, acc=1), "mull": _a55_q(4, acc=1),
    "mla": _a55_vec(4, acc=1), "mlal": _a55_q(4, acc=1), "dot": _a55_vec(4),
    "dup_gpr": (_e(3, (_V, 1)),) * 2, "ins_gpr": (_e(2, (_V, 1)),) * 2,
    "umov": (_e(2, (_V, 1)),) * 2,
    "ldr": (_e(3, ("LD", 1)),) * 2, "str": (_e(1, ("ST", 1)),) * 2,
    "ld1": (_e(3, ("LD", 1)),) * 2, "ld1r": (_e(3, ("LD", 1)),) * 2,
    "st1": (_e(1, ("ST", 1)),) * 2,
}
_A55_FWD = _fwd({"mla", "mlal", "mul", "mull"})

CORE_MODELS: dict[str, CoreModel] = {}
CORE_MODELS["cortex-a55"] = _InOrder64(
    "cortex-a55", "inorder", 2, 0, A55_ROWS, ("I0|I1",), _A55_FWD, block_wide_loads=True,
    source="Arm Cortex-A55 Software Optimization Guide v3.0 (ARM-EPM-128372): dual-issue "
           "rules, integer/load/store/branch tables, 4.15 Advanced SIMD integer; accumulate "
           "forwarding as in Arm's SLOTHY A55 model; 128-bit load blocking as measured by ncnn "
           "and onnxruntime")

CORE_MODELS["cortex-a53"] = _InOrder64(
    # No Arm software optimization guide exists for Cortex-A53. We use the A55 figures (A55 is
    # A53's successor with the same in-order dual-issue 8-stage pipeline and 64-bit NEON/load
    # datapaths) with two documented A53 differences: it is ARMv8.0 (no SDOT), and a vector load
    # cannot dual-issue with vector data processing (Tencent ncnn,
    # docs/developer-guide/arm-a53-a55-dual-issue.md, measured: "64bit vector load cannot be
    # dual issued with fmla"), modelled as vector loads issuing alone.
    "cortex-a53", "inorder", 2, 0, A55_ROWS, ("I0|I1",), _A55_FWD,
    absent={"dot": "Cortex-A53 implements ARMv8.0-A, which has no dot-product instructions"},
    source="Cortex-A55 SWOG figures (no A53 guide exists) + A53 dual-issue limits measured by "
           "ncnn (docs/developer-guide/arm-a53-a55-dual-issue.md)",
    single_issue=frozenset({"ld1", "ld1r"}), block_wide_loads=True)

_F = "F0|F1"
A72_ROWS = {
    # Cortex-A72 Software Optimization Guide (ARM UAN 0016A), instruction tables (by title):
    # integer ALU (1, I0/I1), loads (4, L), stores (S), branch (B); "ASIMD Integer Instructions":
    # arith basic / pairwise / long / max-min 3 (F0/F1); reduce 4 (F1); multiply (incl.
    # SQ(R)DMULH) D 4, Q 5 at 1/2 per cycle (F0); multiply accumulate D 4(1), Q 5(2) at 1/2 (F0);
    # multiply (accumulate) long 4(1) (F0); pairwise add and accumulate long 4(1) (F1);
    # shift by immediate basic 3, complex (rounding) 4 (F1); shift by register complex D 4,
    # Q 5 at 1/2 (F1); saturating narrow 4 (F1); narrow, move immediate, dup/ext/insert
    # element 3 (F0/F1); dup / insert from general register 8 (L + F0/F1); element to general
    # register 5 (L). "ASIMD Load Instructions": LD1 1-2 registers 5, 3-4 registers 6, one L micro-op
    # per register; LD1R 8 (L + F0/F1); writeback +1 micro-op on I0/I1.
    # Multiply-accumulate late forwarding: the guide's note to the ASIMD integer table
    # (accumulate latency in parentheses, from similar micro-ops).
    # Provenance caveat: these rows were entered from the guide without re-reading the PDF in
    # this project (it was not reachable here). They agree with llvm-mca-19's Cortex-A57 model
    # (LLVM AArch64SchedA57.td, itself derived from the A57 guide, the A72's predecessor) on
    # every compared loop except dsq_mla_int8 (-14 %): see refimpl.neon.loops and the chapter
    # "Integer inference on ARM".
    "int": (_e(1, ("I0|I1", 1)),) * 2,
    "branch": (_e(1, ("B", 1)),) * 2,
    "alu": (_e(3, (_F, 1)),) * 2, "minmax": (_e(3, (_F, 1)),) * 2,
    "addp": (_e(3, (_F, 1)),) * 2, "addl": (_e(3, (_F, 1)),) * 2,
    "addlp": (_e(3, (_F, 1)),) * 2, "movi": (_e(3, (_F, 1)),) * 2,
    "dup": (_e(3, (_F, 1)),) * 2, "ext": (_e(3, (_F, 1)),) * 2, "ins": (_e(3, (_F, 1)),) * 2,
    "xtn": (_e(3, (_F, 1)),) * 2,
    "addv": (_e(4, ("F1", 1)),) * 2,
    "mul": (_e(4, ("F0", 1)), _e(5, ("F0", 2))),
    "mla": (_e(4, ("F0", 1), acc=1), _e(5, ("F0", 2), acc=2)),
    "mull": (_e(4, ("F0", 1)),) * 2, "mlal": (_e(4, ("F0", 1), acc=1),) * 2,
    "adalp": (_e(4, ("F1", 1), acc=1),) * 2,
    "shr": (_e(3, ("F1", 1)),) * 2, "rshr": (_e(4, ("F1", 1)),) * 2,
    "rshl": (_e(4, ("F1", 1)), _e(5, ("F1", 2))), "qxtn": (_e(4, ("F1", 1)),) * 2,
    "dup_gpr": (_e(8, ("L", 1), (_F, 1)),) * 2, "ins_gpr": (_e(8, ("L", 1), (_F, 1)),) * 2,
    "umov": (_e(5, ("L", 1)),) * 2,
    "ldr": (_e(4, ("L", 1)),) * 2, "str": (_e(1, ("S", 1)),) * 2,
    "ld1": (_e(5, ("L", 1)), _e(6, ("L", 1))), "ld1r": (_e(8, ("L", 1), (_F, 1)),) * 2,
    "st1": (_e(1, ("S", 1)), _e(1, ("S", 1))),
}
CORE_MODELS["cortex-a72"] = _OoO(
    # A72 SWOG 4.1 "Dispatch constraints": up to three micro-ops per cycle (quoted in Arm's
    # SLOTHY A72 model); decode is 3 instructions per cycle
    "cortex-a72", "ooo", 3, 128, A72_ROWS, ("I0|I1",),
    _fwd({"mla"}, {"mlal"}, {"adalp"}), uop_width=3,
    absent={"dot": "Cortex-A72 implements ARMv8.0-A, which has no dot-product instructions"},
    source="Arm Cortex-A72 Software Optimization Guide (UAN 0016A): pipeline overview (3-wide "
           "decode; 4.1 dispatch constraints: 3 micro-ops per cycle), integer, load/store, "
           "branch, ASIMD integer and ASIMD load tables")

_VV = "V0|V1"
A76_ROWS = {
    # Cortex-A76 Software Optimization Guide, instruction tables; the ASIMD integer and ASIMD
    # load rows are those of its derivative's guide (Arm Neoverse N1 SWOG, "ASIMD integer
    # instructions" and "ASIMD load instructions"), as LLVM's AArch64SchedNeoverseN1.td
    # encodes them: integer ALU 1 (I0/I1/M); branch (B);
    # ASIMD arith basic / pairwise / long / max-min / move / dup / ext / insert element / narrow
    # 2 (V0/V1); reduce 4H/4S 3 (V1); multiply D 4 (V0), Q 5 at 1/2 (V0); multiply accumulate
    # D 4(1), Q 5(2) at 1/2 (V0); multiply (accumulate) long 4(1) (V0); dot product 2 (V0/V1);
    # pairwise add and accumulate long 4(1) (V1); shift by immediate basic 2, complex 4; shift
    # by register complex 4; saturating narrow 4 (V1); dup from general register 3 (M); insert
    # from general register 5 (M + V); element to general register 2 (V1); loads 4 (L0/L1);
    # LD1 1-2 registers 5, 3-4 registers 6 (one L micro-op per register); LD1R 7 (L + V);
    # writeback +1 micro-op (I). Accumulate late forwarding: the guide's footnote.
    "int": (_e(1, ("I0|I1|M", 1)),) * 2,
    "branch": (_e(1, ("B", 1)),) * 2,
    "alu": (_e(2, (_VV, 1)),) * 2, "minmax": (_e(2, (_VV, 1)),) * 2,
    "addp": (_e(2, (_VV, 1)),) * 2, "addl": (_e(2, (_VV, 1)),) * 2,
    "addlp": (_e(2, (_VV, 1)),) * 2, "movi": (_e(2, (_VV, 1)),) * 2,
    "dup": (_e(2, (_VV, 1)),) * 2, "ext": (_e(2, (_VV, 1)),) * 2, "ins": (_e(2, (_VV, 1)),) * 2,
    "xtn": (_e(2, (_VV, 1)),) * 2,
    "addv": (_e(3, ("V1", 1)),) * 2,
    "mul": (_e(4, ("V0", 1)), _e(5, ("V0", 2))),
    "mla": (_e(4, ("V0", 1), acc=1), _e(5, ("V0", 2), acc=2)),
    "mull": (_e(4, ("V0", 1)),) * 2, "mlal": (_e(4, ("V0", 1), acc=1),) * 2,
    "dot": (_e(2, (_VV, 1)),) * 2,
    "adalp": (_e(4, ("V1", 1), acc=1),) * 2,
    "shr": (_e(2, ("V1", 1)),) * 2, "rshr": (_e(4, ("V1", 1)),) * 2,
    "rshl": (_e(4, ("V1", 1)),) * 2, "qxtn": (_e(4, ("V1", 1)),) * 2,
    "dup_gpr": (_e(3, ("M", 1)),) * 2, "ins_gpr": (_e(5, ("M", 1), (_VV, 1)),) * 2,
    "umov": (_e(2, ("V1", 1)),) * 2,
    "ldr": (_e(4, ("L0|L1", 1)),) * 2, "str": (_e(1, ("L0|L1", 1)),) * 2,
    "ld1": (_e(5, ("L0|L1", 1)), _e(6, ("L0|L1", 1))),
    "ld1r": (_e(7, ("L0|L1", 1), (_VV, 1)),) * 2,
    "st1": (_e(2, ("L0|L1", 1)), _e(2, ("L0|L1", 1))),
}
CORE_MODELS["cortex-a76"] = _OoO(
    # A76 SWOG dispatch constraints: 4 instructions (decode width), up to 8 micro-ops per cycle
    "cortex-a76", "ooo", 4, 128, A76_ROWS, ("I0|I1|M",),
    _fwd({"mla"}, {"mlal"}, {"adalp"}), uop_width=8,
    source="Arm Cortex-A76 Software Optimization Guide: pipeline overview (4-wide decode/"
           "dispatch, 128-entry ROB) and instruction tables; ASIMD rows as in the Neoverse N1 "
           "SWOG (LLVM AArch64SchedNeoverseN1.td)")


# ---- the timer -------------------------------------------------------------------------------
class Timer:
    """Cycle accounting for one core; ``step(ins)`` per executed instruction in program order.

    ``cycles`` (int): cycles until the last instruction completes (in-order) or retires
    (out-of-order), counting the first issue as cycle 0. ``instructions`` (int). ``stalls``
    (dict cause -> cycles). Figures: :data:`CORE_MODELS` (each row cites its guide)."""

    def __init__(self, core: str):
        if core not in CORE_MODELS:
            raise ValueError(f"unknown core {core!r}; expected one of {sorted(CORE_MODELS)}")
        self.core = core
        self.model = CORE_MODELS[core]
        self.cycles = 0
        self.instructions = 0
        self.stalls = {"operand": 0, "pipe": 0, "issue_width": 0}
        if self.model.kind == "ooo":
            self.stalls["window"] = 0
        # register -> (ready cycle, accumulate-forwarded ready cycle or None, forwarding group)
        self._reg: dict[str, tuple] = {}
        self._cur = 0          # in-order: current issue cycle; ooo: current dispatch cycle
        self._used = 0         # instructions issued (dispatched) in the current cycle
        self._used_uops = 0    # ooo: micro-ops dispatched in the current cycle
        self._free: dict[str, int] = {}          # in-order: pipe -> first free cycle
        self._busy: dict[str, set] = {}          # ooo: pipe -> busy cycles
        self._retire: list[int] = []             # ooo: retire cycles of the last `window`
        self._last_retire = 0
        self._cache: dict = {}
        self._block = 0        # in-order: no issue before this cycle (wide load in flight)

    def _decode(self, ins):
        ent = self._cache.get((ins.mnemonic, ins.operands))
        if ent is None:
            m = self.model
            e = m.entry(ins)
            k = klass(ins)
            reads, writes = reads_writes(ins)
            group = next((g for g in m.fwd_groups if k in g), None)
            acc_reg = _vname(ins.operands[0]) if ins.mnemonic in ACCUMULATING else None
            wb = None
            if any(isinstance(o, Mem) and o.mode in ("pre", "post") for o in ins.operands):
                wb = f"x{next(o for o in ins.operands if isinstance(o, Mem)).base}"
            ent = (e, k, reads, writes, group, acc_reg, wb)
            self._cache[(ins.mnemonic, ins.operands)] = ent
        return ent

    def _ready(self, reads, acc_reg, group):
        t = 0
        for r in reads:
            st = self._reg.get(r)
            if st is None:
                continue
            ready, fwd, g = st
            if r == acc_reg and fwd is not None and group is not None and g is group:
                ready = fwd  # late forwarding of the accumulator from a similar micro-op
            t = max(t, ready)
        return t

    def _write(self, writes, wb, t_data, t_issue, e, group, t_wb):
        for r in writes:
            if r == wb:
                self._reg[r] = (t_wb, None, None)
            else:
                fwd = t_issue + e.acc if (e.acc is not None and group is not None) else None
                self._reg[r] = (t_data, fwd, group)

    def step(self, ins: Instruction) -> None:
        """Account one executed instruction (program order); ValueError for an unknown one."""
        e, k, reads, writes, group, acc_reg, wb = self._decode(ins)
        if self.model.kind == "inorder":
            self._step_inorder(e, k, reads, writes, group, acc_reg, wb)
        else:
            self._step_ooo(e, k, reads, writes, group, acc_reg, wb)
        self.instructions += 1

    # in-order dual issue (A53/A55)
    def _step_inorder(self, e, k, reads, writes, group, acc_reg, wb):
        m = self.model
        slot0_only = len(e.uops) > 1 and all(p in (("V0",), ("V1",)) for p, _ in e.uops)
        # a load wider than the 64-bit load path holds issue for its whole occupancy
        blocking = m.block_wide_loads and k in ("ld1", "ld1r") and e.uops[0][1] >= 2
        single = k in m.single_issue or blocking
        if self.instructions == 0:
            earliest0 = 0
        elif self._used >= m.width or (self._used >= 1 and (slot0_only or single)) \
                or self._used < 0:
            earliest0 = self._cur + 1
        else:
            earliest0 = self._cur
        earliest = max(earliest0, self._block)
        t_op = self._ready(reads, acc_reg, group)
        t = max(earliest, t_op)
        # all micro-ops issue together: find the first cycle each has a free pipe
        while True:
            picks, t_need = [], t
            taken = set()
            for pipes, occ in e.uops:
                best = min((p for p in pipes if p not in taken),
                           key=lambda p: self._free.get(p, 0))
                taken.add(best)
                picks.append((best, occ))
                t_need = max(t_need, self._free.get(best, 0))
            if t_need == t:
                break
            t = t_need
        if self.instructions and earliest0 > self._cur and self._used < m.width:
            self.stalls["issue_width"] += earliest0 - self._cur
        self.stalls["pipe"] += earliest - earliest0
        self.stalls["operand"] += max(0, t_op - earliest)
        self.stalls["pipe"] += t - max(earliest, t_op)
        for p, occ in picks:
            self._free[p] = t + occ
        if t > self._cur or self.instructions == 0:
            self._cur, self._used = t, 1
        else:
            self._used += 1
        if single:
            self._used = -1  # nothing pairs after a single-issue instruction
        if blocking:
            self._block = t + e.uops[0][1]
        t_wb = t + 1
        self._write(writes, wb, t + e.lat, t, e, group, t_wb)
        self.cycles = max(self.cycles, t + e.lat)

    # out-of-order (A72/A76)
    def _slot(self, pipes, occ, t):
        """Earliest cycle >= t at which one of ``pipes`` is free for ``occ`` cycles; reserves it."""
        best = None
        for p in pipes:
            busy = self._busy.setdefault(p, set())
            c = t
            while any((c + i) in busy for i in range(occ)):
                c += 1
            # a micro-op that may use several pipes is steered at dispatch to the one with
            # the least pending work (the issue queues are per pipe), earliest slot on ties;
            # otherwise it would take slots a pipe-restricted younger micro-op needs
            key = (len(busy), c)
            if best is None or key < best[0]:
                best = (key, p)
        (_, c), p = best
        self._busy[p].update(range(c, c + occ))
        return c

    def _step_ooo(self, e, k, reads, writes, group, acc_reg, wb):
        m = self.model
        d = self._cur
        n_uops = len(e.uops) + (wb is not None)
        if self._used >= m.width or (m.uop_width and self._used_uops
                                     and self._used_uops + n_uops > m.uop_width):
            d += 1
            self.stalls["issue_width"] += 1
        if len(self._retire) >= m.window:
            free_at = self._retire[-m.window]
            if free_at > d:
                self.stalls["window"] += free_at - d
                d = free_at
        if m.uop_width and n_uops > m.uop_width:
            # more micro-ops than one dispatch group: the rest go in the following cycles
            extra = (n_uops - 1) // m.uop_width
            if d == self._cur and self._used_uops:
                d += 1
            d += extra
            self.stalls["issue_width"] += extra
            n_uops -= extra * m.uop_width
        if d != self._cur:
            self._cur, self._used, self._used_uops = d, 0, 0
            for busy in self._busy.values():  # slots before dispatch can no longer be used
                busy.difference_update([c for c in busy if c < d])
        self._used += 1
        self._used_uops += n_uops
        t_op = max(d, self._ready(reads, acc_reg, group))
        if wb is not None:
            # base-only micro-ops (address + writeback) do not wait for stored data
            t_base = max(d, self._ready([wb], None, None))
            t_wb = self._slot(m.wb[0].split("|"), 1, t_base) + 1
        else:
            t_wb = None
        done = 0
        first = None
        for pipes, occ in e.uops:
            c = self._slot(pipes, occ, t_op)
            first = c if first is None else max(first, c)
            done = max(done, c + e.lat)
        t_issue = first
        self.stalls["operand"] += t_op - d
        self.stalls["pipe"] += t_issue - t_op
        self._write(writes, wb, done, t_issue, e, group, t_wb)
        complete = max(done, t_wb or 0)
        self._last_retire = max(self._last_retire, complete)
        self._retire.append(self._last_retire)
        if len(self._retire) > 2 * m.window:
            del self._retire[:m.window]
        self.cycles = self._last_retire

    def _state(self):
        """Timer state relative to the current cycle (hashable), for periodicity detection."""
        ref = self._cur
        regs = tuple(sorted((r, max(a - ref, 0), None if f is None else max(f - ref, 0), id(g))
                            for r, (a, f, g) in self._reg.items()))
        if self.model.kind == "inorder":
            pipes = tuple(sorted((p, max(v - ref, 0)) for p, v in self._free.items()))
            return (self._used, regs, pipes, self.cycles - ref, max(self._block - ref, 0))
        pipes = tuple(sorted((p, tuple(sorted(c - ref for c in b if c >= ref)))
                             for p, b in self._busy.items()))
        rob = tuple(max(r - ref, 0) for r in self._retire[-self.model.window:])
        return (self._used, self._used_uops, regs, pipes, rob, self.cycles - ref)


# ---- steady state ----------------------------------------------------------------------------
def _body(loop_asm: str) -> list[Instruction]:
    prog = parse(loop_asm)
    if not prog:
        raise ValueError("loop body has no instructions")
    return prog


def steady_state_cycles(loop_asm: str, core: str) -> float:
    """Cycles per iteration of ``loop_asm`` repeated as a straight-line block (its branches
    counted as predicted), llvm-mca's way: ``(cycles(n2 iterations) - cycles(n1)) / (n2 - n1)``.

    Computed exactly without n2 full runs: the Timer's state relative to its current cycle is
    recorded after every iteration; once a state repeats (iteration j and k), the cycle counts
    continue periodically, c(n + (k - j)) = c(n) + c(k) - c(j) for n >= j, since the model is a
    deterministic function of that relative state. Returns a float."""
    n1, n2 = 200, 400
    prog = _body(loop_asm)
    t = Timer(core)
    cyc = [0]
    seen: dict = {}
    for it in range(1, n2 + 1):
        for ins in prog:
            t.step(ins)
        cyc.append(t.cycles)
        st = t._state()
        if st in seen:
            j, k = seen[st], it
            p, drift = k - j, cyc[k] - cyc[j]

            def c(n):
                if n <= k:
                    return cyc[n]
                q, r = divmod(n - j, p)
                return cyc[j + r] + q * drift
            return (c(n2) - c(n1)) / (n2 - n1)
        seen[st] = it
    return (cyc[n2] - cyc[n1]) / (n2 - n1)


def full_run_cycles(loop_asm: str, core: str, iterations: int) -> int:
    """Timer cycles of ``iterations`` straight-line repetitions of the body (reference for
    :func:`steady_state_cycles`)."""
    prog = _body(loop_asm)
    t = Timer(core)
    for _ in range(iterations):
        for ins in prog:
            t.step(ins)
    return t.cycles


# ---- llvm-mca --------------------------------------------------------------------------------
LLVM_MCA_CPU = {"cortex-a55": "cortex-a55", "cortex-a72": "cortex-a57",
                "cortex-a76": "neoverse-n1"}
LLVM_MCA = "llvm-mca-19"


def _mca_cycles(path: str, cpu: str, n: int) -> int:
    exe = shutil.which(LLVM_MCA)
    if exe is None:
        raise FileNotFoundError(f"{LLVM_MCA} not found on PATH; install the Debian package "
                                "llvm-19 (apt-get install llvm-19)")
    out = subprocess.run([exe, "-mtriple=aarch64", f"-mcpu={cpu}", "-mattr=+dotprod",
                          f"-iterations={n}", path], capture_output=True, text=True, check=True)
    m = re.search(r"Total Cycles:\s+(\d+)", out.stdout)
    if m is None:
        raise RuntimeError(f"could not read Total Cycles from llvm-mca output:\n{out.stdout}")
    return int(m.group(1))


def llvm_mca_steady_state(loop_asm: str, core: str) -> float:
    """llvm-mca-19's cycles per iteration of ``loop_asm``, ``(cycles(400) - cycles(200)) / 200``.

    Cores map to LLVM models: cortex-a55 -> cortex-a55, cortex-a72 -> cortex-a57 (LLVM's A57
    model stands for the A72), cortex-a76 -> neoverse-n1 (LLVM 19 has no A76 model; the N1 is
    its derivative). cortex-a53 raises ValueError; a missing binary FileNotFoundError."""
    if core == "cortex-a53":
        raise ValueError("cortex-a53 is not compared with llvm-mca: LLVM's Cortex-A53 model "
                         "(AArch64SchedA53.td) gives NEON integer instructions one flat latency "
                         "(WriteV), so it carries no per-instruction figures to compare")
    if core not in LLVM_MCA_CPU:
        raise ValueError(f"unknown core {core!r}; expected one of {sorted(LLVM_MCA_CPU)}")
    if shutil.which(LLVM_MCA) is None:
        raise FileNotFoundError(f"{LLVM_MCA} not found on PATH; install the Debian package "
                                "llvm-19 (apt-get install llvm-19)")
    fd, path = tempfile.mkstemp(suffix=".s")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(loop_asm if loop_asm.endswith("\n") else loop_asm + "\n")
        cpu = LLVM_MCA_CPU[core]
        return (_mca_cycles(path, cpu, 400) - _mca_cycles(path, cpu, 200)) / 200
    finally:
        os.unlink(path)


"""Parser for a documented subset of GNU ``as`` AArch64 syntax (NEON integer + scalar control).

Subset accepted (anything else raises :class:`AsmError` naming the line and its text):

* one instruction per line, or several separated by ``;``; ``//`` starts a comment;
* labels ``name:`` (identifier ``[A-Za-z_.$][A-Za-z0-9_.$]*``), alone or before an instruction;
  numeric local labels (``1:`` / ``1b``) are not supported;
* vector registers ``v0.8b v0.16b v0.4h v0.8h v0.2s v0.4s v0.1d v0.2d``, elements ``v2.b[15]`` (index decimal or hex),
  ``v2.h[7]``, ``v2.s[3]``, ``v2.d[1]``, SDOT's group of four bytes ``v2.4b[3]``, SIMD scalars
  ``b0 h0 s0 d0``;
* SIMD&FP registers as memory transfer registers ``q0``..``q31`` (LDR/STR/LDP/STP only);
* general registers ``x0..x30``, ``w0..w30``, ``xzr``, ``wzr`` (no ``sp``);
* immediates ``#5``, ``#-1``, ``#0x1f`` and a trailing ``lsl #n`` shift where the form takes one:
  ADD/SUB/SUBS/CMP ``#0..4095{, lsl #12}``; MOVI ``.8b/.16b #imm8``, ``.4h/.8h #imm8{, lsl #0|8}``,
  ``.2s/.4s #imm8{, lsl #0|8|16|24}``, ``.2s/.4s #imm8, msl #8|16`` (shifting ones in),
  ``.2d #bytemask`` (the forms keystone 0.9.2 accepts; no scalar ``movi d0``, no ``lsl #0`` on
  the byte form); MOV ``#imm`` only where MOVZ or
  MOVN encodes it (one 16-bit chunk, or the complement of one), not bitmask immediates;
* scalar ADD/SUB/SUBS/CMP register forms without a shift or extend;
* UMOV ``w``/``.b .h .s``, ``x``/``.d`` (``mov`` alias for ``.s``/``.d``); INS from a general
  register (``w`` for ``.b .h .s``, ``x`` for ``.d``) or from an element of the same size, and
  its ``mov`` alias; EXT ``.8b`` (index 0..7) and ``.16b`` (0..15);
* SDOT (dot-product extension, ARMv8.2; :class:`~refimpl.neon.Machine` rejects it on cores
  without it) ``.2s, .8b, .8b``, ``.4s, .16b, .16b`` and by element ``.2s, .8b, vM.4b[i]``,
  ``.4s, .16b, vM.4b[i]`` (i 0..3, M 0..31);
* SQDMULH/SQRDMULH vector ``.4h .8h .2s .4s``, by element (``.h`` from v0-v15, ``.s`` from
  v0-v31), and the scalar forms ``h``/``s`` (register and by element);
* SSHR/SRSHR ``#1..esize`` and SRSHL (register) on ``.8b .16b .4h .8h .2s .4s .2d`` and scalar
  ``d``; SQSHL (register) on the same arrangements and scalar ``b h s d``; SQXTN/SQXTUN (and
  their ``2`` forms) ``.8b/.16b <- .8h``, ``.4h/.8h <- .4s``, ``.2s/.4s <- .2d`` and scalar
  ``b <- h``, ``h <- s``, ``s <- d``; XTN/XTN2 vector only (the ISA has no scalar XTN). Not in:
  the unsigned/accumulating/narrowing shift variants (USHR, SSRA, SHRN, ...), SQSHL
  (immediate), SQRSHL, UDOT, SQRDMLAH, and the saturation flag FPSR.QC (not modelled);
* memory operands (base ``x0..x30``; no ``sp``): LDR/STR of ``x``/``w`` and of the SIMD&FP
  registers ``q``/``d``/``s``/``h``/``b`` (``q0``..``q31``: all 128 bits; loading ``d``/``s``/
  ``h``/``b`` zeroes the rest of the vector register) with ``[xN]``, ``[xN, #imm]`` (unsigned
  offset, a multiple of the access size up to 4095 times it; unscaled LDUR offsets are not
  accepted), pre-index ``[xN, #imm]!`` and post-index ``[xN], #imm`` (imm -256..255; an x/w
  transfer register may not be the written-back base, which the ISA leaves UNPREDICTABLE) and
  register offset ``[xN, xM]`` / ``[xN, xM, lsl #k]`` (M 0..30, k 0 or log2 of the access size;
  ``b`` only ``lsl #0``; no ``w`` index with an extend); LDP/STP of ``q``/``d``/``s`` pairs with
  ``[xN{, #imm}]``, ``[xN, #imm]!`` and ``[xN], #imm`` (imm a multiple of the register size in
  -64..63 times it; LDP with the same register twice is UNPREDICTABLE and rejected); LD1/ST1
  with a list of 1-4 consecutive registers of one arrangement
  (``{v31.4s, v0.4s}`` wraps), ``[xN]``, ``[xN], #size`` (size = bytes transferred, as the ISA
  requires) or ``[xN], xM``; LD1R with one register, the same addressing (size = one element).

Mnemonics and register names are case-insensitive; label names are case-sensitive. Each
instruction's operands are checked against :data:`FORMS`, the arrangements the ARM Architecture
Reference Manual (DDI 0487) allows for that instruction, so an illegal arrangement is an error
at parse time, not a silent wrong result.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["AsmError", "mov_wide", "Instruction", "VList", "Mem", "VReg", "VElem", "SReg", "GReg", "Imm",
           "Shift", "Label", "ARRANGEMENTS", "FORMS", "CONDITIONS", "parse"]


class AsmError(ValueError):
    """Unsupported or malformed assembly; the message names the line number and its text."""


# arrangement -> (element bytes, lane count); 64-bit forms are those with bytes * lanes == 8
ARRANGEMENTS = {"8b": (1, 8), "16b": (1, 16), "4h": (2, 4), "8h": (2, 8),
                "2s": (4, 2), "4s": (4, 4), "1d": (8, 1), "2d": (8, 2)}
ELEM_BYTES = {"b": 1, "h": 2, "s": 4, "d": 8}
CONDITIONS = ("eq", "ne", "cs", "hs", "cc", "lo", "mi", "pl", "vs", "vc",
              "hi", "ls", "ge", "lt", "gt", "le", "al")


@dataclass(frozen=True)
class VReg:
    """Vector register with arrangement, e.g. ``v3.8h``."""
    n: int
    arr: str


@dataclass(frozen=True)
class VElem:
    """Vector element, e.g. ``v2.h[3]``: size letter (or ``4b``, SDOT's group of four bytes,
    ``v2.4b[3]``) and lane index."""
    n: int
    size: str
    index: int


@dataclass(frozen=True)
class SReg:
    """SIMD&FP scalar register ``b0``/``h0``/``s0``/``d0``, or ``q0`` (the whole 128-bit
    register; only as the transfer register of LDR/STR/LDP/STP)."""
    n: int
    size: str


@dataclass(frozen=True)
class GReg:
    """General register: ``n`` 0..30, or 31 for ``xzr``/``wzr``; ``is64`` for x-forms."""
    n: int
    is64: bool

    @property
    def zr(self) -> bool:
        return self.n == 31


@dataclass(frozen=True)
class Imm:
    """Immediate ``#value`` as written (MOV's register value is computed at execution)."""
    value: int


@dataclass(frozen=True)
class Shift:
    """``lsl #amount`` trailing an immediate, or with ``kind`` "msl" MOVI's ``msl #amount``
    (shift left, shifting ones in)."""
    amount: int
    kind: str = "lsl"


@dataclass(frozen=True)
class Label:
    """Branch target; ``target`` is the index of the instruction the label precedes."""
    name: str
    target: int = -1


@dataclass(frozen=True)
class VList:
    """Register list ``{v0.8h, v1.8h}``: first register, count (1-4, consecutive mod 32)."""
    n: int
    count: int
    arr: str


@dataclass(frozen=True)
class Mem:
    """Memory operand on base ``x<base>``: mode "off" (``[xN]``, ``[xN, #imm]``), "pre"
    (``[xN, #imm]!``), "post" (``[xN], #imm``, or ``[xN], xM`` with ``reg`` = M) or "reg"
    (register offset ``[xN, xM{, lsl #shift}]``: address xN + (xM << shift), no writeback)."""
    base: int
    imm: int = 0
    mode: str = "off"
    reg: int | None = None
    shift: int = 0


@dataclass(frozen=True)
class Instruction:
    """One parsed instruction: lower-case mnemonic (``b.ne`` keeps its condition), operand
    objects, 1-based source line and the statement's text."""
    mnemonic: str
    operands: tuple
    line: int
    text: str


# ---- operand forms ----------------------------------------------------------------------------
# Tokens: "v.<arr>" vector, "e.<s>" element (any register), "e.h16" element with register < 16
# (by-element multiplies encode Vm in 4 bits for .h), "e.4b" SDOT's 4-byte group, "<s>" scalar
# SIMD, "r" general register of the instruction's width (x or w, zr allowed), "rn" the same but
# not zr (encoding 31 means sp in immediate ADD/SUB, which this subset does not model), "x"/"w" a
# fixed width, "#" immediate, "lsl" shift, "label".
_BHS = ("8b", "16b", "4h", "8h", "2s", "4s")
_ALL = _BHS + ("2d",)
_WIDEN = (("8h", "8b"), ("4s", "4h"), ("2d", "2s"))          # long/wide forms, lower halves
_WIDEN2 = (("8h", "16b"), ("4s", "8h"), ("2d", "4s"))        # the "2" variants, upper halves
_PAIRWISE = (("4h", "8b"), ("8h", "16b"), ("2s", "4h"), ("4s", "8h"), ("1d", "2s"), ("2d", "4s"))


def _same3(arrs):
    return [("v." + a,) * 3 for a in arrs]


def _by_elem(arrs):  # MUL/MLA/MLS (by element): .h from v0-v15, .s from v0-v31
    return [("v." + a, "v." + a, "e.h16" if a in ("4h", "8h") else "e.s") for a in arrs]


def _long(pairs, elem=False):
    if elem:  # SMULL/SMLAL (by element): only 16- and 32-bit sources exist
        return [("v." + d, "v." + s, "e.h16" if s[-1] == "h" else "e.s")
                for d, s in pairs if s[-1] in "hs"]
    return [("v." + d, "v." + s, "v." + s) for d, s in pairs]


def _sat_mulh():  # SQDMULH/SQRDMULH: vector, by element, scalar, scalar by element
    return _same3(("4h", "8h", "2s", "4s")) + _by_elem(("4h", "8h", "2s", "4s")) \
        + [("h", "h", "h"), ("s", "s", "s"), ("h", "h", "e.h16"), ("s", "s", "e.s")]


_NARROW = [("v." + s, "v." + d) for d, s in _WIDEN]         # .8b <- .8h, ...
_NARROW2 = [("v." + s, "v." + d) for d, s in _WIDEN2]       # .16b <- .8h, ...
_NARROW_SCALAR = [("b", "h"), ("h", "s"), ("s", "d")]
_SHIFT_IMM = [("v." + a, "v." + a, "#") for a in _ALL] + [("d", "d", "#")]

_INS = [("e.b", "w"), ("e.h", "w"), ("e.s", "w"), ("e.d", "x"),
        ("e.b", "e.b"), ("e.h", "e.h"), ("e.s", "e.s"), ("e.d", "e.d")]
_SCALAR_ARITH = [("rn", "rn", "#"), ("rn", "rn", "#", "lsl"), ("r", "r", "r")]
FORMS: dict[str, list[tuple]] = {
    "add": _same3(_ALL) + _SCALAR_ARITH,
    "sub": _same3(_ALL) + _SCALAR_ARITH,
    "mul": _same3(_BHS) + _by_elem(("4h", "8h", "2s", "4s")),
    "mla": _same3(_BHS) + _by_elem(("4h", "8h", "2s", "4s")),
    "mls": _same3(_BHS) + _by_elem(("4h", "8h", "2s", "4s")),
    "smax": _same3(_BHS),
    "smin": _same3(_BHS),
    "addp": _same3(_ALL),
    "smull": _long(_WIDEN) + _long(_WIDEN, True),
    "smull2": _long(_WIDEN2) + _long(_WIDEN2, True),
    "smlal": _long(_WIDEN) + _long(_WIDEN, True),
    "smlal2": _long(_WIDEN2) + _long(_WIDEN2, True),
    "saddl": _long(_WIDEN),
    "saddl2": _long(_WIDEN2),
    "saddw": [("v." + d, "v." + d, "v." + s) for d, s in _WIDEN],
    "saddw2": [("v." + d, "v." + d, "v." + s) for d, s in _WIDEN2],
    "saddlp": [("v." + d, "v." + s) for d, s in _PAIRWISE],
    "sadalp": [("v." + d, "v." + s) for d, s in _PAIRWISE],
    "addv": [("b", "v.8b"), ("b", "v.16b"), ("h", "v.4h"), ("h", "v.8h"), ("s", "v.4s")],
    "movi": [("v.8b", "#"), ("v.16b", "#"), ("v.4h", "#"), ("v.8h", "#"), ("v.4h", "#", "lsl"),
             ("v.8h", "#", "lsl"), ("v.2s", "#"), ("v.4s", "#"), ("v.2s", "#", "lsl"),
             ("v.4s", "#", "lsl"), ("v.2s", "#", "msl"), ("v.4s", "#", "msl"), ("v.2d", "#")],
    "dup": [("v." + a, "e." + a[-1]) for a in _ALL]
           + [("v." + a, "w") for a in _BHS] + [("v.2d", "x")],
    "mov": [("r", "r"), ("r", "#"), ("w", "e.s"), ("x", "e.d")] + _INS,  # UMOV/INS aliases
    "umov": [("w", "e.b"), ("w", "e.h"), ("w", "e.s"), ("x", "e.d")],
    "ins": _INS,
    "ext": [("v.8b", "v.8b", "v.8b", "#"), ("v.16b", "v.16b", "v.16b", "#")],
    "subs": [("r", "rn", "#"), ("r", "rn", "#", "lsl"), ("r", "r", "r")],  # Rd 31 is zr here
    "cmp": [("rn", "#"), ("rn", "#", "lsl"), ("r", "r")],
    "ldr": [("r", "mem")] + [(s, "mem") for s in "qdshb"],
    "str": [("r", "mem")] + [(s, "mem") for s in "qdshb"],
    "ldp": [(s, s, "mem") for s in "qds"],
    "stp": [(s, s, "mem") for s in "qds"],
    "ld1": [("l." + a, "mem") for a in ARRANGEMENTS],
    "st1": [("l." + a, "mem") for a in ARRANGEMENTS],
    "ld1r": [("l." + a, "mem") for a in ARRANGEMENTS],
    "sdot": [("v.2s", "v.8b", "v.8b"), ("v.4s", "v.16b", "v.16b"),
             ("v.2s", "v.8b", "e.4b"), ("v.4s", "v.16b", "e.4b")],
    "sqdmulh": _sat_mulh(),
    "sqrdmulh": _sat_mulh(),
    "sshr": _SHIFT_IMM,
    "srshr": _SHIFT_IMM,
    "srshl": _same3(_ALL) + [("d", "d", "d")],
    "sqshl": _same3(_ALL) + [(s, s, s) for s in "bhsd"],
    "sqxtn": _NARROW + _NARROW_SCALAR,
    "sqxtn2": _NARROW2,
    "sqxtun": _NARROW + _NARROW_SCALAR,
    "sqxtun2": _NARROW2,
    "xtn": _NARROW,
    "xtn2": _NARROW2,
    "b": [("label",)],
    "cbz": [("r", "label")],
    "cbnz": [("r", "label")],
}
FORMS.update({"b." + c: [("label",)] for c in CONDITIONS})
BRANCHES = frozenset(m for m in FORMS if m == "b" or m.startswith("b.") or m in ("cbz", "cbnz"))

_MEMORY = frozenset(("ldr", "str", "ldp", "stp", "ld1", "st1", "ld1r"))
_PAIRS = frozenset(("ldp", "stp"))
_SIMD_BYTES = {"b": 1, "h": 2, "s": 4, "d": 8, "q": 16}   # transfer size of a SIMD&FP register
_IDENT = r"[A-Za-z_.$][A-Za-z0-9_.$]*"
_RE_V = re.compile(r"v(\d+)\.(\d+[bhsd])$")
_RE_E = re.compile(r"v(\d+)\.(4b|[bhsd])\[(0x[0-9a-f]+|\d+)\]$")
_RE_S = re.compile(r"([bhsdq])(\d+)$")
_RE_G = re.compile(r"([xw])(\d+)$")
_RE_IMM = re.compile(r"#(-?(?:0x[0-9a-f]+|\d+))$")
_RE_LSL = re.compile(r"(lsl|msl)\s+#(\d+)$")
_RE_LABEL = re.compile(_IDENT + "$")


def _operand(tok: str, err):
    t = tok.lower()
    if m := _RE_V.match(t):
        if t.split(".")[1] not in ARRANGEMENTS:
            err(f"unknown arrangement {tok!r}")
        return VReg(_regnum(m[1], 31, tok, err), m[2])
    if m := _RE_E.match(t):
        idx, size = int(m[3], 16 if m[3].startswith("0x") else 10), m[2]
        if idx >= 16 // (4 if size == "4b" else ELEM_BYTES[size]):
            err(f"element index out of range in {tok!r}")
        return VElem(_regnum(m[1], 31, tok, err), size, idx)
    if m := _RE_S.match(t):
        return SReg(_regnum(m[2], 31, tok, err), m[1])
    if t in ("xzr", "wzr"):
        return GReg(31, t[0] == "x")
    if m := _RE_G.match(t):
        return GReg(_regnum(m[2], 30, tok, err), m[1] == "x")
    if m := _RE_IMM.match(t):
        digits = m[1].lstrip("-")
        val = int(digits, 16) if digits.startswith("0x") else int(digits)
        return Imm(-val if m[1].startswith("-") else val)
    if m := _RE_LSL.match(t):
        return Shift(int(m[2]), m[1])
    err(f"bad operand {tok!r}")


def _regnum(s, hi, tok, err):
    if len(s) > 1 and s[0] == "0" or int(s) > hi:
        err(f"bad register {tok!r}")
    return int(s)


def _token(op) -> str:
    if isinstance(op, VReg):
        return "v." + op.arr
    if isinstance(op, VElem):
        return "e." + op.size
    if isinstance(op, SReg):
        return op.size
    if isinstance(op, GReg):
        return "x" if op.is64 else "w"
    if isinstance(op, VList):
        return "l." + op.arr
    if isinstance(op, Shift):
        return op.kind
    return {Imm: "#", Label: "label", Mem: "mem"}[type(op)]


def _matches(ops, form) -> bool:
    if len(ops) != len(form):
        return False
    widths = {op.is64 for op in ops if isinstance(op, GReg)}
    for op, f in zip(ops, form):
        tok = _token(op)
        if f in ("r", "rn"):
            if not isinstance(op, GReg) or len(widths) > 1 or (f == "rn" and op.zr):
                return False
        elif f == "e.h16":
            if tok != "e.h" or op.n > 15:
                return False
        elif f != tok:
            return False
    return True


def _check_imm(mn, ops, err):
    """Immediate ranges of the forms (ARM ARM: ADD/SUB/SUBS (immediate), MOVI, MOV aliases,
    SSHR/SRSHR)."""
    if mn in _MEMORY:
        return _check_mem(mn, ops, err)
    imm = next((o.value for o in ops if isinstance(o, Imm)), None)
    sh = next((o.amount for o in ops if isinstance(o, Shift)), 0)
    if imm is None:
        return
    if mn in ("add", "sub", "subs", "cmp"):
        if not 0 <= imm <= 4095 or sh not in (0, 12):
            err("immediate must be 0..4095 with optional lsl #12")
    elif mn == "movi":
        arr = ops[0].arr
        if arr == "2d":
            if not all(b in (0, 0xFF) for b in (imm & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")) \
                    or not 0 <= imm < 1 << 64:
                err("MOVI .2d immediate must have every byte 0x00 or 0xff")
        elif not 0 <= imm <= 255:
            err("MOVI immediate must be 0..255")
        elif any(isinstance(o, Shift) and o.kind == "msl" for o in ops):
            if sh not in (8, 16):
                err("MOVI msl shift must be #8 or #16")
        elif sh not in {1: (0,), 2: (0, 8), 4: (0, 8, 16, 24)}[ARRANGEMENTS[arr][0]]:
            err("MOVI shift not allowed for this arrangement")
    elif mn in ("sshr", "srshr"):
        esize = 8 * (ARRANGEMENTS[ops[0].arr][0] if isinstance(ops[0], VReg)
                     else ELEM_BYTES[ops[0].size])
        if not 1 <= imm <= esize:
            err(f"shift must be 1..{esize} for this element size")
    elif mn == "ext":
        if not 0 <= imm < ARRANGEMENTS[ops[0].arr][1]:
            err(f"EXT index must be 0..{ARRANGEMENTS[ops[0].arr][1] - 1}")
    elif mn == "mov":
        bits = 64 if ops[0].is64 else 32
        if mov_wide(imm, bits) is None:
            err("MOV immediate must be a MOVZ/MOVN value (one 16-bit chunk); "
                "bitmask immediates are not supported")


def _check_mem(mn, ops, err):
    """Addressing modes and offsets (ARM ARM: LDR/STR (immediate, register; SIMD&FP too),
    LDP/STP (SIMD&FP), LD1/ST1 (multiple structures), LD1R)."""
    *regs, mem = ops
    what = regs[0]
    if mn in ("ldr", "str", "ldp", "stp"):
        size = (8 if what.is64 else 4) if isinstance(what, GReg) else _SIMD_BYTES[what.size]
        if mem.mode == "post" and mem.reg is not None:
            err(f"{mn.upper()} register post-index is not an AArch64 addressing mode "
                "(allowed: [xN], [xN, #imm], [xN, #imm]!, [xN], #imm"
                + (")" if mn in _PAIRS else ", [xN, xM{, lsl #k}])"))
        if mn in _PAIRS:
            if mem.mode == "reg":
                err(f"{mn.upper()} has no register offset (allowed: [xN], [xN, #imm], "
                    "[xN, #imm]!, [xN], #imm)")
            if not (-64 * size <= mem.imm <= 63 * size and mem.imm % size == 0):
                err(f"{mn.upper()} offset must be a multiple of {size} in "
                    f"{-64 * size}..{63 * size}")
            if mn == "ldp" and regs[0].n == regs[1].n:
                err("LDP with the same transfer register twice is UNPREDICTABLE")
            return
        if mem.mode == "reg":
            ok = (0,) if size == 1 else (0, size.bit_length() - 1)
            if mem.shift not in ok:
                err(f"register offset shift must be lsl #{' or #'.join(map(str, ok))} "
                    f"for a {size}-byte access")
        if mem.mode == "off" and not (0 <= mem.imm <= 4095 * size and mem.imm % size == 0):
            err(f"offset must be a multiple of {size} in 0..{4095 * size}")
        if mem.mode in ("pre", "post"):
            if not -256 <= mem.imm <= 255:
                err("pre/post-index offset must be -256..255")
            if isinstance(what, GReg) and not what.zr and what.n == mem.base:
                err("transfer register must differ from a written-back base "
                    "(UNPREDICTABLE in the ISA)")
        return
    e, lanes_ = ARRANGEMENTS[what.arr]
    if mn == "ld1r":
        if what.count != 1:
            err("LD1R takes one register")
        size = e
    else:
        size = e * lanes_ * what.count
    if mem.mode in ("pre", "reg") or (mem.mode == "off" and mem.imm != 0):
        err(f"{mn.upper()} addressing is [xN], [xN], #imm or [xN], xM")
    if mem.mode == "post" and mem.reg is None and mem.imm != size:
        err(f"post-index immediate must equal the transfer size {size}")


_RE_MEM = re.compile(r"\[\s*(\w+)\s*(?:,\s*([^\]]*?))?\s*\](!?)$")


def _split(rest, err):
    """Operands split at commas outside ``{}`` and ``[]``."""
    toks, depth, cur = [], 0, ""
    for ch in rest:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth < 0:
                err("unbalanced brackets")
        if ch == "," and depth == 0:
            toks.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if depth:
        err("unbalanced brackets")
    toks.append(cur.strip())
    return toks


def _base(tok, err):
    g = _operand(tok, err)
    if not isinstance(g, GReg) or not g.is64 or g.zr:
        err(f"base register must be x0..x30, got {tok!r}")
    return g.n


def _mem_operands(mn, toks, err):
    """Operands of a memory instruction: register or list (two registers for LDP/STP), memory
    operand (+ post-index)."""
    nregs = 2 if mn in _PAIRS else 1
    if len(toks) not in (nregs + 1, nregs + 2):
        err("expected " + ("two registers" if nregs == 2 else "a register or list")
            + ", an address and an optional post-index")
    first = toks[0]
    if first.startswith("{"):
        if not first.endswith("}"):
            err(f"bad register list {first!r}")
        regs = [_operand(t.strip(), err) for t in first[1:-1].split(",")]
        if not regs or not all(isinstance(r, VReg) for r in regs) or len(regs) > 4:
            err(f"register list must hold 1-4 vector registers: {first!r}")
        if len({r.arr for r in regs}) != 1:
            err(f"mixed arrangements in register list {first!r}")
        if any(r.n != (regs[0].n + i) % 32 for i, r in enumerate(regs)):
            err(f"registers in list {first!r} are not consecutive")
        what = [VList(regs[0].n, len(regs), regs[0].arr)]
    else:
        what = [_operand(t, err) for t in toks[:nregs]]
    toks = toks[nregs - 1:]
    m = _RE_MEM.match(toks[1].lower())
    if not m:
        err(f"bad memory operand {toks[1]!r}")
    base = _base(m[1], err)
    imm, index, shift = 0, None, 0
    if m[2] is not None:
        if m[2].startswith("#"):
            o = _operand(m[2], err)
            if not isinstance(o, Imm):
                err(f"bad offset {m[2]!r}")
            imm = o.value
        else:  # register offset: xM{, lsl #k}
            parts = [p.strip() for p in m[2].split(",")]
            o = _operand(parts[0], err)
            if not isinstance(o, GReg) or not o.is64 or o.zr or len(parts) > 2:
                err(f"bad offset {m[2]!r} (allowed: #imm, xM, xM, lsl #k with M 0..30)")
            index = o.n
            if len(parts) == 2:
                sh = _operand(parts[1], err)
                if not isinstance(sh, Shift) or sh.kind != "lsl":
                    err(f"bad offset {m[2]!r} (allowed: #imm, xM, xM, lsl #k with M 0..30)")
                shift = sh.amount
    if len(toks) == 3:
        if m[3] or m[2] is not None:
            err("post-index needs a plain [xN]")
        o = _operand(toks[2], err)
        if isinstance(o, Imm):
            return what + [Mem(base, o.value, "post")]
        if isinstance(o, GReg) and o.is64 and not o.zr:
            return what + [Mem(base, 0, "post", o.n)]
        err(f"bad post-index {toks[2]!r}")
    if m[3] and (m[2] is None or index is not None):
        err("pre-index needs an offset #imm")
    if index is not None:
        return what + [Mem(base, 0, "reg", index, shift)]
    return what + [Mem(base, imm, "pre" if m[3] else "off")]


def mov_wide(imm, bits):
    """Register value of ``mov Rd, #imm`` if MOVZ or MOVN can encode it, else None."""
    if not -(1 << (bits - 1)) <= imm < 1 << bits:
        return None
    mask = (1 << bits) - 1
    v = imm & mask
    for cand in (v, ~v & mask):  # MOVZ v, or MOVN of its complement
        if any(cand & ~(0xFFFF << s) & mask == 0 for s in range(0, bits, 16)):
            return v
    return None


def parse(text: str) -> list[Instruction]:
    """Parse assembly text into :class:`Instruction` objects, labels resolved to indices.

    Raises :class:`AsmError` (a ``ValueError``) naming the 1-based line and its text for an
    unknown mnemonic, bad register, disallowed arrangement, wrong operand count, bad immediate,
    duplicate or undefined label.
    """
    pending, labels = [], {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        for stmt in raw.split("//", 1)[0].split(";"):
            stmt = stmt.strip()

            def err(msg, stmt=stmt, lineno=lineno):
                raise AsmError(f"line {lineno}: {msg}: {stmt!r}")

            while m := re.match(rf"({_IDENT})\s*:", stmt):
                if m[1] in labels:
                    err(f"duplicate label {m[1]!r}")
                labels[m[1]] = len(pending)
                stmt = stmt[m.end():].strip()
            if not stmt:
                continue
            mn, rest = (re.split(r"\s+", stmt, maxsplit=1) + [""])[:2]
            mn = mn.lower()
            if mn not in FORMS:
                err(f"unknown or unsupported mnemonic {mn!r}")
            toks = _split(rest, err) if rest.strip() else []
            if any(not t for t in toks):
                err("empty operand")
            if mn in _MEMORY:
                ops = _mem_operands(mn, toks, err)
            elif mn in BRANCHES and toks:
                if not _RE_LABEL.match(toks[-1]):
                    err(f"bad label {toks[-1]!r}")
                ops = [_operand(t, err) for t in toks[:-1]] + [Label(toks[-1])]
            else:
                ops = [_operand(t, err) for t in toks]
            if not any(_matches(ops, f) for f in FORMS[mn]):
                err(f"operands not allowed for {mn.upper()} (allowed: "
                    + "; ".join(", ".join(f) for f in FORMS[mn]) + ")")
            _check_imm(mn, ops, err)
            pending.append((mn, ops, lineno, stmt))
    out = []
    for mn, ops, lineno, stmt in pending:
        if ops and isinstance(ops[-1], Label):
            if ops[-1].name not in labels:
                raise AsmError(f"line {lineno}: undefined label {ops[-1].name!r}: {stmt!r}")
            ops[-1] = Label(ops[-1].name, labels[ops[-1].name])
        out.append(Instruction(mn, tuple(ops), lineno, stmt))
    return out

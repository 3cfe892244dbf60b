"""Parser for a documented subset of GNU ``as`` AArch64 syntax (NEON integer + scalar control).

Subset accepted (anything else raises :class:`AsmError` naming the line and its text):

* one instruction per line, or several separated by ``;``; ``//`` starts a comment;
* labels ``name:`` (identifier ``[A-Za-z_.$][A-Za-z0-9_.$]*``), alone or before an instruction;
  numeric local labels (``1:`` / ``1b``) are not supported;
* vector registers ``v0.8b v0.16b v0.4h v0.8h v0.2s v0.4s v0.1d v0.2d``, elements ``v2.b[15]`` (index decimal or hex),
  ``v2.h[7]``, ``v2.s[3]``, ``v2.d[1]``, SIMD scalars ``b0 h0 s0 d0``;
* general registers ``x0..x30``, ``w0..w30``, ``xzr``, ``wzr`` (no ``sp``);
* immediates ``#5``, ``#-1``, ``#0x1f`` and a trailing ``lsl #n`` shift where the form takes one:
  ADD/SUB/SUBS/CMP ``#0..4095{, lsl #12}``; MOVI ``.8b/.16b #imm8``, ``.4h/.8h #imm8{, lsl #0|8}``,
  ``.2s/.4s #imm8{, lsl #0|8|16|24}``, ``.2d #bytemask`` (the forms keystone 0.9.2 accepts; no
  ``msl``, no scalar ``movi d0``, no ``lsl #0`` on the byte form); MOV ``#imm`` only where MOVZ or
  MOVN encodes it (one 16-bit chunk, or the complement of one), not bitmask immediates;
* scalar ADD/SUB/SUBS/CMP register forms without a shift or extend.

Mnemonics and register names are case-insensitive; label names are case-sensitive. Each
instruction's operands are checked against :data:`FORMS`, the arrangements the ARM Architecture
Reference Manual (DDI 0487) allows for that instruction, so an illegal arrangement is an error
at parse time, not a silent wrong result.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["AsmError", "Instruction", "VReg", "VElem", "SReg", "GReg", "Imm", "Shift", "Label",
           "ARRANGEMENTS", "FORMS", "CONDITIONS", "parse"]


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
    """Vector element, e.g. ``v2.h[3]``: size letter and lane index."""
    n: int
    size: str
    index: int


@dataclass(frozen=True)
class SReg:
    """SIMD&FP scalar register ``b0``/``h0``/``s0``/``d0``."""
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
    """``lsl #amount`` trailing an immediate."""
    amount: int


@dataclass(frozen=True)
class Label:
    """Branch target; ``target`` is the index of the instruction the label precedes."""
    name: str
    target: int = -1


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
# (by-element multiplies encode Vm in 4 bits for .h), "<s>" scalar SIMD, "r" general register of
# the instruction's width (x or w, zr allowed), "rn" the same but not zr (encoding 31 means sp in
# immediate ADD/SUB, which this subset does not model), "x"/"w" a fixed width, "#" immediate,
# "lsl" shift, "label".
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
             ("v.4s", "#", "lsl"), ("v.2d", "#")],
    "dup": [("v." + a, "e." + a[-1]) for a in _ALL]
           + [("v." + a, "w") for a in _BHS] + [("v.2d", "x")],
    "mov": [("r", "r"), ("r", "#")],
    "subs": [("r", "rn", "#"), ("r", "rn", "#", "lsl"), ("r", "r", "r")],  # Rd 31 is zr here
    "cmp": [("rn", "#"), ("rn", "#", "lsl"), ("r", "r")],
    "b": [("label",)],
    "cbz": [("r", "label")],
    "cbnz": [("r", "label")],
}
FORMS.update({"b." + c: [("label",)] for c in CONDITIONS})
BRANCHES = frozenset(m for m in FORMS if m == "b" or m.startswith("b.") or m in ("cbz", "cbnz"))

_IDENT = r"[A-Za-z_.$][A-Za-z0-9_.$]*"
_RE_V = re.compile(r"v(\d+)\.(\d+[bhsd])$")
_RE_E = re.compile(r"v(\d+)\.([bhsd])\[(0x[0-9a-f]+|\d+)\]$")
_RE_S = re.compile(r"([bhsd])(\d+)$")
_RE_G = re.compile(r"([xw])(\d+)$")
_RE_IMM = re.compile(r"#(-?(?:0x[0-9a-f]+|\d+))$")
_RE_LSL = re.compile(r"lsl\s+#(\d+)$")
_RE_LABEL = re.compile(_IDENT + "$")


def _operand(tok: str, err):
    t = tok.lower()
    if m := _RE_V.match(t):
        if t.split(".")[1] not in ARRANGEMENTS:
            err(f"unknown arrangement {tok!r}")
        return VReg(_regnum(m[1], 31, tok, err), m[2])
    if m := _RE_E.match(t):
        idx, size = int(m[3], 16 if m[3].startswith("0x") else 10), m[2]
        if idx >= 16 // ELEM_BYTES[size]:
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
        return Shift(int(m[1]))
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
    return {Imm: "#", Shift: "lsl", Label: "label"}[type(op)]


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
    """Immediate ranges of the forms (ARM ARM: ADD/SUB/SUBS (immediate), MOVI, MOV aliases)."""
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
        elif sh not in {1: (0,), 2: (0, 8), 4: (0, 8, 16, 24)}[ARRANGEMENTS[arr][0]]:
            err("MOVI shift not allowed for this arrangement")
    elif mn == "mov":
        bits = 64 if ops[0].is64 else 32
        if _mov_wide(imm, bits) is None:
            err("MOV immediate must be a MOVZ/MOVN value (one 16-bit chunk); "
                "bitmask immediates are not supported")


def _mov_wide(imm, bits):
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
            toks = [t.strip() for t in rest.split(",")] if rest.strip() else []
            if any(not t for t in toks):
                err("empty operand")
            if mn in BRANCHES and toks:
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

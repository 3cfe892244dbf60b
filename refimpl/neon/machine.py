"""An AArch64 machine state and an interpreter for the :mod:`refimpl.neon.asm` subset.

Semantics follow the ARM Architecture Reference Manual (DDI 0487), section C7 (SIMD&FP
instructions) and C6 (base instructions); each handler names its instruction. Timing comes from
:mod:`refimpl.neon.timing`: :meth:`Machine.run` steps a fresh :class:`~refimpl.neon.timing.Timer`
of the machine's core over every executed instruction and reports cycles and stalls.

Saturating instructions (SQDMULH, SQRDMULH, SQSHL, SQXTN, SQXTUN) saturate their results as the
ISA does but do not model the cumulative saturation flag FPSR.QC. Instructions from extensions are
checked against the core before anything executes (:data:`CORE_FEATURES`,
:data:`INSTRUCTION_FEATURES`); a core lacking one raises :class:`FeatureError`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .asm import (ARRANGEMENTS, ELEM_BYTES, AsmError, GReg, Imm, Instruction, Shift, SReg, VElem,
                  VReg, mov_wide, parse)
from .timing import Timer

__all__ = ["Machine", "RunStats", "CORES", "CORE_FEATURES", "FEATURES", "INSTRUCTION_FEATURES",
           "FeatureError", "lanes"]

CORES = ("cortex-a53", "cortex-a55", "cortex-a72", "cortex-a76")
"""The cores the simulator and its cycle model know: ``Machine(core=...)`` takes one of them;
``CORE_FEATURES`` gives the architecture extensions each has.

Used in :ref:`ch4-sec-what-a-bit-costs-cycles-per`.
"""
# Architecture extensions beyond ARMv8.0 AdvSIMD that the subset uses, per core: A53 and A72
# are ARMv8.0; A55 and A76 are ARMv8.2 and implement the optional dot-product extension.
FEATURES = {"dotprod": "the dot-product extension (FEAT_DotProd; optional from ARMv8.2)"}
CORE_FEATURES = {"cortex-a53": frozenset(), "cortex-a72": frozenset(),
                 "cortex-a55": frozenset({"dotprod"}), "cortex-a76": frozenset({"dotprod"})}
INSTRUCTION_FEATURES = {"sdot": "dotprod"}
assert set(CORE_FEATURES) == set(CORES)


class FeatureError(AsmError):
    """The program uses an instruction the machine's core does not implement; the message names
    the core, the instruction, its line and the cores that have it."""

_DT = {(1, True): "<i1", (2, True): "<i2", (4, True): "<i4", (8, True): "<i8",
       (1, False): "<u1", (2, False): "<u2", (4, False): "<u4", (8, False): "<u8"}


def lanes(reg: np.ndarray, arrangement: str, signed: bool = True) -> np.ndarray:
    """View of a (16,) uint8 register as the lanes of ``arrangement`` ('8b'..'2d', or an element
    size 'b'/'h'/'s'/'d' for the whole 128 bits), little-endian; a view, so writes go through.

    Used in :ref:`ch4-sec-registers-lanes-and`.
    """
    if arrangement in ARRANGEMENTS:
        e, n = ARRANGEMENTS[arrangement]
    elif arrangement in ELEM_BYTES:
        e, n = ELEM_BYTES[arrangement], 16 // ELEM_BYTES[arrangement]
    else:
        raise ValueError(f"unknown arrangement {arrangement!r}; expected one of "
                         f"{sorted(ARRANGEMENTS) + sorted(ELEM_BYTES)}")
    if reg.dtype != np.uint8 or reg.shape != (16,):
        raise ValueError(f"reg must be a (16,) uint8 array, got {reg.dtype} {reg.shape}")
    return reg.view(_DT[e, signed])[:n]


@dataclass
class RunStats:
    """What :meth:`Machine.run` measured: ``instructions`` executed, ``cycles`` on the machine's
    core (:class:`~refimpl.neon.timing.Timer`) and ``stalls`` (cause -> stall cycles)."""
    instructions: int
    cycles: int = 0
    stalls: dict = field(default_factory=dict)


class Machine:
    """AArch64 register file and memory: ``v`` (32, 16) uint8, ``x`` (31,) uint64, ``mem`` uint8.

    ``core`` is validated, selects the extensions :meth:`run` accepts (:data:`CORE_FEATURES`)
    and the timing model (:data:`refimpl.neon.timing.CORE_MODELS`). Flags ``nzcv`` are a tuple of four
    bools, persisting across :meth:`run` calls like the registers. An x register
    used as an address indexes ``mem`` directly (address 0 is ``mem[0]``); an access reaching
    outside ``mem`` raises ``IndexError`` naming the line and instruction, before any writeback.

    Used in :ref:`ch4-sec-registers-lanes-and`.
    """

    def __init__(self, core: str = "cortex-a55", mem_size: int = 65536):
        if core not in CORES:
            raise ValueError(f"unknown core {core!r}; expected one of {CORES}")
        if not isinstance(mem_size, (int, np.integer)) or isinstance(mem_size, bool) or mem_size < 1:
            raise ValueError(f"mem_size must be a positive int, got {mem_size!r}")
        self.core = core
        self.v = np.zeros((32, 16), np.uint8)
        self.x = np.zeros(31, np.uint64)
        self.mem = np.zeros(int(mem_size), np.uint8)
        self.nzcv = (False, False, False, False)

    # ---- register access ------------------------------------------------------------------
    def _get(self, r: GReg) -> int:
        if r.zr:
            return 0
        v = int(self.x[r.n])
        return v if r.is64 else v & 0xFFFFFFFF

    def _set(self, r: GReg, value: int) -> None:
        if not r.zr:  # writes to xzr/wzr are discarded; w-forms zero the top 32 bits
            self.x[r.n] = value & (0xFFFFFFFFFFFFFFFF if r.is64 else 0xFFFFFFFF)

    def _src(self, op, signed=True):
        return lanes(self.v[op.n], op.arr, signed).astype(np.int64)

    def _elem(self, op: VElem) -> np.int64:
        return np.int64(lanes(self.v[op.n], op.size)[op.index])

    def _write(self, n: int, ebytes: int, values) -> None:
        # Every destination written here is the whole register: lanes beyond the result
        # (upper 64 bits of a 64-bit form, the rest of a scalar) become zero.
        reg = np.zeros(16, np.uint8)
        vals = np.asarray(values, np.int64)
        reg.view(_DT[ebytes, True])[:vals.size] = vals.astype(_DT[ebytes, True])  # wraps
        self.v[n] = reg

    # ---- running ------------------------------------------------------------------------------
    def run(self, asm_text: str, max_instructions: int = 10_000_000) -> RunStats:
        """Parse ``asm_text`` and execute it from the first instruction until control falls off
        the end; raise ``RuntimeError`` after ``max_instructions`` (a runaway loop)."""
        prog = parse(asm_text)
        self._check_features(prog)
        timer = Timer(self.core)
        pc = count = 0
        while pc < len(prog):
            if count >= max_instructions:
                raise RuntimeError(f"more than {max_instructions} instructions executed; "
                                   f"last at line {prog[pc].line}: {prog[pc].text!r}")
            ins = prog[pc]
            count += 1
            self._ins = ins
            target = self._exec(ins)
            timer.step(ins)
            pc = pc + 1 if target is None else target
        return RunStats(instructions=count, cycles=timer.cycles, stalls=dict(timer.stalls))

    def _check_features(self, prog) -> None:
        """Raise :class:`FeatureError` for the first instruction ``self.core`` lacks."""
        have = CORE_FEATURES[self.core]
        for ins in prog:
            feat = INSTRUCTION_FEATURES.get(ins.mnemonic)
            if feat is not None and feat not in have:
                cores = ", ".join(c for c in CORES if feat in CORE_FEATURES[c])
                raise FeatureError(f"line {ins.line}: {ins.mnemonic.upper()} needs {FEATURES[feat]}, "
                                   f"which {self.core} does not implement (cores with it: {cores}): "
                                   f"{ins.text!r}")

    def _exec(self, ins: Instruction):
        mn, ops = ins.mnemonic, ins.operands
        if mn == "b" or mn.startswith("b."):
            return ops[0].target if mn == "b" or self._cond(mn[2:]) else None
        if mn in ("cbz", "cbnz"):
            return ops[1].target if (self._get(ops[0]) == 0) == (mn == "cbz") else None
        if mn in _MEMORY:
            _MEMORY[mn](self, *ops)
        elif mn in ("umov", "ins") or (mn == "mov" and any(isinstance(o, VElem) for o in ops)):
            (_umov if isinstance(ops[0], GReg) else _ins)(self, *ops)
        elif isinstance(ops[0], GReg) or mn == "cmp":
            self._scalar(mn, ops)
        else:
            _VECTOR[mn](self, *ops)
        return None

    # ---- scalar: MOV, ADD/SUB (immediate, shifted register), SUBS, CMP (C6) ------------------
    def _scalar(self, mn, ops):
        if mn == "cmp":
            mn, ops = "subs", (GReg(31, ops[0].is64),) + tuple(ops)
        d = ops[0]
        bits = 64 if d.is64 else 32
        if mn == "mov":
            val = self._get(ops[1]) if isinstance(ops[1], GReg) else mov_wide(ops[1].value, bits)
            return self._set(d, val)
        a = self._get(ops[1])
        b = self._get(ops[2]) if isinstance(ops[2], GReg) else \
            ops[2].value << (ops[3].amount if len(ops) > 3 and isinstance(ops[3], Shift) else 0)
        if mn == "add":
            return self._set(d, a + b)
        res = (a - b) & ((1 << bits) - 1)
        if mn == "subs":  # AddWithCarry(a, NOT b, 1): C is "no borrow", V signed overflow
            sign = 1 << (bits - 1)
            self.nzcv = (bool(res & sign), res == 0, a >= b,
                         bool((a ^ b) & (a ^ res) & sign))
        self._set(d, res)

    # ---- memory (C6 LDR/STR (immediate, register); C7 LDR/STR/LDP/STP (SIMD&FP), LD1/ST1
    # (multiple structures), LD1R) -------------------------------------------------------------
    def _addr(self, mem, size: int) -> int:
        """Access address of ``mem`` (bounds-checked for ``size`` bytes); performs writeback.
        No alignment check: unaligned accesses to normal memory are allowed (as on QEMU)."""
        base = int(self.x[mem.base])
        if mem.mode == "reg":
            off = int(self.x[mem.reg]) << mem.shift
        else:
            off = mem.imm if mem.mode in ("off", "pre") else 0
        addr = (base + off) & 0xFFFFFFFFFFFFFFFF
        if addr + size > self.mem.size:
            ins = self._ins
            raise IndexError(f"line {ins.line}: address {addr:#x}..{addr + size - 1:#x} outside "
                             f"memory (size {self.mem.size:#x}): {ins.text!r}")
        if mem.mode == "pre":
            self.x[mem.base] = addr
        elif mem.mode == "post":
            step = int(self.x[mem.reg]) if mem.reg is not None else mem.imm
            self.x[mem.base] = (base + step) & 0xFFFFFFFFFFFFFFFF
        return addr

    def _cond(self, c: str) -> bool:
        n, z, cf, v = self.nzcv
        base = {"eq": z, "cs": cf, "hs": cf, "mi": n, "vs": v, "hi": cf and not z,
                "ge": n == v, "gt": not z and n == v, "al": True}
        inverse = {"ne": "eq", "cc": "cs", "lo": "hs", "pl": "mi", "vc": "vs", "ls": "hi",
                   "lt": "ge", "le": "gt"}
        return not base[inverse[c]] if c in inverse else base[c]


# ---- vector instructions (C7), each (machine, *operands) -------------------------------------
def _eb(op):  # element bytes of a VReg
    return ARRANGEMENTS[op.arr][0]


def _rhs(m, op):  # second multiplicand: a vector, or one element broadcast (by-element forms)
    return m._elem(op) if isinstance(op, VElem) else m._src(op)


def _half(m, d, n):  # sources of long/wide forms: the lower half, or the upper half for "2"
    return m._src(n)[-ARRANGEMENTS[d.arr][1]:]


def _add(m, d, n, k):  # ADD (vector)
    m._write(d.n, _eb(d), m._src(n) + m._src(k))


def _sub(m, d, n, k):  # SUB (vector)
    m._write(d.n, _eb(d), m._src(n) - m._src(k))


def _mul(m, d, n, k):  # MUL (vector), MUL (by element)
    m._write(d.n, _eb(d), m._src(n) * _rhs(m, k))


def _mla(m, d, n, k):  # MLA (vector), MLA (by element)
    m._write(d.n, _eb(d), m._src(d) + m._src(n) * _rhs(m, k))


def _mls(m, d, n, k):  # MLS (vector), MLS (by element)
    m._write(d.n, _eb(d), m._src(d) - m._src(n) * _rhs(m, k))


def _smax(m, d, n, k):  # SMAX
    m._write(d.n, _eb(d), np.maximum(m._src(n), m._src(k)))


def _smin(m, d, n, k):  # SMIN
    m._write(d.n, _eb(d), np.minimum(m._src(n), m._src(k)))


def _addp(m, d, n, k):  # ADDP (vector): pairs of the concatenation Vm:Vn, Vn's pairs first
    cat = np.concatenate([m._src(n), m._src(k)])
    m._write(d.n, _eb(d), cat[0::2] + cat[1::2])


def _smull(m, d, n, k):  # SMULL, SMULL2 (vector and by element)
    b = m._elem(k) if isinstance(k, VElem) else _half(m, d, k)
    m._write(d.n, _eb(d), _half(m, d, n) * b)


def _smlal(m, d, n, k):  # SMLAL, SMLAL2 (vector and by element)
    b = m._elem(k) if isinstance(k, VElem) else _half(m, d, k)
    m._write(d.n, _eb(d), m._src(d) + _half(m, d, n) * b)


def _saddl(m, d, n, k):  # SADDL, SADDL2
    m._write(d.n, _eb(d), _half(m, d, n) + _half(m, d, k))


def _saddw(m, d, n, k):  # SADDW, SADDW2
    m._write(d.n, _eb(d), m._src(n) + _half(m, d, k))


def _saddlp(m, d, n):  # SADDLP
    a = m._src(n)
    m._write(d.n, _eb(d), a[0::2] + a[1::2])


def _sadalp(m, d, n):  # SADALP
    a = m._src(n)
    m._write(d.n, _eb(d), m._src(d) + a[0::2] + a[1::2])


def _addv(m, d, n):  # ADDV: the sum wraps to the element size, written to a scalar register
    m._write(d.n, ELEM_BYTES[d.size], [m._src(n).sum()])


def _movi(m, d, imm: Imm, sh=None):  # MOVI (8-bit shifted immediates, msl; 64-bit byte mask)
    e, count = ARRANGEMENTS[d.arr]
    val = imm.value << (sh.amount if sh else 0)
    if sh is not None and sh.kind == "msl":  # ones shifted in: imm8:Ones(amount)
        val |= (1 << sh.amount) - 1
    if e == 8:  # the byte mask as a signed 64-bit lane value
        val = val - (1 << 64) if val >= 1 << 63 else val
    m._write(d.n, e, [val] * count)


def _dup(m, d, s):  # DUP (element), DUP (general): the general register's low bits
    e, count = ARRANGEMENTS[d.arr]
    if isinstance(s, VElem):
        val = int(m._elem(s))
    else:
        val = m._get(s) & ((1 << 8 * e) - 1)
        val = val - (1 << 8 * e) if val >> (8 * e - 1) else val
    m._write(d.n, e, [val] * count)


def _simd_bytes(t: SReg) -> int:  # transfer size of q/d/s/h/b
    return 16 if t.size == "q" else ELEM_BYTES[t.size]


def _load_simd(m, t: SReg, data) -> None:
    """Write ``data`` (uint8, the register's size) to the low bytes of ``t``'s vector register;
    the rest of the 128 bits become zero (writing a d/s/h/b register zeroes the rest)."""
    reg = np.zeros(16, np.uint8)
    reg[:data.size] = data
    m.v[t.n] = reg


def _ldr(m, t, mem):
    """LDR (immediate, register; general and SIMD&FP): x/w (w zero-extends to x) or q/d/s/h/b
    (zeroing the rest of the vector register)."""
    if isinstance(t, SReg):
        size = _simd_bytes(t)
        a = m._addr(mem, size)
        return _load_simd(m, t, m.mem[a:a + size])
    size = 8 if t.is64 else 4
    a = m._addr(mem, size)
    m._set(t, int.from_bytes(m.mem[a:a + size].tobytes(), "little"))


def _str(m, t, mem):
    """STR (immediate, register; general and SIMD&FP): the register's low ``size`` bytes."""
    if isinstance(t, SReg):
        size = _simd_bytes(t)
        data = m.v[t.n][:size].copy()
        a = m._addr(mem, size)
        m.mem[a:a + size] = data
        return
    size = 8 if t.is64 else 4
    val = m._get(t)  # read before writeback (Rt != Rn is enforced by the parser)
    a = m._addr(mem, size)
    m.mem[a:a + size] = np.frombuffer(val.to_bytes(size, "little"), np.uint8)


def _ldp(m, t1, t2, mem):
    """LDP (SIMD&FP): two q/d/s registers from consecutive memory, ``t1`` at the lower address
    (each zeroes the rest of its vector register; ``t1 == t2`` is rejected by the parser)."""
    size = _simd_bytes(t1)
    a = m._addr(mem, 2 * size)
    data = m.mem[a:a + 2 * size].copy()
    _load_simd(m, t1, data[:size])
    _load_simd(m, t2, data[size:])


def _stp(m, t1, t2, mem):
    """STP (SIMD&FP): two q/d/s registers to consecutive memory, ``t1`` at the lower address."""
    size = _simd_bytes(t1)
    data = np.concatenate([m.v[t1.n][:size], m.v[t2.n][:size]])
    a = m._addr(mem, 2 * size)
    m.mem[a:a + 2 * size] = data


def _ld1(m, lst, mem):  # LD1 (multiple structures): consecutive registers, 64-bit forms zero top
    e, count = ARRANGEMENTS[lst.arr]
    rb = e * count
    a = m._addr(mem, rb * lst.count)
    for i in range(lst.count):
        reg = np.zeros(16, np.uint8)
        reg[:rb] = m.mem[a + i * rb:a + (i + 1) * rb]
        m.v[(lst.n + i) % 32] = reg


def _st1(m, lst, mem):  # ST1 (multiple structures)
    e, count = ARRANGEMENTS[lst.arr]
    rb = e * count
    a = m._addr(mem, rb * lst.count)
    for i in range(lst.count):
        m.mem[a + i * rb:a + (i + 1) * rb] = m.v[(lst.n + i) % 32][:rb]


def _ld1r(m, lst, mem):  # LD1R: one element replicated to every lane
    e, count = ARRANGEMENTS[lst.arr]
    a = m._addr(mem, e)
    reg = np.zeros(16, np.uint8)
    reg[:e * count] = np.tile(m.mem[a:a + e], count)
    m.v[lst.n] = reg


def _umov(m, d, s):  # UMOV (and its MOV alias): the element zero-extended
    m._set(d, int(lanes(m.v[s.n], s.size, signed=False)[s.index]))


def _ins(m, d, s):  # INS (general), INS (element), MOV aliases: the other lanes are kept
    lane = lanes(m.v[d.n], d.size, signed=False)
    e = ELEM_BYTES[d.size]
    val = m._get(s) if isinstance(s, GReg) else int(lanes(m.v[s.n], s.size, signed=False)[s.index])
    lane[d.index] = val & ((1 << 8 * e) - 1)


def _ext(m, d, n, k, imm):  # EXT: bytes imm.. of the concatenation Vm:Vn (Vn low)
    size = ARRANGEMENTS[d.arr][1]
    cat = np.concatenate([m.v[n.n][:size], m.v[k.n][:size]])
    reg = np.zeros(16, np.uint8)
    reg[:size] = cat[imm.value:imm.value + size]
    m.v[d.n] = reg


# ---- SDOT, saturating multiplies, shifts and narrows ------------------------------------------
# These work on Python ints: the ISA pseudocode computes in unbounded integers (a rounding
# constant added to a 64-bit lane, 2*MIN*MIN of 32-bit lanes), which int64 would overflow.
def _ebits(op):  # element bits of a vector or SIMD scalar operand
    return 8 * (ARRANGEMENTS[op.arr][0] if isinstance(op, VReg) else ELEM_BYTES[op.size])


def _ints(m, op):  # lanes of a vector, or the single element of a SIMD scalar register
    vals = m._src(op) if isinstance(op, VReg) else lanes(m.v[op.n], op.size)[:1]
    return [int(a) for a in vals]


def _sat(v, bits):  # SignedSatQ
    return min(max(v, -(1 << (bits - 1))), (1 << (bits - 1)) - 1)


def _wrap(v, bits):  # the low bits as a signed value
    half = 1 << (bits - 1)
    return ((v + half) & ((1 << bits) - 1)) - half


def _sdot(m, d, n, k):
    """SDOT (vector), SDOT (by element): each 32-bit lane += the dot product of its four signed
    bytes of Vn with those of Vm (by element: the four bytes ``Vm.4b[i]``, for every lane);
    wraps modulo 2^32."""
    a = lanes(m.v[n.n], n.arr).astype(np.int64).reshape(-1, 4)
    if isinstance(k, VElem):
        b = lanes(m.v[k.n], "b")[4 * k.index:4 * k.index + 4].astype(np.int64)
    else:
        b = m._src(k).reshape(-1, 4)
    m._write(d.n, 4, m._src(d) + (a * b).sum(axis=1))


def _mulh(m, d, n, k, round_const):
    bits = _ebits(d)
    a = _ints(m, n)
    b = [int(m._elem(k))] * len(a) if isinstance(k, VElem) else _ints(m, k)
    rc = (1 << (bits - 1)) if round_const else 0
    m._write(d.n, bits // 8, [_sat((2 * x * y + rc) >> bits, bits) for x, y in zip(a, b)])


def _sqdmulh(m, d, n, k):
    """SQDMULH (vector, by element; scalar forms too): high half of 2*a*b, saturated (only
    MIN*MIN overflows, giving MAX)."""
    _mulh(m, d, n, k, round_const=False)


def _sqrdmulh(m, d, n, k):
    """SQRDMULH (vector, by element; scalar forms too): high half of 2*a*b + 2^(esize-1),
    saturated (MIN*MIN gives MAX)."""
    _mulh(m, d, n, k, round_const=True)


def _sshr(m, d, n, imm):
    """SSHR (vector, scalar): arithmetic shift right by 1..esize (esize gives the sign)."""
    m._write(d.n, _ebits(d) // 8, [x >> imm.value for x in _ints(m, n)])


def _srshr(m, d, n, imm):
    """SRSHR (vector, scalar): rounding arithmetic shift right by 1..esize; the rounding
    constant 2^(sh-1) is added without overflow (so a shift by esize always gives 0)."""
    sh = imm.value
    m._write(d.n, _ebits(d) // 8, [(x + (1 << (sh - 1))) >> sh for x in _ints(m, n)])


def _srshl(m, d, n, k):
    """SRSHL (vector, scalar): shift each lane by the signed low byte of the same lane of Vm;
    positive shifts left (bits above the lane are lost; esize or more gives 0), negative is a
    rounding arithmetic right shift computed without overflow (-esize or less gives 0)."""
    bits = _ebits(d)
    out = []
    for x, y in zip(_ints(m, n), _ints(m, k)):
        sh = ((y & 0xFF) ^ 0x80) - 0x80
        out.append(_wrap(x << sh, bits) if sh >= 0 else (x + (1 << (-sh - 1))) >> -sh)
    m._write(d.n, bits // 8, out)


def _sqshl(m, d, n, k):
    """SQSHL (register; vector, scalar): shift each lane by the signed low byte of the same lane
    of Vm; a positive shift is a left shift saturated to the lane (SignedSatQ: esize or more
    saturates every non-zero lane), a negative one an arithmetic right shift that truncates
    (toward -infinity; -esize or less gives 0 or -1), without rounding (that is SQRSHL)."""
    bits = _ebits(d)
    out = []
    for x, y in zip(_ints(m, n), _ints(m, k)):
        sh = ((y & 0xFF) ^ 0x80) - 0x80
        out.append(_sat(x << sh, bits) if sh >= 0 else x >> -sh)
    m._write(d.n, bits // 8, out)


def _narrow(m, d, n, fn):
    """Write the narrowed lanes ``fn(x, bits)``: a 128-bit destination is a "2" form, which
    writes the upper half and keeps the lower; otherwise the rest of the register is zeroed."""
    bits = _ebits(d)
    vals = [_wrap(fn(x, bits), bits) for x in _ints(m, n)]
    if isinstance(d, VReg) and ARRANGEMENTS[d.arr][0] * ARRANGEMENTS[d.arr][1] == 16:
        reg = m.v[d.n].copy()
        reg[8:].view(_DT[bits // 8, True])[:] = vals
        m.v[d.n] = reg
    else:
        m._write(d.n, bits // 8, vals)


def _sqxtn(m, d, n):
    """SQXTN, SQXTN2 (vector, scalar): signed saturating extract narrow."""
    _narrow(m, d, n, _sat)


def _sqxtun(m, d, n):
    """SQXTUN, SQXTUN2 (vector, scalar): signed source, unsigned saturation to 0..2^bits-1."""
    _narrow(m, d, n, lambda x, bits: min(max(x, 0), (1 << bits) - 1))


def _xtn(m, d, n):
    """XTN, XTN2: extract narrow, keeping the low half of each lane."""
    _narrow(m, d, n, lambda x, bits: x)


_MEMORY = {"ldr": _ldr, "str": _str, "ldp": _ldp, "stp": _stp, "ld1": _ld1, "st1": _st1, "ld1r": _ld1r}

_VECTOR = {"add": _add, "sub": _sub, "mul": _mul, "mla": _mla, "mls": _mls, "smax": _smax,
           "smin": _smin, "addp": _addp, "smull": _smull, "smull2": _smull, "smlal": _smlal,
           "smlal2": _smlal, "saddl": _saddl, "saddl2": _saddl, "saddw": _saddw,
           "saddw2": _saddw, "saddlp": _saddlp, "sadalp": _sadalp, "addv": _addv,
           "movi": _movi, "dup": _dup, "ext": _ext, "sdot": _sdot, "sqdmulh": _sqdmulh,
           "sqrdmulh": _sqrdmulh, "sshr": _sshr, "srshr": _srshr, "srshl": _srshl,
           "sqshl": _sqshl,
           "sqxtn": _sqxtn, "sqxtn2": _sqxtn, "sqxtun": _sqxtun, "sqxtun2": _sqxtun,
           "xtn": _xtn, "xtn2": _xtn}

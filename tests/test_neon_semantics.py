"""refimpl.neon.Machine against QEMU (unicorn, CPU model UC_CPU_ARM64_MAX), bit for bit.

Every instruction form in ``refimpl.neon.asm.FORMS`` is assembled by keystone (SDOT, which
keystone 0.9.2 lacks, by :func:`sdot_word` here), each encoding is checked by disassembling it
with capstone (keystone 0.9.2 can return None or wrong bytes without raising), run on unicorn and on Machine from the same random register state, and the vector
registers, x registers and NZCV flags compared. Register states are biased toward lane-level
MIN/MAX/-1/0/1 of a random element width, where wrap-around lives.
"""

import numpy as np
import pytest

from refimpl.neon import CORES, CORE_FEATURES, FeatureError, Machine, lanes, max_accumulations
from refimpl.neon.asm import ARRANGEMENTS, CONDITIONS, FORMS, Imm, Label, Shift, VElem, parse

# forms writing a SIMD register (vector, or ADDV's scalar); the scalar ones are generated below;
# loads and stores of SIMD registers are test_neon_memory's
VECTOR_FORMS = [(mn, f) for mn, fs in FORMS.items() for f in fs
                if (f[0].startswith("v.") or f[0] in ("b", "h", "s", "d")) and "mem" not in f]
BASE = 0x10000


@pytest.fixture(scope="module")
def emu():
    reason = "differential tests need unicorn, keystone-engine and capstone (pip packages)"
    pytest.importorskip("unicorn", reason=reason)
    pytest.importorskip("keystone", reason=reason)
    pytest.importorskip("capstone", reason=reason)
    return Emulator()


class Emulator:
    """keystone -> capstone check -> unicorn, and a Machine run from the same state."""

    def __init__(self):
        import capstone
        import keystone
        import unicorn
        from unicorn import arm64_const as a

        self.ks = keystone.Ks(keystone.KS_ARCH_ARM64, keystone.KS_MODE_LITTLE_ENDIAN)
        self.cs = capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM)
        self.unicorn, self.const = unicorn, a
        self.q = [a.UC_ARM64_REG_Q0 + i for i in range(32)]
        # X29 and X30 are not contiguous with X0..X28 in unicorn's register enum
        self.xr = [a.UC_ARM64_REG_X0 + i for i in range(29)] + [a.UC_ARM64_REG_X29,
                                                                a.UC_ARM64_REG_X30]
        self.nzcv = a.UC_ARM64_REG_NZCV

    def assemble(self, text: str) -> bytes:
        """Keystone assembles the program one statement a line, with a NOP where an SDOT goes;
        the SDOT words from :func:`sdot_word` replace those NOPs (every instruction is 4 bytes,
        so instruction i sits at 4 * i and branch offsets are unchanged)."""
        prog = parse(text)
        labels = {op.target: op.name for ins in prog for op in ins.operands if isinstance(op, Label)}
        src = []
        for i, ins in enumerate(prog + [None]):
            if i in labels:
                src.append(labels[i] + ":")
            if ins is not None:
                src.append("nop" if ins.mnemonic == "sdot" else ins.text)
        enc, _ = self.ks.asm("\n".join(src), BASE)
        assert enc is not None and len(enc) == 4 * len(prog), f"keystone failed on {text!r}"
        code = bytearray(enc)
        for i, ins in enumerate(prog):
            if ins.mnemonic == "sdot":
                code[4 * i:4 * i + 4] = sdot_word(ins).to_bytes(4, "little")
        code = bytes(code)
        dis = list(self.cs.disasm(code, BASE))
        assert len(dis) == len(prog), f"capstone decoded {len(dis)} of {len(prog)}: {text!r}"
        for ins, d in zip(prog, dis):
            self.check_encoding(ins, d)
        return code

    def check_encoding(self, ins, d):
        """Keystone's encoding of ``ins``, disassembled by capstone, must say the same thing."""
        assert _canon(ins) == _canon_cs(d), f"keystone encoded {ins.text!r} as {d.mnemonic} {d.op_str}"

    def load(self, code: bytes):
        """A fresh emulator holding ``code``. Rewriting code in place on a reused Uc is unsafe:
        unicorn 2.1.4 kept executing the previously translated block at the same address."""
        self.uc = self.unicorn.Uc(self.unicorn.UC_ARCH_ARM64, self.unicorn.UC_MODE_ARM)
        # the default model (Cortex-A72) lacks later extensions; set it before mapping memory
        self.uc.ctl_set_cpu_model(self.const.UC_CPU_ARM64_MAX)
        self.uc.mem_map(BASE, 0x10000)
        self.uc.mem_write(BASE, code)
        self.uc.hook_add(self.unicorn.UC_HOOK_CODE, self._count)

    def _count(self, uc, address, size, user_data):
        self.executed += 1

    def run(self, code: bytes, v, x, max_count=100_000):
        uc = self.uc
        for i in range(32):
            uc.reg_write(self.q[i], int.from_bytes(v[i].tobytes(), "little"))
        for i in range(31):
            uc.reg_write(self.xr[i], int(x[i]))
        uc.reg_write(self.nzcv, 0)
        self.executed = 0
        uc.emu_start(BASE, BASE + len(code), count=max_count)
        v_out = np.array([np.frombuffer(uc.reg_read(q).to_bytes(16, "little"), np.uint8)
                          for q in self.q])
        x_out = np.array([uc.reg_read(r) for r in self.xr], np.uint64)
        nzcv = uc.reg_read(self.nzcv) >> 28
        return v_out, x_out, nzcv

    def check(self, text: str, states):
        """Run ``text`` from every (v, x) state on both; assert identical registers, flags and
        executed-instruction counts."""
        code = self.assemble(text)
        self.load(code)
        for v, x in states:
            v_ref, x_ref, nzcv_ref = self.run(code, v, x)
            m = Machine()
            m.v[:], m.x[:] = v, x
            stats = m.run(text)
            assert stats.instructions == self.executed, text
            np.testing.assert_array_equal(m.v, v_ref, err_msg=text)
            np.testing.assert_array_equal(m.x, x_ref, err_msg=text)
            n, z, c, vf = m.nzcv
            assert (n << 3 | z << 2 | c << 1 | vf) == nzcv_ref, text
        return m


def sdot_word(ins) -> int:
    """The encoding of an SDOT (ARM ARM C7 "SDOT (vector)", "SDOT (by element)"), which
    keystone 0.9.2 does not know: Q selects .16b/.4s; by element, the index is H:L and Vm is
    M:Rm (any of v0-v31, as size is 0b10)."""
    d, n, k = ins.operands
    q = int(d.arr == "4s")
    if isinstance(k, VElem):
        h, lo = k.index >> 1, k.index & 1
        return 0x0F80E000 | q << 30 | lo << 21 | k.n << 16 | h << 11 | n.n << 5 | d.n
    return 0x0E809400 | q << 30 | k.n << 16 | n.n << 5 | d.n


def _cs_text(d):
    """capstone's text with its aliases outside the subset spelled as their base instruction."""
    mn, ops = d.mnemonic, d.op_str
    if mn in ("neg", "negs"):  # SUB/SUBS (shifted register) with Rn = zr
        rd, rm = ops.split(", ")
        mn, ops = "sub" + mn[3:], f"{rd}, {rd[0]}zr, {rm}"
    return f"{mn} {ops}" if ops else mn


def _canon(ins):
    """Comparable form of an instruction: aliases folded, lsl #0 dropped, MOV immediates as the
    register value, branch targets as addresses (what capstone prints)."""
    mn = {"b.cs": "b.hs", "b.cc": "b.lo"}.get(ins.mnemonic, ins.mnemonic)
    ops = [o for o in ins.operands if o != Shift(0)]
    if mn == "ins" or mn == "umov" and ops[1].size in "sd":  # capstone prints the MOV alias
        mn = "mov"
    if mn == "subs" and ops[0].zr:
        mn, ops = "cmp", ops[1:]
    if mn == "mov" and isinstance(ops[1], Imm):
        ops[1] = Imm(ops[1].value & (2**64 - 1 if ops[0].is64 else 2**32 - 1))
    if ops and isinstance(ops[-1], Label):
        ops[-1] = ("address", BASE + 4 * ops[-1].target)
    return mn, tuple(ops)


def _canon_cs(d):
    """_canon of capstone's disassembly; branch operands are read here, since the subset's
    parser takes labels, not addresses."""
    if d.mnemonic in ("b", "cbz", "cbnz") or d.mnemonic.startswith("b."):
        *regs, target = d.op_str.split(", ")
        ops = tuple(parse(f"mov {r}, {r}")[0].operands[0] for r in regs)
        return d.mnemonic, ops + (("address", int(target.lstrip("#"), 16)),)
    return _canon(parse(_cs_text(d))[0])


def _ebits(tok):
    """Element bits of a form token ("v.8h" -> 16, scalar "d" -> 64)."""
    return 8 * (ARRANGEMENTS[tok[2:]][0] if tok.startswith("v.") else
                {"b": 1, "h": 2, "s": 4, "d": 8}[tok])


# ---- random states ------------------------------------------------------------------------
def _state(rng):
    v = rng.integers(0, 256, (32, 16), dtype=np.uint8)
    for r in range(32):
        e = int(rng.choice([1, 2, 4, 8]))
        lane = lanes(v[r], {1: "b", 2: "h", 4: "s", 8: "d"}[e])
        lo, hi = -(1 << (8 * e - 1)), (1 << (8 * e - 1)) - 1
        special = np.array([lo, hi, -1, 0, 1], np.int64).astype(lane.dtype)
        pick = rng.random(lane.size) < 0.6
        lane[pick] = special[rng.integers(0, 5, pick.sum())]
    x = rng.integers(0, 2**63, 31, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 31, dtype=np.uint64)
    special = np.array([0, 1, 2**64 - 1, 2**63, 2**63 - 1, 2**31, 2**31 - 1, 2**32 - 1], np.uint64)
    pick = rng.random(31) < 0.5
    x[pick] = special[rng.integers(0, special.size, pick.sum())]
    return v, x


def _imm(rng, mn, form):
    if mn == "movi":
        arr = form[0][2:]
        if arr == "2d":
            mask = rng.integers(0, 2, 8)
            return f"#{sum(int(b) * 0xFF << 8 * i for i, b in enumerate(mask)):#x}"
        val = int(rng.choice([0, 1, 0x7F, 0x80, 0xFF, int(rng.integers(0, 256))]))
        if "lsl" in form:
            sh = int(rng.choice({"h": [0, 8], "s": [0, 8, 16, 24]}[arr[-1]]))
            return f"#{val:#x}, lsl #{sh}"
        if "msl" in form:  # ones shifted in
            return f"#{val:#x}, msl #{int(rng.choice([8, 16]))}"
        return f"#{val:#x}"
    if mn == "ext":
        return f"#{int(rng.integers(0, 16 if form[0] == 'v.16b' else 8))}"
    if mn in ("sshr", "srshr"):
        esize = _ebits(form[0])
        return f"#{int(rng.choice([1, 2, esize - 1, esize, rng.integers(1, esize + 1)]))}"
    return f"#{int(rng.integers(0, 4096))}"


def _instance(rng, mn, form):
    """Random assembly text of one instruction of the given form."""
    ops, width = [], rng.choice(["x", "w"])
    for f in form:
        r = int(rng.integers(0, 32))
        if f.startswith("v."):
            ops.append(f"v{r}.{f[2:]}")
        elif f == "e.4b":
            ops.append(f"v{r}.4b[{int(rng.integers(0, 4))}]")
        elif f.startswith("e."):
            size = f[2]
            r = r % 16 if f == "e.h16" else r
            ops.append(f"v{r}.{size}[{int(rng.integers(0, 16 // {'b': 1, 'h': 2, 's': 4, 'd': 8}[size]))}]")
        elif f in ("b", "h", "s", "d"):
            ops.append(f"{f}{r}")
        elif f in ("x", "w"):
            ops.append(f"{f}{r % 31}" if rng.random() < 0.9 else f + "zr")
        elif f in ("r", "rn"):
            ops.append(f"{width}{r % 31}" if f == "rn" or rng.random() < 0.9 else width + "zr")
        elif f == "#":
            if "lsl" in form and mn != "movi":
                ops.append(_imm(rng, mn, form) + f", lsl #{int(rng.choice([0, 12]))}")
            else:
                ops.append(_imm(rng, mn, form))
        elif f in ("lsl", "msl"):
            continue  # emitted with the immediate
    return f"{mn} " + ", ".join(ops)


def _scalar_instance(rng):
    mn = str(rng.choice(["mov", "add", "sub", "subs", "cmp"]))
    if mn == "subs" and rng.random() < 0.2:  # SUBS (immediate) with Rd = zr, CMP's encoding
        w = str(rng.choice(["x", "w"]))
        return f"subs {w}zr, {w}{int(rng.integers(0, 31))}, #{int(rng.integers(0, 4096))}"
    w = str(rng.choice(["x", "w"]))
    reg = lambda zr=True: f"{w}{int(rng.integers(0, 31))}" if not zr or rng.random() < 0.9 else w + "zr"
    kind = rng.integers(0, 2)
    if mn == "mov":
        if kind:
            return f"mov {reg()}, {reg()}"
        bits = 64 if w == "x" else 32
        chunk = int(rng.integers(0, 1 << 16)) << int(rng.choice(range(0, bits, 16)))
        return f"mov {reg()}, #{(chunk if rng.random() < 0.5 else ~chunk & ((1 << bits) - 1)):#x}"
    if mn == "cmp":
        return f"cmp {reg(False)}, #{int(rng.integers(0, 4096))}" if kind else f"cmp {reg()}, {reg()}"
    if kind:
        return f"{mn} {reg(False)}, {reg(False)}, #{int(rng.integers(0, 4096))}, lsl #{int(rng.choice([0, 12]))}"
    return f"{mn} {reg()}, {reg()}, {reg()}"


# ---- the differential tests ---------------------------------------------------------------
@pytest.mark.parametrize("mn,form", VECTOR_FORMS, ids=[f"{m}:{','.join(f)}" for m, f in VECTOR_FORMS])
def test_vector_form_matches_qemu(emu, mn, form):
    rng = np.random.default_rng(VECTOR_FORMS.index((mn, form)))
    # 12 instances of the form in one block (registers may alias), from 6 random states
    text = "\n".join(_instance(rng, mn, form) for _ in range(12))
    emu.check(text, [_state(rng) for _ in range(6)])


ELEMENT_FORMS = [(mn, f) for mn in ("umov", "ins", "mov") for f in FORMS[mn]
                 if any(t.startswith("e.") for t in f)]


@pytest.mark.parametrize("mn,form", ELEMENT_FORMS, ids=[f"{m}:{','.join(f)}" for m, f in ELEMENT_FORMS])
def test_element_move_form_matches_qemu(emu, mn, form):
    """UMOV, INS (general and element) and their MOV aliases."""
    rng = np.random.default_rng(500 + ELEMENT_FORMS.index((mn, form)))
    text = "\n".join(_instance(rng, mn, form) for _ in range(12))
    emu.check(text, [_state(rng) for _ in range(6)])


def test_scalar_forms_match_qemu(emu):
    rng = np.random.default_rng(1)
    for _ in range(40):
        text = "\n".join(_scalar_instance(rng) for _ in range(12))
        emu.check(text, [_state(rng) for _ in range(3)])


@pytest.mark.parametrize("seed", range(20))
def test_random_sequences_match_qemu(emu, seed):
    rng = np.random.default_rng(100 + seed)
    lines = []
    for _ in range(40):
        if rng.random() < 0.2:
            lines.append(_scalar_instance(rng))
        else:
            mn, form = VECTOR_FORMS[int(rng.integers(0, len(VECTOR_FORMS)))]
            lines.append(_instance(rng, mn, form))
    emu.check("\n".join(lines), [_state(rng) for _ in range(3)])


@pytest.mark.parametrize("cond", [c for c in CONDITIONS if c != "al"])
def test_conditional_branches_match_qemu(emu, cond):
    rng = np.random.default_rng(CONDITIONS.index(cond))
    edges = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, 2**31 - 1, 2**31, 2**32 - 1, 5]
    for w in ("x", "w"):
        text = (f"cmp {w}1, {w}2\nb.{cond} taken\nadd x3, x3, #1\nb done\n"
                f"taken: add x4, x4, #1\ndone: sub x5, x5, #1")
        states = []
        for a in edges:
            for b in (edges[i] for i in rng.integers(0, len(edges), 4)):
                v, x = _state(rng)
                x[1], x[2] = a, b
                states.append((v, x))
        emu.check(text, states)


@pytest.mark.parametrize("mn", ["cbz", "cbnz"])
def test_compare_and_branch_match_qemu(emu, mn):
    rng = np.random.default_rng(11)
    for w in ("x", "w"):
        text = f"{mn} {w}1, taken\nadd x3, x3, #1\ntaken: add x4, x4, #1"
        states = []
        for a in (0, 1, 2**32, 2**63, 2**64 - 1, 2**32 - 1):  # 2**32 is zero as a w register
            v, x = _state(rng)
            x[1] = a
            states.append((v, x))
        emu.check(text, states)


LOOP_SUBS = """
    mov x0, #37
loop:
    mla v0.8h, v1.8h, v2.h[3]
    smlal2 v3.4s, v4.8h, v5.8h
    sadalp v6.4s, v7.8h
    subs x0, x0, #1
    b.ne loop
"""
LOOP_CBNZ = """
    mov w9, #0x21
outer: mov w8, #3               // nested: 33 x 3 iterations
inner: saddw v10.8h, v10.8h, v11.8b; sub w8, w8, #1
    mla v12.16b, v13.16b, v14.16b
    cbnz w8, inner
    add x2, x2, #2
    sub w9, w9, #1
    cbz w9, end
    b outer
end: addv h15, v12.8h
"""


@pytest.mark.parametrize("text", [LOOP_SUBS, LOOP_CBNZ], ids=["subs_bne", "cbnz_cbz_nested"])
def test_counted_loops_match_qemu(emu, text):
    rng = np.random.default_rng(7)
    emu.check(text, [_state(rng) for _ in range(3)])


# ---- edges, explicitly: each state below puts chosen lane values where the edge is ---------
_SIZE = {8: "b", 16: "h", 32: "s", 64: "d"}


def _wrap(x, bits):
    half = 1 << (bits - 1)
    return ((x + half) & ((1 << bits) - 1)) - half


def _set_lanes(v, reg, bits, values):
    """Fill every lane of ``v[reg]`` at ``bits`` width with ``values`` repeated (wrapped)."""
    lane = lanes(v[reg], _SIZE[bits])
    vals = [_wrap(int(values[i % len(values)]), bits) for i in range(lane.size)]
    lane[:] = np.array(vals, np.int64).astype(lane.dtype)


def _edges(bits):
    return [-(1 << (bits - 1)), (1 << (bits - 1)) - 1, -1, 0, 1]


def _ops(form, regs, elem_index=1):
    """Operand text of ``form`` with register numbers ``regs`` (elements at ``elem_index``)."""
    out = []
    for f, r in zip(form, regs):
        if f.startswith("v."):
            out.append(f"v{r}.{f[2:]}")
        elif f.startswith("e."):
            out.append(f"v{r}.{f[2:4] if f == 'e.4b' else f[2]}[{elem_index}]")
        else:
            out.append(f"{f}{r}")
    return ", ".join(out)


def _lane0(m, reg, bits):
    return int(lanes(m.v[reg], _SIZE[bits])[0])


MULH_FORMS = [(mn, f) for mn in ("sqdmulh", "sqrdmulh") for f in FORMS[mn]]


@pytest.mark.parametrize("mn,form", MULH_FORMS, ids=[f"{m}:{','.join(f)}" for m, f in MULH_FORMS])
def test_saturating_doubling_mulh_edges_match_qemu(emu, mn, form):
    """Every pair of MIN/MAX/-1/0/1 operands (MIN*MIN is the one that saturates, to MAX)."""
    bits = _ebits(form[0])
    rng = np.random.default_rng(900 + MULH_FORMS.index((mn, form)))
    idx = int(rng.integers(0, 128 // bits))
    text = f"{mn} " + _ops(form, (0, 1, 2), idx)
    states = []
    for a in _edges(bits):
        for b in _edges(bits):
            v, x = _state(rng)
            _set_lanes(v, 1, bits, [a])
            _set_lanes(v, 2, bits, [b])
            states.append((v, x))
    emu.check(text, states)
    m = Machine()
    m.v[:] = states[0][0]                                          # MIN * MIN
    m.run(text)
    assert _lane0(m, 0, bits) == (1 << (bits - 1)) - 1


NARROW_FORMS = [(mn, f) for mn in ("sqxtn", "sqxtn2", "sqxtun", "sqxtun2", "xtn", "xtn2")
                for f in FORMS[mn]]


@pytest.mark.parametrize("mn,form", NARROW_FORMS, ids=[f"{m}:{','.join(f)}" for m, f in NARROW_FORMS])
def test_narrow_edges_match_qemu(emu, mn, form):
    """Source MIN/MAX/-1/0/1 and the destination's limits and one past them, in every lane."""
    src, dst = _ebits(form[1]), _ebits(form[0])
    rng = np.random.default_rng(950 + NARROW_FORMS.index((mn, form)))
    values = _edges(src) + [-(1 << (dst - 1)), (1 << (dst - 1)) - 1, -(1 << (dst - 1)) - 1,
                            1 << (dst - 1), (1 << dst) - 1, 1 << dst]
    states = []
    for r in range(len(values)):
        v, x = _state(rng)
        _set_lanes(v, 1, src, values[r:] + values[:r])
        states.append((v, x))
    emu.check(f"{mn} " + _ops(form, (0, 1)), states)


def test_narrow_saturation_values():
    m = Machine()
    m.v[0] = 0xAB
    _set_lanes(m.v, 1, 16, [-32768, 32767, -1, 0, 1, -129, 128, 256])
    m.run("sqxtn v2.8b, v1.8h\nsqxtun v3.8b, v1.8h\nxtn v4.8b, v1.8h\nsqxtn2 v0.16b, v1.8h")
    assert lanes(m.v[2], "8b").tolist() == [-128, 127, -1, 0, 1, -128, 127, 127]
    assert lanes(m.v[3], "8b", signed=False).tolist() == [0, 255, 0, 0, 1, 0, 128, 255]
    assert lanes(m.v[4], "8b", signed=False).tolist() == [0, 255, 255, 0, 1, 127, 128, 0]
    assert (m.v[2:5, 8:] == 0).all()                                # non-2 forms zero the top
    assert (m.v[0, :8] == 0xAB).all() and lanes(m.v[0], "16b")[8:].tolist() == \
        lanes(m.v[2], "8b").tolist()                                # the 2 form keeps the bottom


def _srshl_amounts(bits):
    return [-bits - 1, -bits, -bits + 1, -1, 0, 1, bits - 1, bits, bits + 1, 127, -128]


@pytest.mark.parametrize("form", FORMS["srshl"], ids=[",".join(f) for f in FORMS["srshl"]])
def test_srshl_edge_shift_amounts_match_qemu(emu, form):
    """Each edge shift amount (in the low byte; the lane's other bits random, as only the low
    byte counts) over MIN/MAX/-1/0/1 and neighbours of MIN/MAX, rotated through the lanes."""
    bits = _ebits(form[0])
    rng = np.random.default_rng(990 + FORMS["srshl"].index(form))
    values = _edges(bits) + [-(1 << (bits - 1)) + 1, (1 << (bits - 1)) - 2, 3]
    states = []
    for sh in _srshl_amounts(bits):
        for r in range(0, len(values), 2):
            v, x = _state(rng)
            _set_lanes(v, 1, bits, values[r:] + values[:r])
            high = [int(h) << 8 for h in rng.integers(0, 1 << 16, 16)] if bits > 8 else [0]
            _set_lanes(v, 2, bits, [h | (sh & 0xFF) for h in high])
            states.append((v, x))
    emu.check("srshl " + _ops(form, (0, 1, 2)), states)


@pytest.mark.parametrize("bits", [8, 16, 32, 64])
def test_srshl_edge_values(bits):
    """What QEMU agreed to above, spelled out: shifts by +-esize and beyond give 0 (rounding
    the sign bit away), -esize+1 rounds MIN to -1 and MAX to 1, left shifts wrap."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    expect = {-bits - 1: (0, 0), -bits: (0, 0), -bits + 1: (-1, 1), -1: (lo // 2, (hi + 1) // 2),
              0: (lo, hi), 1: (0, -2), bits - 1: (0, lo), bits: (0, 0), bits + 1: (0, 0),
              127: (0, 0), -128: (0, 0)}
    for sh, (want_lo, want_hi) in expect.items():
        m = Machine()
        _set_lanes(m.v, 1, bits, [lo, hi])
        _set_lanes(m.v, 2, bits, [sh])
        arr = {8: "16b", 16: "8h", 32: "4s", 64: "2d"}[bits]
        m.run(f"srshl v0.{arr}, v1.{arr}, v2.{arr}")
        assert lanes(m.v[0], _SIZE[bits])[:2].tolist() == [want_lo, want_hi], sh


SHR_FORMS = [(mn, f) for mn in ("sshr", "srshr") for f in FORMS[mn]]


@pytest.mark.parametrize("mn,form", SHR_FORMS, ids=[f"{m}:{','.join(f)}" for m, f in SHR_FORMS])
def test_shift_right_by_1_and_esize_match_qemu(emu, mn, form):
    bits = _ebits(form[0])
    rng = np.random.default_rng(1100 + SHR_FORMS.index((mn, form)))
    dst = (0, 3, 4, 5)
    text = "\n".join(f"{mn} " + _ops(form[:2], (r, 1)) + f", #{sh}"
                     for r, sh in zip(dst, (1, bits, bits - 1, 2)) if sh >= 1)
    values = _edges(bits) + [-(1 << (bits - 1)) + 1, (1 << (bits - 1)) - 2]
    states = []
    for r in range(len(values)):
        v, x = _state(rng)
        _set_lanes(v, 1, bits, values[r:] + values[:r])
        states.append((v, x))
    m = emu.check(text, states)
    if mn == "srshr":    # rounding by esize: (x + 2^(esize-1)) >> esize is 0 for every x
        assert (lanes(m.v[3], _SIZE[bits]) == 0).all()


SDOT_EDGE = """
sdot v0.4s, v1.16b, v2.16b
sdot v3.2s, v1.8b, v2.8b
sdot v4.4s, v1.16b, v2.4b[3]
sdot v5.2s, v2.8b, v1.4b[0]
"""


def test_sdot_edges_match_qemu(emu):
    """All -128 or all 127 bytes (dot products +-65536, 65024, 64516 per lane) onto
    accumulators at and near MIN/MAX, so lanes wrap."""
    rng = np.random.default_rng(1200)
    lo, hi = -(1 << 31), (1 << 31) - 1
    accs = [hi, hi - 65535, hi - 65536, lo, lo + 65023, lo + 65024, -1, 0]
    states = []
    for a in (-128, 127):
        for b in (-128, 127):
            for r in range(0, len(accs), 2):
                v, x = _state(rng)
                _set_lanes(v, 1, 8, [a])
                _set_lanes(v, 2, 8, [b])
                for reg in (0, 3, 4, 5):
                    _set_lanes(v, reg, 32, accs[r:] + accs[:r])
                states.append((v, x))
    emu.check(SDOT_EDGE, states)
    m = Machine()
    m.v[1] = m.v[2] = 0x80
    _set_lanes(m.v, 0, 32, [hi])
    m.run(SDOT_EDGE)
    assert lanes(m.v[0], "4s").tolist() == [lo + 65535] * 4           # MAX + 65536 wraps
    assert lanes(m.v[3], "4s").tolist() == [65536, 65536, 0, 0]


def test_sdot_by_element_uses_one_group_for_every_lane():
    m = Machine()
    lanes(m.v[1], "16b")[:] = np.arange(16) - 8
    lanes(m.v[2], "16b")[:] = [0] * 8 + [1, -1, 2, -2] + [0] * 4        # group 2
    m.run("sdot v0.4s, v1.16b, v2.4b[2]")
    a = (np.arange(16) - 8).reshape(4, 4)
    assert lanes(m.v[0], "4s").tolist() == (a @ np.array([1, -1, 2, -2])).tolist()


def test_sdot_encoder_reads_back_through_capstone(emu):
    """Every element index with every Vm (M:Rm covers v16-v31), both Q, random Vd/Vn."""
    rng = np.random.default_rng(1300)
    texts = [f"sdot v{rng.integers(0, 32)}.{d}, v{rng.integers(0, 32)}.{n}, v{mm}.4b[{i}]"
             for d, n in (("2s", "8b"), ("4s", "16b")) for mm in range(32) for i in range(4)]
    texts += [f"sdot v{rng.integers(0, 32)}.{d}, v{rng.integers(0, 32)}.{n}, v{mm}.{n}"
              for d, n in (("2s", "8b"), ("4s", "16b")) for mm in range(32)]
    for text in texts:
        (d,) = emu.cs.disasm(sdot_word(parse(text)[0]).to_bytes(4, "little"), BASE)
        assert f"{d.mnemonic} {d.op_str}" == text


# ---- core features --------------------------------------------------------------------------
def test_dotprod_cores():
    assert {c for c in CORES if "dotprod" in CORE_FEATURES[c]} == {"cortex-a55", "cortex-a76"}


@pytest.mark.parametrize("core", CORES)
def test_sdot_needs_the_dotprod_extension(core):
    text = "movi v1.16b, #2\n// sdot below\nsdot v0.4s, v1.16b, v1.4b[3]"
    m = Machine(core=core)
    if "dotprod" in CORE_FEATURES[core]:
        m.run(text)
        assert lanes(m.v[0], "4s").tolist() == [16] * 4
        return
    with pytest.raises(FeatureError) as e:
        m.run(text)
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    for part in ("line 3", "SDOT", core, "cortex-a55, cortex-a76", "'sdot v0.4s, v1.16b, v1.4b[3]'"):
        assert part in msg, (part, msg)
    assert not m.v.any()                          # rejected before the MOVI ran


# ---- properties that need no emulator -------------------------------------------------------
def test_loop_instruction_count():
    m = Machine()
    assert m.run(LOOP_SUBS).instructions == 1 + 37 * 5
    # mov; 33 x (mov, 3 x 4 inner, add, sub, cbz) + 32 x b outer; addv
    assert Machine().run(LOOP_CBNZ).instructions == 1 + 33 * (1 + 12 + 3) + 32 + 1


def test_dsq_mla_int8_wraps_one_step_after_max_accumulations():
    # worst case 2-bit signed: (-2) * (-2) = 4 per MLA into int8 lanes; 31 fit, the 32nd wraps
    n = max_accumulations(2, 2, 8)
    assert n == 31
    for steps, expect in ((n, 124), (n + 1, -128)):
        m = Machine()
        m.run("movi v1.16b, #0xfe\nmovi v2.16b, #0xfe\n" + "mla v0.16b, v1.16b, v2.16b\n" * steps)
        assert (lanes(m.v[0], "16b") == expect).all()


def test_64bit_forms_zero_upper_half_and_w_writes_zero_top():
    m = Machine()
    m.v[:] = 0xAB
    m.x[:] = 2**64 - 1
    m.run("add v0.8b, v1.8b, v2.8b\naddv s3, v4.4s\nadd w5, w6, #1\nmov w7, w8")
    assert (m.v[0, 8:] == 0).all() and (m.v[3, 4:] == 0).all()
    assert m.x[5] == 0 and m.x[7] == 2**32 - 1


def test_lanes_are_little_endian_views():
    m = Machine()
    m.v[0] = np.arange(16, dtype=np.uint8)
    assert lanes(m.v[0], "8h", signed=False)[1] == 0x0302          # bytes 2..3 of lane 1
    assert lanes(m.v[0], "2s", signed=False).tolist() == [0x03020100, 0x07060504]
    assert lanes(m.v[0], "s").size == 4 and lanes(m.v[0], "1d").size == 1
    lanes(m.v[0], "4h")[0] = -1                                      # a view: writes go through
    assert m.v[0, :2].tolist() == [255, 255]
    with pytest.raises(ValueError, match="unknown arrangement"):
        lanes(m.v[0], "3s")


def test_runaway_loop_is_an_error():
    with pytest.raises(RuntimeError, match="more than 100"):
        Machine().run("l: b l", max_instructions=100)


@pytest.mark.parametrize("core", ["cortex-a53", "cortex-a55", "cortex-a72", "cortex-a76"])
def test_cores_accepted(core):
    assert Machine(core=core).core == core


def test_machine_validation():
    with pytest.raises(ValueError, match="unknown core"):
        Machine(core="cortex-a57")
    with pytest.raises(ValueError, match="mem_size"):
        Machine(mem_size=0)
    m = Machine(mem_size=128)
    assert m.v.shape == (32, 16) and m.v.dtype == np.uint8
    assert m.x.shape == (31,) and m.x.dtype == np.uint64 and m.mem.shape == (128,)


def test_max_accumulations():
    assert max_accumulations(8, 8, 16) == 1          # 2 * 128 * 128 > 32767
    assert [max_accumulations(b, b, 8) for b in (2, 3, 4)] == [31, 7, 1]   # DSQ's figures
    assert max_accumulations(7, 7, 16) == 7          # EasyQuant INT7 into int16
    assert max_accumulations(8, 8, 32) == 131071
    assert max_accumulations(8, 8, 16, a_signed=False) == 1    # 255 * 128 = 32640
    assert max_accumulations(2, 2, 8, a_signed=False) == 21    # 3 * 2 = 6; 127 // 6
    # the bound is tight: N products of the worst case fit, N + 1 do not
    for a, w, acc in ((2, 2, 8), (3, 3, 8), (7, 7, 16), (8, 8, 32), (4, 4, 16)):
        n, p = max_accumulations(a, w, acc), 2 ** (a - 1) * 2 ** (w - 1)
        assert n * p <= 2 ** (acc - 1) - 1 < (n + 1) * p
    for bad, err in ((0, ValueError), (65, ValueError), (8.0, TypeError), (True, TypeError)):
        with pytest.raises(err):
            max_accumulations(bad, 8, 16)

"""refimpl.neon memory instructions (LDR/STR of x/w and q/d/s/h/b, LDP/STP of q/d/s, LD1/ST1, LD1R)
against QEMU (unicorn), bit for bit.

Unicorn maps the data region at address 0 with the same size as ``Machine.mem`` (64 KiB), so an
x register holds the same address on both; the code sits right above it at 0x10000. Every
encoding is checked by disassembling it with capstone, as in test_neon_semantics. Vector
registers, x registers, flags and the whole memory are compared after each run.
"""
import re

import numpy as np
import pytest

from refimpl.neon import Machine, lanes
from refimpl.neon.asm import ARRANGEMENTS, AsmError, Mem, SReg, VList, parse
from test_neon_semantics import Emulator, _canon, _cs_text, _state

MEM = 0x10000  # data at [0, MEM); the code sits above it, at test_neon_semantics.BASE == MEM


class MemEmulator(Emulator):
    def check_encoding(self, ins, d):
        if d.mnemonic in ("b", "cbz", "cbnz") or d.mnemonic.startswith("b."):
            return  # branch targets are checked in test_neon_semantics
        # capstone prints a negative post-index as its 64-bit two's complement
        cs = re.sub(r"#0x(f{8}[0-9a-f]{8})$", lambda m: f"#{int(m[1], 16) - (1 << 64)}", _cs_text(d))
        assert _canon(ins) == _canon(parse(cs)[0]), f"keystone encoded {ins.text!r} as {cs}"

    def check(self, text, states):
        code = self.assemble(text)
        self.load(code)
        self.uc.mem_map(0, MEM)
        for v, x, mem in states:
            self.uc.mem_write(0, mem.tobytes())
            v_ref, x_ref, nzcv_ref = self.run(code, v, x)
            mem_ref = np.frombuffer(bytes(self.uc.mem_read(0, MEM)), np.uint8)
            m = Machine(mem_size=MEM)
            m.v[:], m.x[:], m.mem[:] = v, x, mem
            stats = m.run(text)
            assert stats.instructions == self.executed, text
            np.testing.assert_array_equal(m.v, v_ref, err_msg=text)
            np.testing.assert_array_equal(m.x, x_ref, err_msg=text)
            np.testing.assert_array_equal(m.mem, mem_ref, err_msg=text)
            n, z, c, vf = m.nzcv
            assert (n << 3 | z << 2 | c << 1 | vf) == nzcv_ref, text


@pytest.fixture(scope="module")
def emu():
    reason = "differential tests need unicorn, keystone-engine and capstone (pip packages)"
    for mod in ("unicorn", "keystone", "capstone"):
        pytest.importorskip(mod, reason=reason)
    return MemEmulator()


def _mem(rng):
    mem = rng.integers(0, 256, MEM, dtype=np.uint8)
    pick = rng.random(MEM) < 0.3
    mem[pick] = np.array([0, 0xFF, 0x7F, 0x80, 1], np.uint8)[rng.integers(0, 5, pick.sum())]
    return mem


# ---- one form at a time -------------------------------------------------------------------
# register pools: bases x0..x11 (each used once per block), post-index registers x12..x15,
# transfer registers x16..x30 and zr, so a load never clobbers a later address
def _scalar_mem(rng, base):
    mn, w = str(rng.choice(["ldr", "str"])), str(rng.choice(["x", "w"]))
    size = 8 if w == "x" else 4
    t = f"{w}{int(rng.integers(16, 31))}" if rng.random() < 0.9 else w + "zr"
    mode = int(rng.integers(0, 4))
    if mode == 0:
        return f"{mn} {t}, [x{base}]"
    if mode == 1:
        return f"{mn} {t}, [x{base}, #{size * int(rng.choice([0, 1, 2, 31, 4095, rng.integers(0, 64)]))}]"
    imm = int(rng.choice([-256, 255, -1, 1, 0, rng.integers(-256, 256)]))
    return f"{mn} {t}, [x{base}, #{imm}]!" if mode == 2 else f"{mn} {t}, [x{base}], #{imm}"


def _vector_mem(rng, mn, arr, base):
    count = 1 if mn == "ld1r" else int(rng.integers(1, 5))
    first = int(rng.integers(0, 32))
    regs = ", ".join(f"v{(first + i) % 32}.{arr}" for i in range(count))
    e, lanes_ = ARRANGEMENTS[arr]
    size = e if mn == "ld1r" else e * lanes_ * count
    mode = int(rng.integers(0, 3))
    post = ["", f", #{size}", f", x{int(rng.integers(12, 16))}"][mode]
    return f"{mn} {{{regs}}}, [x{base}]{post}"


def _mem_state(rng):
    v, x = _state(rng)
    x[:12] = rng.integers(300, MEM - 32800, 12)  # room for -256 and for 4095 * 8 offsets
    x[12:16] = rng.choice(np.array([0, 1, 16, 2**64 - 16, 2**64 - 1, 100], np.uint64), 4)
    return v, x, _mem(rng)


FORMS_MEM = [("ldr/str", None)] + [(mn, a) for mn in ("ld1", "st1", "ld1r") for a in ARRANGEMENTS]


@pytest.mark.parametrize("mn,arr", FORMS_MEM, ids=[f"{m}:{a}" for m, a in FORMS_MEM])
def test_memory_form_matches_qemu(emu, mn, arr):
    rng = np.random.default_rng(FORMS_MEM.index((mn, arr)))
    for _ in range(3):
        lines = [_scalar_mem(rng, b) if arr is None else _vector_mem(rng, mn, arr, b)
                 for b in range(12)]
        emu.check("\n".join(lines), [_mem_state(rng) for _ in range(2)])


# ---- LDR/STR (all register kinds, all addressing modes), LDP/STP of SIMD&FP registers -------
_SIZE = {"x": 8, "w": 4, "q": 16, "d": 8, "s": 4, "h": 2, "b": 1}


def _transfer_mem(rng, kind, base):
    """One LDR/STR of register kind ``kind`` (x w q d s h b) on base ``x<base>``, any of the five
    addressing modes; register-offset indexes are x12..x15, x/w transfer registers x16..x30/zr."""
    mn, size = str(rng.choice(["ldr", "str"])), _SIZE[kind]
    if kind in "xw":
        t = f"{kind}{int(rng.integers(16, 31))}" if rng.random() < 0.9 else kind + "zr"
    else:
        t = f"{kind}{int(rng.integers(0, 32))}"
    mode = int(rng.integers(0, 5))
    if mode == 0:
        return f"{mn} {t}, [x{base}]"
    if mode == 1:
        return f"{mn} {t}, [x{base}, #{size * int(rng.choice([0, 1, 2, 31, 2047, rng.integers(0, 64)]))}]"
    if mode == 4:
        sh = "" if rng.random() < 0.3 else \
            f", lsl #{int(rng.choice([0] if size == 1 else [0, size.bit_length() - 1]))}"
        return f"{mn} {t}, [x{base}, x{int(rng.integers(12, 16))}{sh}]"
    imm = int(rng.choice([-256, 255, -1, 1, 0, rng.integers(-256, 256)]))
    return f"{mn} {t}, [x{base}, #{imm}]!" if mode == 2 else f"{mn} {t}, [x{base}], #{imm}"


def _pair_mem(rng, kind, base):
    """One LDP/STP of ``kind`` (q d s) on base ``x<base>``: offset, pre- or post-index, imm a
    multiple of the register size in -64..63 times it (LDP's two registers differ)."""
    mn, size = str(rng.choice(["ldp", "stp"])), _SIZE[kind]
    t1 = int(rng.integers(0, 32))
    t2 = (t1 + int(rng.integers(1, 32))) % 32 if mn == "ldp" or rng.random() < 0.9 else t1
    imm = size * int(rng.choice([-64, 63, -1, 1, 0, rng.integers(-64, 64)]))
    addr = [f"[x{base}]", f"[x{base}, #{imm}]", f"[x{base}, #{imm}]!", f"[x{base}], #{imm}"]
    return f"{mn} {kind}{t1}, {kind}{t2}, " + addr[int(rng.integers(0, 4))]


def _simd_mem_state(rng):
    """Bases x0..x11 in [1100, MEM - 33000) (room for LDP q's -1024 and 2047 * 16), indexes
    x12..x15 among 0, 1, 16, -16, -1, 100 (negative after lsl: -256, -16)."""
    v, x, mem = _mem_state(rng)
    x[:12] = rng.integers(1100, MEM - 33000, 12)
    return v, x, mem


FORMS_TRANSFER = [("ldr/str", k) for k in "qdshbxw"] + [("ldp/stp", k) for k in "qds"]


@pytest.mark.parametrize("mn,kind", FORMS_TRANSFER, ids=[f"{m}:{k}" for m, k in FORMS_TRANSFER])
def test_transfer_form_matches_qemu(emu, mn, kind):
    """12 accesses a block (one per base; unaligned bases included), 4 blocks x 2 states;
    registers, flags and the whole memory compared."""
    rng = np.random.default_rng(2000 + FORMS_TRANSFER.index((mn, kind)))
    gen = _transfer_mem if mn == "ldr/str" else _pair_mem
    for _ in range(4):
        lines = [gen(rng, kind, b) for b in range(12)]
        emu.check("\n".join(lines), [_simd_mem_state(rng) for _ in range(2)])


EDGES = """
mov x0, #0
ldr q1, [x0, #65520]
str q2, [x0, #65504]
ldr d3, [x0, #32760]
str s4, [x0, #16380]
ldr h5, [x0, #8190]
str b6, [x0, #4095]
mov x1, #0x8001
ldr q7, [x1, #-256]!
str q8, [x1], #255
ldr d9, [x1], #-256
str h10, [x1, #255]!
mov x2, #0x4003
ldp q11, q12, [x2, #-1024]!
stp q13, q14, [x2], #1008
ldp d15, d16, [x2, #-512]
stp d17, d17, [x2, #504]!
ldp s18, s19, [x2], #-256
stp s20, s21, [x2, #252]
mov x3, #0x2005
mov x4, #-1
ldr q22, [x3, x4, lsl #4]
str q23, [x3, x4]
ldr b24, [x3, x4, lsl #0]
ldr h25, [x3, x4, lsl #1]
str s26, [x3, x4, lsl #2]
ldr d27, [x3, x4, lsl #3]
ldr x5, [x3, x4, lsl #3]
str w6, [x3, x4, lsl #2]
movi v28.4s, #0xff, msl #16
movi v29.2s, #0, msl #8
movi v30.4s, #0x80, msl #8
movi v31.2s, #0x7f, msl #16
"""


def test_transfer_edges_match_qemu(emu):
    """Largest unsigned offsets (up to the last byte of memory), the pre/post-index and LDP/STP
    immediate limits, unaligned bases, a negative register offset at every shift, and MOVI msl
    at its immediate limits."""
    rng = np.random.default_rng(2100)
    emu.check(EDGES, [_mem_state(rng) for _ in range(3)])
    m = Machine(mem_size=MEM)
    m.mem[:] = np.arange(MEM, dtype=np.uint64).astype(np.uint8)
    m.run(EDGES)
    assert m.v[1].tolist() == list(range(0xF0, 0x100))          # the last 16 bytes
    assert int(m.x[1]) == 0x8001 - 256 + 255 - 256 + 255 and int(m.x[2]) == 0x4003 - 1024 + 1008 + 504 - 256
    assert lanes(m.v[28], "4s", signed=False).tolist() == [0xFFFFFF] * 4
    assert lanes(m.v[29], "4s", signed=False).tolist() == [0xFF, 0xFF, 0, 0]
    assert lanes(m.v[30], "4s", signed=False).tolist() == [0x80FF] * 4
    assert lanes(m.v[31], "2s", signed=False).tolist() == [0x7FFFFF] * 2


def test_simd_loads_zero_the_rest_and_stores_write_their_size():
    m = Machine(mem_size=256)
    m.mem[:] = np.arange(256, dtype=np.uint8)
    m.v[:] = 0xAA
    m.x[1], m.x[2] = 16, 3
    m.run("ldr b0, [x1]\nldr h1, [x1, #2]\nldr s2, [x1], #4\nldr d3, [x1, x2, lsl #3]\n"
          "ldr q4, [x1, #-3]!\nldp d5, d6, [x1, #8]\nldp s7, s8, [x1]\n"
          "str h9, [x1, #64]\nstp q10, q11, [x1, #96]")
    assert m.v[0].tolist() == [16] + [0] * 15
    assert m.v[1].tolist() == [18, 19] + [0] * 14
    assert m.v[2].tolist() == [16, 17, 18, 19] + [0] * 12 and int(m.x[1]) == 17  # -3 after +4
    assert m.v[3].tolist() == list(range(44, 52)) + [0] * 8           # 20 + 3 * 8
    assert m.v[4].tolist() == list(range(17, 33))                      # unaligned, all 128 bits
    assert m.v[5].tolist() == list(range(25, 33)) + [0] * 8
    assert m.v[6].tolist() == list(range(33, 41)) + [0] * 8
    assert m.v[7].tolist() == [17, 18, 19, 20] + [0] * 12
    assert m.v[8].tolist() == [21, 22, 23, 24] + [0] * 12
    assert m.mem[79:85].tolist() == [79, 80, 0xAA, 0xAA, 83, 84]       # 2 bytes at 81
    assert (m.mem[113:145] == 0xAA).all() and m.mem[145] == 145


# ---- random counted loops -------------------------------------------------------------------
def _loop(rng, simd=False):
    """Pointers x0..x3 (regions 12 KiB apart), counter x9, scalars x10..x20; body mixes memory
    ops (post-index and offset), scalar arithmetic, forward branches, UMOV, INS and DUP
    (general); with ``simd`` also LDR/STR q/d/s/h/b (post-index, offset, register offset on the
    counter x9), LDP/STP q/d/s and MOVI msl."""
    n_it = int(rng.integers(1, 7))
    lines = [f"mov x{p}, #{0x1000 * (2 + 3 * p) + int(rng.integers(0, 64))}" for p in range(4)]
    lines.append(f"mov x9, #{n_it}")
    lines.append("loop:")
    skip = 0
    s = lambda: f"x{int(rng.integers(10, 21))}"
    for _ in range(int(rng.integers(4, 14))):
        k, p = int(rng.integers(0, 14 if simd else 11)), int(rng.integers(0, 4))
        arr = str(rng.choice(list(ARRANGEMENTS)))
        e, lanes_ = ARRANGEMENTS[arr]
        if k == 0:
            c = int(rng.integers(1, 5))
            v0 = int(rng.integers(0, 32))
            regs = ", ".join(f"v{(v0 + i) % 32}.{arr}" for i in range(c))
            lines.append(f"{rng.choice(['ld1', 'st1'])} {{{regs}}}, [x{p}], #{e * lanes_ * c}")
        elif k == 1:
            lines.append(f"ld1r {{v{int(rng.integers(0, 32))}.{arr}}}, [x{p}], #{e}")
        elif k == 2:
            lines.append(f"{rng.choice(['ld1', 'st1'])} {{v{int(rng.integers(0, 32))}.{arr}}}, [x{p}]")
        elif k == 3:
            w = str(rng.choice(["x", "w"]))
            t = f"{w}{s()[1:]}"
            size = 8 if w == "x" else 4
            lines.append(f"{rng.choice(['ldr', 'str'])} {t}, "
                         + str(rng.choice([f"[x{p}, #{size * int(rng.integers(0, 32))}]",
                                           f"[x{p}], #{size}", f"[x{p}, #{size}]!"])))
        elif k == 4:
            lines.append(f"{rng.choice(['add', 'sub', 'subs'])} {s()}, {s()}, "
                         + str(rng.choice([s(), f"#{int(rng.integers(0, 4096))}"])))
        elif k == 5:
            lines.append(f"mov {s()}, " + str(rng.choice([s(), f"#{int(rng.integers(0, 65536))}"])))
        elif k == 6:
            lines.append(f"cmp {s()}, {s()}")
            lines.append(f"b.{rng.choice(['eq', 'ne', 'lt', 'ge', 'hi', 'ls'])} skip{skip}")
            lines.append(f"add {s()}, {s()}, #1")
            lines.append(f"skip{skip}:")
            skip += 1
        elif k == 7:
            lines.append(f"{rng.choice(['cbz', 'cbnz'])} {s()}, skip{skip}")
            lines.append(f"str {s()}, [x{p}, #8]")
            lines.append(f"skip{skip}:")
            skip += 1
        elif k == 9:
            sz = str(rng.choice(list("bhsd")))
            idx = int(rng.integers(0, 16 // {"b": 1, "h": 2, "s": 4, "d": 8}[sz]))
            lines.append(f"umov {'x' if sz == 'd' else 'w'}{s()[1:]}, v{int(rng.integers(0, 32))}.{sz}[{idx}]")
        elif k == 11:
            kind = str(rng.choice(list("qdshb")))
            size = _SIZE[kind]
            lines.append(f"{rng.choice(['ldr', 'str'])} {kind}{int(rng.integers(0, 32))}, "
                         + str(rng.choice([f"[x{p}], #{size}", f"[x{p}, #{size * int(rng.integers(0, 32))}]",
                                           f"[x{p}, #{size}]!", f"[x{p}, x9, lsl #{size.bit_length() - 1}]"])))
        elif k == 12:
            kind = str(rng.choice(list("qds")))
            size, t = _SIZE[kind], int(rng.integers(0, 32))
            lines.append(f"{rng.choice(['ldp', 'stp'])} {kind}{t}, {kind}{(t + 1) % 32}, "
                         + str(rng.choice([f"[x{p}], #{2 * size}", f"[x{p}, #{size * int(rng.integers(0, 64))}]",
                                           f"[x{p}, #{2 * size}]!"])))
        elif k == 13:
            lines.append(f"movi v{int(rng.integers(0, 32))}.{rng.choice(['2s', '4s'])}, "
                         f"#{int(rng.integers(0, 256))}, msl #{int(rng.choice([8, 16]))}")
        elif k == 10:
            sz = str(rng.choice(list("bhsd")))
            n = 16 // {"b": 1, "h": 2, "s": 4, "d": 8}[sz]
            src = str(rng.choice([f"{'x' if sz == 'd' else 'w'}{s()[1:]}",
                                  f"v{int(rng.integers(0, 32))}.{sz}[{int(rng.integers(0, n))}]"]))
            lines.append(f"ins v{int(rng.integers(0, 32))}.{sz}[{int(rng.integers(0, n))}], {src}")
        else:
            a = str(rng.choice(["8b", "16b", "4h", "8h", "2s", "4s", "2d"]))
            lines.append(f"dup v{int(rng.integers(0, 32))}.{a}, {'x' if a == '2d' else 'w'}{s()[1:]}")
    if rng.random() < 0.5:
        lines += ["subs x9, x9, #1", "b.ne loop"]
    else:
        lines += ["sub x9, x9, #1", "cbnz x9, loop"]
    return "\n".join(lines)


@pytest.mark.parametrize("seed", range(80))
def test_random_memory_loops_match_qemu(emu, seed):
    rng = np.random.default_rng(1000 + seed)
    text = _loop(rng)
    emu.check(text, [(*_state(rng), _mem(rng)) for _ in range(2)])


@pytest.mark.parametrize("seed", range(60))
def test_random_simd_memory_loops_match_qemu(emu, seed):
    rng = np.random.default_rng(3000 + seed)
    text = _loop(rng, simd=True)
    emu.check(text, [(*_state(rng), _mem(rng)) for _ in range(2)])


# ---- Machine-only checks --------------------------------------------------------------------
def test_load_store_semantics():
    m = Machine(mem_size=256)
    m.mem[:] = np.arange(256, dtype=np.uint8)
    m.v[5] = 0xAA
    m.run("mov x1, #16\nld1 {v0.8b, v1.8b}, [x1], #16\nld1r {v2.8h}, [x1]\n"
          "ldr w3, [x1, #4]\nst1 {v5.4s}, [x1], x1")
    assert m.v[0].tolist() == list(range(16, 24)) + [0] * 8   # 64-bit form zeroes the top
    assert m.v[1].tolist() == list(range(24, 32)) + [0] * 8
    assert m.v[2].tolist() == [32, 33] * 8
    assert int(m.x[3]) == int.from_bytes(bytes([36, 37, 38, 39]), "little")
    assert int(m.x[1]) == 64 and (m.mem[32:48] == 0xAA).all()


@pytest.mark.parametrize("text", ["ldr x0, [x1, #256]", "ld1 {v0.16b}, [x1], #16",
                                  "str w0, [x1, #-255]!", "ld1r {v0.2d}, [x1]"])
def test_out_of_range_address_names_line_and_instruction(text):
    m = Machine(mem_size=256)
    m.x[1] = 252
    with pytest.raises(IndexError, match=r"line 2: address .* outside memory .*" + re.escape(repr(text))):
        m.run("nop_label:\n" + text)
    assert int(m.x[1]) == 252  # no writeback on a faulting access


# ---- parser: memory operands ----------------------------------------------------------------
@pytest.mark.parametrize("text,ops", [
    ("ld1 {v0.16b, v1.16b}, [x1], #32", (VList(0, 2, "16b"), Mem(1, 32, "post"))),
    ("LD1 {V31.4S, V0.4S, V1.4S}, [X2], X3", (VList(31, 3, "4s"), Mem(2, 0, "post", 3))),
    ("st1 {v4.1d,v5.1d,v6.1d,v7.1d}, [x30]", (VList(4, 4, "1d"), Mem(30))),
    ("ld1r {v2.8h}, [x0], #2", (VList(2, 1, "8h"), Mem(0, 2, "post"))),
    ("ldr w3, [x4, #4092]", (parse("mov w3, w3")[0].operands[0], Mem(4, 4092))),
    ("str x3, [ x4 , #-256 ]!", (parse("mov x3, x3")[0].operands[0], Mem(4, -256, "pre"))),
    ("ldr xzr, [x4], #255", (parse("mov xzr, xzr")[0].operands[0], Mem(4, 255, "post"))),
    ("ldr q4, [x1], #16", (SReg(4, "q"), Mem(1, 16, "post"))),
    ("STR Q31, [X4, #65520]", (SReg(31, "q"), Mem(4, 65520))),
    ("ldr b0, [x2, #-256]!", (SReg(0, "b"), Mem(2, -256, "pre"))),
    ("ldr q1, [x2, x3, lsl #4]", (SReg(1, "q"), Mem(2, 0, "reg", 3, 4))),
    ("str h1, [x2, x30]", (SReg(1, "h"), Mem(2, 0, "reg", 30, 0))),
    ("ldr x1, [x2, x2, lsl #3]", (parse("mov x1, x1")[0].operands[0], Mem(2, 0, "reg", 2, 3))),
    ("ldp q0, q1, [x2, #-1024]!", (SReg(0, "q"), SReg(1, "q"), Mem(2, -1024, "pre"))),
    ("stp d3, d3, [x2], #504", (SReg(3, "d"), SReg(3, "d"), Mem(2, 504, "post"))),
    ("ldp s3, s4, [x2]", (SReg(3, "s"), SReg(4, "s"), Mem(2))),
])
def test_memory_operands_parse(text, ops):
    assert parse(text)[0].operands == ops


@pytest.mark.parametrize("text,msg", [
    ("ld1 {v0.16b, v2.16b}, [x1]", "not consecutive"),
    ("ld1 {v0.16b, v1.8h}, [x1]", "mixed arrangements"),
    ("ld1 {v0.4s, v1.4s, v2.4s, v3.4s, v4.4s}, [x1]", "1-4 vector registers"),
    ("ld1 {v0.4s, x1}, [x1]", "1-4 vector registers"),
    ("ld1 {v0.4s, [x1]", "unbalanced"),
    ("ld1 {v0.16b}, [x1], #8", "must equal the transfer size 16"),
    ("ld1 {v0.8b, v1.8b, v2.8b}, [x1], #16", "must equal the transfer size 24"),
    ("ld1r {v0.4s}, [x1], #16", "must equal the transfer size 4"),
    ("ld1r {v0.4s, v1.4s}, [x1]", "LD1R takes one register"),
    ("ld1 {v0.16b}, [x1, #16]", "addressing is"),
    ("st1 {v0.16b}, [x1, #16]!", "addressing is"),
    ("ld1 {v0.16b}, [x1], xzr", "bad post-index"),
    ("ldr x0, [x1, #4]", "multiple of 8"),
    ("ldr w0, [x1, #16384]", "multiple of 4"),
    ("ldr x0, [x1, #-8]", "multiple of 8"),
    ("str x0, [x1], #256", "-256..255"),
    ("ldr x0, [x1], x2", "register post-index"),
    ("ldr x1, [x1, #8]!", "must differ"),
    ("ldr x0, [sp]", "bad operand"),
    ("ldr x0, [w1]", "base register must be x0..x30"),
    ("ldr x0, [xzr]", "base register must be x0..x30"),
    ("ldr x0, [x1, #8], #8", "post-index needs a plain"),
    ("ldr x0, [x1]!", "pre-index needs an offset"),
    ("ldr x0, x1", "bad memory operand"),
    ("ldr v0.16b, [x1]", "not allowed for LDR"),
    ("ldr q0, [x1, #8]", "multiple of 16 in 0..65520"),
    ("ldr q0, [x1, #65536]", "multiple of 16 in 0..65520"),
    ("str d0, [x1, #-8]", "multiple of 8 in 0..32760"),
    ("ldr q0, [x1], #256", "-256..255"),
    ("str b0, [x1, #-257]!", "-256..255"),
    ("ldr q0, [x1, x2, lsl #3]", "lsl #0 or #4 for a 16-byte access"),
    ("ldr b0, [x1, x2, lsl #1]", "lsl #0 for a 1-byte access"),
    ("ldr x0, [x1, x2, lsl #2]", "lsl #0 or #3 for a 8-byte access"),
    ("ldr q0, [x1, xzr]", "bad offset 'xzr'"),
    ("ldr q0, [x1, w2]", "bad offset 'w2'"),
    ("ldr q0, [x1, w2, uxtw #4]", "bad offset"),
    ("ldr q0, [x1, x2, msl #4]", "bad offset"),
    ("ldr q0, [x1, x2]!", "pre-index needs an offset #imm"),
    ("ldr q0, [x1], x2", "register post-index"),
    ("ld1 {v0.16b}, [x1, x2]", "addressing is"),
    ("ldp q0, q0, [x1]", "LDP with the same transfer register twice is UNPREDICTABLE"),
    ("ldp q0, q1, [x1, #8]", "multiple of 16 in -1024..1008"),
    ("ldp q0, q1, [x1, #1024]!", "multiple of 16 in -1024..1008"),
    ("stp d0, d1, [x1], #-520", "multiple of 8 in -512..504"),
    ("ldp s0, s1, [x1, #256]", "multiple of 4 in -256..252"),
    ("ldp q0, q1, [x1, x2]", "LDP has no register offset"),
    ("stp q0, q1, [x1], x2", "STP register post-index"),
    ("ldp q0, d1, [x1]", "not allowed for LDP"),
    ("ldp h0, h1, [x1]", "not allowed for LDP"),
    ("ldp q0, [x1]", "expected two registers"),
    ("add q0, q1, q2", "not allowed for ADD"),
    ("movi v0.4s, #1, msl #24", "msl shift must be #8 or #16"),
    ("movi v0.8h, #1, msl #8", "not allowed for MOVI"),
    ("movi v0.4s, #256, msl #8", "MOVI immediate must be 0..255"),
    ("add x0, x1, #1, msl #12", "not allowed for ADD"),
    ("ext v0.8b, v1.8b, v2.8b, #8", "EXT index must be 0..7"),
    ("ext v0.16b, v1.16b, v2.16b, #16", "EXT index must be 0..15"),
    ("umov x0, v1.s[1]", "not allowed for UMOV"),
    ("mov w0, v1.b[1]", "not allowed for MOV"),
    ("ins v0.b[1], x2", "not allowed for INS"),
    ("ins v0.s[1], v1.h[1]", "not allowed for INS"),
])
def test_memory_and_element_errors_name_line(text, msg):
    with pytest.raises(AsmError, match=r"line 2: .*" + re.escape(msg) + r".*" + re.escape(repr(text))):
        parse("add x0, x0, #1\n" + text)

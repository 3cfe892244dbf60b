"""refimpl.neon memory instructions (LDR/STR, LD1/ST1, LD1R) against QEMU (unicorn), bit for bit.

Unicorn maps the data region at address 0 with the same size as ``Machine.mem`` (64 KiB), so an
x register holds the same address on both; the code sits right above it at 0x10000. Every
encoding is checked by disassembling it with capstone, as in test_neon_semantics. Vector
registers, x registers, flags and the whole memory are compared after each run.
"""
import re

import numpy as np
import pytest

from refimpl.neon import Machine
from refimpl.neon.asm import ARRANGEMENTS, AsmError, Mem, VList, parse
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


# ---- random counted loops -------------------------------------------------------------------
def _loop(rng):
    """Pointers x0..x3 (regions 12 KiB apart), counter x9, scalars x10..x20; body mixes memory
    ops (post-index and offset), scalar arithmetic, forward branches, UMOV, INS and DUP
    (general)."""
    n_it = int(rng.integers(1, 7))
    lines = [f"mov x{p}, #{0x1000 * (2 + 3 * p) + int(rng.integers(0, 64))}" for p in range(4)]
    lines.append(f"mov x9, #{n_it}")
    lines.append("loop:")
    skip = 0
    s = lambda: f"x{int(rng.integers(10, 21))}"
    for _ in range(int(rng.integers(4, 14))):
        k, p = int(rng.integers(0, 11)), int(rng.integers(0, 4))
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

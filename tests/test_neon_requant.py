"""refimpl.neon's requantisation output stage: SQSHL (register) against QEMU, the numpy
reference against the ARM pseudocode in Python ints, and the generated program on the Machine
and on QEMU (unicorn + keystone, as in test_neon_semantics / test_neon_memory).
"""
import numpy as np
import pytest

from refimpl.neon import Machine, lanes
from refimpl.neon.asm import FORMS
from test_neon_semantics import Emulator, _ebits, _edges, _ops, _set_lanes, _state, _SIZE

EMU_REASON = "differential tests need unicorn, keystone-engine and capstone (pip packages)"


@pytest.fixture(scope="module")
def emu():
    for mod in ("unicorn", "keystone", "capstone"):
        pytest.importorskip(mod, reason=EMU_REASON)
    return Emulator()


# ---- SQSHL (register), the instruction the output stage added to the subset -------------------
def _shift_amounts(bits):
    return [-bits - 1, -bits, -bits + 1, -1, 0, 1, 2, bits - 2, bits - 1, bits, bits + 1, 127,
            -128]


@pytest.mark.parametrize("form", FORMS["sqshl"], ids=[",".join(f) for f in FORMS["sqshl"]])
def test_sqshl_edge_shift_amounts_match_qemu(emu, form):
    """Each edge shift amount (in the low byte; the lane's other bits random, as only the low
    byte counts) over MIN/MAX/-1/0/1, neighbours of MIN/MAX and values one shift from
    saturating, rotated through the lanes."""
    bits = _ebits(form[0])
    rng = np.random.default_rng(3000 + FORMS["sqshl"].index(form))
    values = _edges(bits) + [-(1 << (bits - 1)) + 1, (1 << (bits - 1)) - 2, 3,
                             1 << (bits - 2), -(1 << (bits - 2)), (1 << (bits - 2)) - 1,
                             -(1 << (bits - 2)) - 1]
    states = []
    for sh in _shift_amounts(bits):
        for r in range(0, len(values), 3):
            v, x = _state(rng)
            _set_lanes(v, 1, bits, values[r:] + values[:r])
            high = [int(h) << 8 for h in rng.integers(0, 1 << 16, 16)] if bits > 8 else [0]
            _set_lanes(v, 2, bits, [h | (sh & 0xFF) for h in high])
            states.append((v, x))
    emu.check("sqshl " + _ops(form, (0, 1, 2)), states)


@pytest.mark.parametrize("bits", [8, 16, 32, 64])
def test_sqshl_edge_values(bits):
    """What QEMU agreed to above, spelled out: left shifts saturate (esize and beyond saturate
    every non-zero lane), right shifts truncate toward -infinity without rounding, and -esize
    or less leaves the sign (0 or -1)."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = 1 << (bits - 2)
    vals = [lo, hi, -3, 3, q, -q - 1, 0, 1]
    expect = {0: vals,
              1: [lo, hi, -6, 6, hi, lo, 0, 2],
              -1: [lo // 2, hi // 2, -2, 1, q // 2, (-q - 1) >> 1, 0, 0],
              bits - 1: [lo, hi, lo, hi, hi, lo, 0, hi],    # 1 << (esize - 1) is MAX + 1
              bits: [lo, hi, lo, hi, hi, lo, 0, hi],
              127: [lo, hi, lo, hi, hi, lo, 0, hi],
              -bits: [-1, 0, -1, 0, 0, -1, 0, 0],
              -128: [-1, 0, -1, 0, 0, -1, 0, 0]}
    arr = {8: "16b", 16: "8h", 32: "4s", 64: "2d"}[bits]
    n = 16 * 8 // bits
    for sh, want in expect.items():
        got = []
        for start in range(0, len(vals), n):
            m = Machine()
            _set_lanes(m.v, 1, bits, vals[start:start + n])
            _set_lanes(m.v, 2, bits, [sh])
            m.run(f"sqshl v0.{arr}, v1.{arr}, v2.{arr}")
            got += lanes(m.v[0], _SIZE[bits])[:min(n, len(vals) - start)].tolist()
        assert got == want, (bits, sh, got, want)


# ---- an independent reference: the ARM ARM pseudocode, one element at a time in Python ints -----
I32_MIN, I32_MAX = -(1 << 31), (1 << 31) - 1


def _signed_sat(v, esize):                       # SignedSatQ
    return max(min(v, (1 << (esize - 1)) - 1), -(1 << (esize - 1)))


def _unsigned_sat(v, esize):                     # UnsignedSatQ
    return max(min(v, (1 << esize) - 1), 0)


def _wrap(v, esize):                             # the low esize bits, signed
    return ((v + (1 << (esize - 1))) % (1 << esize)) - (1 << (esize - 1))


def _shl_by_register(x, y, esize, rounding, saturating):
    """SQSHL / SRSHL (register), ARM ARM shared pseudocode: shift = SInt(element2<7:0>);
    round_const = rounding ? 1 << (-shift - 1) : 0 (0 for shift >= 0); element =
    (element1 + round_const) << shift, a negative shift shifting right (floor);
    SignedSatQ when saturating, else the low esize bits."""
    shift = ((y & 0xFF) ^ 0x80) - 0x80
    round_const = (1 << (-shift - 1)) if rounding and shift < 0 else 0
    v = x + round_const
    v = v << shift if shift >= 0 else v >> -shift
    return _signed_sat(v, esize) if saturating else _wrap(v, esize)


def _sqrdmulh(a, b, esize=32):
    """SQRDMULH: SignedSatQ((2 * a * b + (1 << (esize - 1))) >> esize)."""
    return _signed_sat((2 * a * b + (1 << (esize - 1))) >> esize, esize)


def _python_requant(acc, bias, mult, shift, zp, qmin, qmax, unsigned):
    x = _wrap(acc + bias, 32)                                              # ADD
    x = _shl_by_register(x, max(shift, 0), 32, rounding=False, saturating=True)   # SQSHL
    x = _sqrdmulh(x, mult)                                                 # SQRDMULH
    x = _shl_by_register(x, min(shift, 0), 32, rounding=True, saturating=False)   # SRSHL
    x = _wrap(x + zp, 32)                                                  # ADD
    x = min(max(x, qmin), qmax)                                            # SMAX, SMIN
    x = _signed_sat(x, 16)                                                 # SQXTN .4s -> .4h
    return _unsigned_sat(x, 8) if unsigned else _signed_sat(x, 8)          # SQXTUN / SQXTN


def _python_array(acc, bias, mult, shift, zp, qmin, qmax, unsigned):
    m, n = acc.shape
    col = lambda v, j: int(np.broadcast_to(np.asarray(v), (n,))[j])
    return np.array([[_python_requant(int(acc[i, j]), 0 if bias is None else col(bias, j),
                                      col(mult, j), col(shift, j), col(zp, j), qmin, qmax,
                                      unsigned) for j in range(n)] for i in range(m)],
                    np.uint8 if unsigned else np.int8).reshape(m, n)


def test_pseudocode_helpers_match_the_machine():
    """The Python-int SQRDMULH/SRSHL/SQSHL above against the simulator's instructions (which
    test_neon_semantics and the SQSHL tests here check against QEMU) on edge lanes, including
    SQRDMULH's one saturating case, INT32_MIN * INT32_MIN."""
    vals = [I32_MIN, I32_MAX, -1, 0, 1, I32_MIN + 1, 3, -3, 1 << 30, -(1 << 30), 6, -6]
    shifts = [-32, -31, -2, -1, 0, 1, 2, 30, 31, 32, 127, -128]
    for a in vals:
        for b_vals in (vals, shifts):
            for start in range(0, len(b_vals), 4):
                bs = (b_vals[start:start + 4] * 4)[:4]
                m = Machine()
                _set_lanes(m.v, 1, 32, [a])
                _set_lanes(m.v, 2, 32, bs)
                m.run("sqrdmulh v3.4s, v1.4s, v2.4s\nsrshl v4.4s, v1.4s, v2.4s\n"
                      "sqshl v5.4s, v1.4s, v2.4s")
                assert lanes(m.v[3], "4s").tolist() == [_sqrdmulh(a, b) for b in bs]
                assert lanes(m.v[4], "4s").tolist() == \
                    [_shl_by_register(a, b, 32, True, False) for b in bs]
                assert lanes(m.v[5], "4s").tolist() == \
                    [_shl_by_register(a, b, 32, False, True) for b in bs]
    assert _sqrdmulh(I32_MIN, I32_MIN) == I32_MAX


# ---- requantize: the numpy reference --------------------------------------------------------
from refimpl.neon import (build_requant, quantize_multiplier, quantize_multiplier_any,  # noqa: E402
                          requantize, requantize_reference, run_requant, CORES)


def _one(acc, bias=None, mult=1 << 30, shift=0, zp=0, qmin=-128, qmax=127, **kw):
    return int(requantize(np.array([[acc]]), bias, mult, shift, zp, qmin, qmax, **kw)[0, 0])


def test_requantize_hand_values():
    half = 1 << 30                                   # SQRDMULH by 2^30 halves, rounding up
    assert [_one(a, mult=half) for a in (100, 101, -101, 0)] == [50, 51, -50, 0]
    assert _one(12345, None, 1374389535, -6) == 123                 # 12345 * 0.01 = 123.45
    # exact ties of the right shift go toward +infinity, positive and negative (SRSHL)
    assert [_one(a, mult=half, shift=-1) for a in (6, -6, 10, -10)] == [2, -1, 3, -2]
    assert [_one(a, mult=half, shift=-4) for a in (48, -48, 80, -80)] == [2, -1, 3, -2]
    assert [_one(a, mult=half, shift=-4) for a in (46, -46, 50, -50)] == [1, -1, 2, -2]
    # shift 0: SQSHL and SRSHL are identities
    assert _one(200, mult=half, shift=0) == 100
    # left shifts (scale >= 1): 2^30 * 2^3 / 2^31 = 4x
    assert _one(25, mult=half, shift=3) == 100
    assert _one(-32, mult=half, shift=3) == -128 and _one(32, mult=half, shift=3) == 127
    # SQSHL saturates: 2^28 << 3 is 2^31 -> MAX, then SQRDMULH(MAX, MAX) = MAX - 1; below,
    # -2^31 - 8 -> MIN, then SQRDMULH(MIN, MAX) = -MAX (the zero points bring them to +-7)
    assert _one(1 << 28, mult=I32_MAX, shift=3, zp=-(I32_MAX - 1) + 7) == 7
    assert _one(-(1 << 28) - 1, mult=I32_MAX, shift=3, zp=I32_MAX - 7) == -7
    assert _one((1 << 28) - 1, mult=I32_MAX, shift=3, zp=-(I32_MAX - 1) + 7) == 0  # no sat.
    assert _one(I32_MAX, mult=I32_MAX, shift=31, zp=-(I32_MAX - 1)) == 0
    assert _one(I32_MIN, mult=I32_MAX, shift=31, zp=I32_MAX) == 0
    # bias and zero point wrap modulo 2^32 (ADD .4s)
    assert _one(I32_MAX, 1, mult=half) == -128                      # MAX + 1 wraps to MIN
    assert _one(0, I32_MAX, mult=I32_MAX, zp=1) == 127              # MAX - 1 + 1 = MAX
    assert _one(0, I32_MAX, mult=I32_MAX, zp=2) == -128             # wraps to MIN
    # the clamp: ReLU6-like bounds, then uint8 with and without inference
    assert [_one(a, mult=half, qmin=0, qmax=6) for a in (-50, 4, 5, 13)] == [0, 2, 3, 6]
    assert _one(600, mult=half, zp=128, qmin=0, qmax=255) == 255
    assert _one(-300, mult=half, zp=128, qmin=0, qmax=255) == 0
    assert _one(100, mult=half, zp=128, qmin=0, qmax=255) == 178
    assert requantize(np.array([[0]]), None, 0, 0, 5, 0, 127, unsigned=True).dtype == np.uint8
    assert requantize(np.array([[0]]), None, 0, 0, 5, 0, 127).dtype == np.int8
    assert requantize(np.array([[0]]), None, 0, 0, 5, 0, 200).dtype == np.uint8


def _edge_acc(rng, shape):
    acc = rng.integers(-(1 << 24), 1 << 24, shape)
    pick = rng.random(shape) < 0.25
    edges = np.array([I32_MIN, I32_MAX, I32_MIN + 1, I32_MAX - 1, -1, 0, 1, 1 << 30, -(1 << 30),
                      rng.integers(I32_MIN, I32_MAX)], np.int64)
    acc[pick] = edges[rng.integers(0, edges.size, pick.sum())]
    return acc.astype(np.int32)


def _random_params(rng, n, per_channel, unsigned):
    """Random (bias, multiplier, shift, zero_point, qmin, qmax): per tensor or per channel,
    mixing small and full-range biases and shifts, so that some outputs land inside the clamp
    and some saturate."""
    size = n if per_channel else None
    mult = rng.integers(0, 1 << 31, size)
    if per_channel:
        mult[rng.random(n) < 0.2] = rng.choice([0, 1, 1 << 30, I32_MAX], 1)
    shift = rng.integers(-31, 32, size) if rng.random() < 0.5 else rng.integers(-20, 2, size)
    kind = rng.random()
    bound = 1 << 31 if kind < 0.3 else 1 << 16
    bias = None if kind > 0.8 else rng.integers(-bound, bound, size)
    zp = rng.integers(0, 256, size) if unsigned else rng.integers(-128, 128, size)
    lo, hi = (0, 255) if unsigned else (-128, 127)
    qmin, qmax = sorted(int(v) for v in rng.integers(lo, hi + 1, 2))
    if rng.random() < 0.4:
        qmin, qmax = lo, hi
    return bias, mult, shift, zp, qmin, qmax


@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
def test_requantize_matches_python_pseudocode(unsigned, per_channel):
    rng = np.random.default_rng(40 + 2 * unsigned + per_channel)
    for _ in range(25):
        n = int(rng.integers(1, 24))
        acc = _edge_acc(rng, (int(rng.integers(1, 6)), n))
        bias, mult, shift, zp, qmin, qmax = _random_params(rng, n, per_channel, unsigned)
        got = requantize(acc, bias, mult, shift, zp, qmin, qmax, unsigned=unsigned)
        want = _python_array(acc, bias, mult, shift, zp, qmin, qmax, unsigned)
        assert got.dtype == want.dtype and got.shape == acc.shape
        np.testing.assert_array_equal(got, want)


def test_requantize_generalises_requantize_reference():
    """No bias, shift <= 0, the full int8 clamp: the GEMM kernels' epilogue, bit for bit."""
    rng = np.random.default_rng(5)
    acc = _edge_acc(rng, (30, 19))
    for per_channel in (False, True):
        size = 19 if per_channel else None
        m, s, z = rng.integers(0, 1 << 31, size), rng.integers(-31, 1, size), \
            rng.integers(-128, 128, size)
        np.testing.assert_array_equal(requantize(acc, None, m, s, z, -128, 127),
                                      requantize_reference(acc, m, s, z))


def test_quantize_multiplier_any():
    assert quantize_multiplier_any(1.0) == (1 << 30, 1)
    assert quantize_multiplier_any(3.0) == (3 << 29, 2)
    assert quantize_multiplier_any(0.5) == (1 << 30, 0)
    assert quantize_multiplier_any(0.0) == (0, 0)
    assert quantize_multiplier_any(2.0 ** -33) == (0, 0)            # below 2^-32: as TFLite
    assert quantize_multiplier_any(2.0 ** -32) == (1 << 30, -31)
    assert quantize_multiplier_any(2.0 ** 30) == (1 << 30, 31)
    assert quantize_multiplier_any(np.float32(1.5)) == (3 << 29, 1)
    # ties of q * 2^31 round away from zero (std::round), also in quantize_multiplier (it delegates)
    assert quantize_multiplier_any(0.5 + 2.0 ** -32) == ((1 << 30) + 1, 0)
    assert quantize_multiplier(0.5 + 2.0 ** -32) == ((1 << 30) + 1, 0)
    rng = np.random.default_rng(3)
    for scale in np.exp(rng.uniform(np.log(2.0 ** -32), 0, 300)):
        assert quantize_multiplier_any(float(scale)) == quantize_multiplier(float(scale))
    # the pair scales like the real number: round(acc * scale) + zp, within one unit
    acc = rng.integers(-5000, 5000, (40, 16)).astype(np.int32)
    for scale in np.exp(rng.uniform(np.log(1e-6), np.log(3000.0), 60)):
        m, s = quantize_multiplier_any(float(scale))
        assert 0 <= m < 1 << 31 and -31 <= s <= 31 and (s > 0) == (scale >= 1)
        got = requantize(acc, None, m, s, 3, -128, 127).astype(np.int64)
        flt = np.clip(np.round(acc * scale) + 3, -128, 127)
        assert np.abs(got - flt).max() <= 1, scale
    for bad, err in ((-1.0, ValueError), (float("nan"), ValueError), (2.0 ** 31, ValueError),
                     (2.0 ** 31 - 2.0 ** -22, ValueError), ("1", TypeError), (True, TypeError)):
        with pytest.raises(err, match="real_scale"):
            quantize_multiplier_any(bad)


# ---- run_requant: the generated program on the Machine ----------------------------------------
SHAPES = [(1, 1), (1, 16), (2, 17), (3, 33), (5, 48), (8, 7), (64, 32)]


@pytest.mark.parametrize("unsigned", [False, True], ids=["int8", "uint8"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}" for m, n in SHAPES])
def test_run_requant_on_the_machine_is_bit_exact(shape, unsigned):
    rng = np.random.default_rng(100 * shape[0] + shape[1] + unsigned)
    for case in ("per tensor", "per channel", "a layer"):
        if case == "a layer":         # scales of a real layer, most outputs inside the clamp
            acc = rng.integers(-(1 << 20), 1 << 20, shape).astype(np.int32)
            scales = np.exp(rng.uniform(np.log(1e-5), np.log(2.0), shape[1]))
            mult, shift = (np.array(v) for v in zip(*map(quantize_multiplier_any, scales)))
            zp = int(rng.integers(0, 256) if unsigned else rng.integers(-128, 128))
            lo, hi = (0, 255) if unsigned else (-128, 127)
            args = (acc, rng.integers(-4096, 4096, shape[1]), mult, shift, zp, lo, hi)
        else:
            acc = _edge_acc(rng, shape)
            args = (acc,) + _random_params(rng, shape[1], case == "per channel", unsigned)
        want = requantize(*args, unsigned=unsigned)
        res = run_requant(*args, unsigned=unsigned)
        assert res.out.dtype == want.dtype and res.out.shape == shape
        np.testing.assert_array_equal(res.out, want)
        groups = -(-shape[1] // 16)
        assert res.vectors == shape[0] * groups and res.cycles > 0
        assert ("sqxtun2" in res.asm) == unsigned and "sqshl" in res.asm
        fast = run_requant(*args, unsigned=unsigned, trace=False)
        np.testing.assert_array_equal(fast.out, want)
        assert (fast.cycles, fast.instructions, fast.asm) == (res.cycles, res.instructions,
                                                              res.asm)


@pytest.mark.parametrize("core", CORES)
def test_fast_path_cycles_equal_the_trace_on_every_core(core):
    rng = np.random.default_rng(7)
    for m, n in ((1, 5), (2, 16), (7, 40), (12, 64)):
        acc = _edge_acc(rng, (m, n))
        args = (acc, None, 1 << 30, -3, 0, -128, 127)
        tr, fast = run_requant(*args, core=core), run_requant(*args, core=core, trace=False)
        assert (tr.cycles, tr.instructions) == (fast.cycles, fast.instructions), (m, n)
        np.testing.assert_array_equal(tr.out, fast.out)


def test_run_requant_extreme_parameters():
    """Every accumulator edge against every parameter edge in one layer: columns carry the
    parameter combinations, rows the accumulator edges."""
    accs = [I32_MIN, I32_MAX, I32_MIN + 1, I32_MAX - 1, -1, 0, 1, 3, -3, 6, -6, 1 << 30]
    combos = [(b, m, s, z) for b in (0, I32_MAX, I32_MIN) for m in (0, 1 << 30, I32_MAX)
              for s in (-31, -1, 0, 1, 31) for z in (0, -128, 127)]
    bias, mult, shift, zp = (np.array(c) for c in zip(*combos))
    acc = np.array(accs, np.int32)[:, None].repeat(len(combos), 1)
    for qmin, qmax, unsigned in ((-128, 127, False), (-3, 5, False), (0, 255, True)):
        want = _python_array(acc, bias, mult, shift, zp, qmin, qmax, unsigned)
        np.testing.assert_array_equal(requantize(acc, bias, mult, shift, zp, qmin, qmax), want)
        res = run_requant(acc, bias, mult, shift, zp, qmin, qmax, core="cortex-a76")
        np.testing.assert_array_equal(res.out, want)


# ---- the same program on QEMU -------------------------------------------------------------------
@pytest.fixture(scope="module")
def mem_emu():
    for mod in ("unicorn", "keystone", "capstone"):
        pytest.importorskip(mod, reason=EMU_REASON)
    from test_neon_memory import MemEmulator
    return MemEmulator()


@pytest.mark.parametrize("shape,unsigned", [((1, 3), False), ((4, 16), True), ((5, 40), False),
                                            ((9, 33), True)])
def test_program_matches_qemu(mem_emu, shape, unsigned):
    """The generated program from the same registers and memory on unicorn (QEMU, code
    assembled by keystone and checked by capstone) and on the Machine: every vector and x
    register, the flags, the whole memory and the instruction count agree; the output read
    from QEMU's memory is requantize's."""
    from test_neon_memory import MEM
    rng = np.random.default_rng(shape[0] * 97 + shape[1])
    acc = _edge_acc(rng, shape)
    args = (acc,) + _random_params(rng, shape[1], True, unsigned)
    prog = build_requant(*args, unsigned=unsigned)
    assert prog.memory.size <= MEM
    code = mem_emu.assemble(prog.asm)
    mem_emu.load(code)
    mem_emu.uc.mem_map(0, MEM)
    mem = np.zeros(MEM, np.uint8)
    mem[:prog.memory.size] = prog.memory
    mem_emu.uc.mem_write(0, mem.tobytes())
    v, x = _state(rng)
    x[:len(prog.registers)] = prog.registers
    v_ref, x_ref, nzcv_ref = mem_emu.run(code, v, x)
    mem_ref = np.frombuffer(bytes(mem_emu.uc.mem_read(0, MEM)), np.uint8)
    m = Machine(mem_size=MEM)
    m.v[:], m.x[:], m.mem[:] = v, x, mem
    stats = m.run(prog.asm)
    assert stats.instructions == mem_emu.executed
    np.testing.assert_array_equal(m.v, v_ref)
    np.testing.assert_array_equal(m.x, x_ref)
    np.testing.assert_array_equal(m.mem, mem_ref)
    n, z, c, vf = m.nzcv
    assert (n << 3 | z << 2 | c << 1 | vf) == nzcv_ref
    np.testing.assert_array_equal(prog.output(mem_ref), requantize(*args, unsigned=unsigned))


# ---- errors name the parameter ----------------------------------------------------------------
def test_errors_name_the_parameter():
    acc = np.zeros((2, 3), np.int32)
    ok = dict(bias=None, multiplier=1 << 30, shift=-1, zero_point=0, qmin=-128, qmax=127)

    def call(fn=requantize, acc=acc, **kw):
        a = {**ok, **kw}
        unsigned = a.pop("unsigned", None)
        return fn(acc, a["bias"], a["multiplier"], a["shift"], a["zero_point"], a["qmin"],
                  a["qmax"], unsigned=unsigned)

    cases = [
        (dict(acc=acc.astype(np.float32)), TypeError, "acc must be"),
        (dict(acc=np.zeros(3, np.int32)), ValueError, r"acc must be 2-D \(M, N\)"),
        (dict(acc=np.full((2, 3), 1 << 31)), ValueError, r"acc must be in \[-2147483648"),
        (dict(bias=np.zeros(4, np.int32)), ValueError, r"bias must be a scalar or have shape \(3,\)"),
        (dict(bias=[0.5, 0, 0]), TypeError, "bias must be"),
        (dict(multiplier=-1), ValueError, r"multiplier must be in \[0, 2147483647\]"),
        (dict(multiplier=1 << 31), ValueError, "multiplier must be in"),
        (dict(multiplier=2 ** 70), ValueError, "multiplier must be in"),
        (dict(shift=32), ValueError, r"shift must be in \[-31, 31\]"),
        (dict(shift=np.array([-32, 0, 0])), ValueError, "shift must be in"),
        (dict(shift=True), TypeError, "shift must be"),
        (dict(zero_point=1.0), TypeError, "zero_point must be"),
        (dict(zero_point=np.zeros((1, 3), np.int64)), ValueError, "zero_point must be a scalar"),
        (dict(qmin=5, qmax=4), ValueError, "qmin and qmax"),
        (dict(qmin=-129), ValueError, "qmin and qmax must satisfy -128 <= qmin"),
        (dict(qmin=-1, qmax=200), ValueError, "qmin and qmax must satisfy 0 <= qmin"),
        (dict(qmax=200, unsigned=False), ValueError, r"qmax <= 127 for int8"),
        (dict(qmin=-1, unsigned=True), ValueError, "for uint8 output"),
        (dict(qmin=0.0), TypeError, "qmin must be an int"),
        (dict(qmax="127"), TypeError, "qmax must be an int"),
        (dict(unsigned="yes"), TypeError, "unsigned must be"),
    ]
    for kw, err, msg in cases:
        for fn in (requantize, run_requant, build_requant):
            with pytest.raises(err, match=msg):
                call(fn, **kw)
    with pytest.raises(ValueError, match="acc must have at least one row"):
        call(run_requant, acc=np.zeros((0, 3), np.int32))
    assert call(acc=np.zeros((0, 3), np.int32)).shape == (0, 3)      # numpy: empty is fine
    with pytest.raises(ValueError, match="core must be one of"):
        run_requant(acc, None, 1, 0, 0, -128, 127, core="cortex-x1")
    with pytest.raises(TypeError, match="trace must be a bool"):
        run_requant(acc, None, 1, 0, 0, -128, 127, trace=1)

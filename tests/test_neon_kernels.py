"""refimpl.neon.kernels: generated GEMM micro-kernels run on the Machine (trace) against the numpy
fast path and exact integer matmuls; the lane wraps they are built to avoid (or show); the
requantisation epilogue against its numpy reference, a float computation and hand values."""

import numpy as np
import pytest

from refimpl.neon import FeatureError, max_accumulations
from refimpl.neon.kernels import (KERNELS, generate_kernel, quantize_multiplier,
                                  requantize_reference, run_gemm)

CONFIGS = [("smlal", 8), ("sdot", 8), ("int7", 7), ("mla-lowbit", 2), ("mla-lowbit", 3),
           ("mla-lowbit", 4)]


def _operands(rng, bits, m, k, n, b_lo=None):
    """Random operands in the bits-bit range with extreme rows/columns: an all-MIN row, an
    all-MAX row, an all-MIN column of B, and a B column alternating MIN/MAX."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    b_lo = lo if b_lo is None else b_lo
    a = rng.integers(lo, hi + 1, (m, k)).astype(np.int8)
    b = rng.integers(b_lo, hi + 1, (k, n)).astype(np.int8)
    a[0], a[1] = lo, hi
    b[:, 0] = b_lo
    b[::2, 1], b[1::2, 1] = b_lo, hi
    return a, b


def _exact(a, b):
    return a.astype(np.int64) @ b.astype(np.int64)


@pytest.mark.parametrize("kernel,bits", CONFIGS)
def test_fast_equals_exact_matmul_and_trace(kernel, bits):
    rng = np.random.default_rng(CONFIGS.index((kernel, bits)))
    # smlal: weights in [-127, 127] (gemmlowp's restriction) so no int16 lane can wrap
    a, b = _operands(rng, bits, 11, 100, 21, b_lo=-127 if kernel == "smlal" else None)
    fast = run_gemm(a, b, kernel, bits=bits)
    tr = run_gemm(a, b, kernel, bits=bits, trace=True)
    assert fast.result.dtype == np.int32 and fast.result.shape == (11, 21)
    np.testing.assert_array_equal(fast.result, _exact(a, b))
    np.testing.assert_array_equal(tr.result, fast.result)
    assert tr.instructions == fast.instructions
    assert fast.macs == 11 * 100 * 21
    assert abs(tr.cycles / fast.cycles - 1) <= 0.05
    assert fast.asm == tr.asm and "b.ne" in fast.asm and "st1" in fast.asm


@pytest.mark.parametrize("kernel", ["smlal", "sdot", "int7", "mla-lowbit"])
@pytest.mark.parametrize("core", ["cortex-a53", "cortex-a72", "cortex-a76"])
def test_cycles_trace_vs_fast_other_cores(kernel, core):
    if kernel == "sdot" and core in ("cortex-a53", "cortex-a72"):
        pytest.skip("no dotprod on this core (tested in test_sdot_needs_dotprod)")
    bits = {"int7": 7, "mla-lowbit": 3}.get(kernel, 8)
    rng = np.random.default_rng(7)
    a, b = _operands(rng, bits, 8, 160, 16)
    fast = run_gemm(a, b, kernel, core=core, bits=bits)
    tr = run_gemm(a, b, kernel, core=core, bits=bits, trace=True)
    np.testing.assert_array_equal(tr.result, fast.result)
    assert abs(tr.cycles / fast.cycles - 1) <= 0.05


def test_instruction_mix():
    a = np.ones((4, 16), np.int8)
    b = np.ones((16, 16), np.int8)
    asm = {k: run_gemm(a, b, k, bits=2 if k == "mla-lowbit" else None).asm for k in KERNELS}
    assert all(w in asm["smlal"] for w in ("smull ", "smlal2 ", "sadalp ", "addp "))
    assert "sdot " in asm["sdot"] and ".4b[" in asm["sdot"]
    assert all(w in asm["int7"] for w in ("smlal ", "smlal2 ", "sadalp ", "ld1r "))
    assert all(w in asm["mla-lowbit"] for w in ("mla ", ".16b", "saddw ", "saddw2 "))


def test_tiles_and_padding():
    rng = np.random.default_rng(3)
    a, b = _operands(rng, 8, 13, 9, 7)
    for tile, unroll in (((4, 16), 2), ((12, 8), 1), ((8, 12), 1)):
        fast = run_gemm(a, b, "sdot", tile=tile, unroll=unroll)
        tr = run_gemm(a, b, "sdot", tile=tile, unroll=unroll, trace=True)
        np.testing.assert_array_equal(fast.result, _exact(a, b))
        np.testing.assert_array_equal(tr.result, fast.result)
    for kernel, tile, bits in (("int7", (6, 8), 7), ("int7", (1, 8), 7), ("mla-lowbit", (4, 16), 2),
                               ("mla-lowbit", (1, 16), 4), ("smlal", (3, 4), 8)):
        a, b = _operands(rng, bits, 7, 31, 18, b_lo=-127 if kernel == "smlal" else None)
        fast = run_gemm(a, b, kernel, bits=bits, tile=tile)
        tr = run_gemm(a, b, kernel, bits=bits, tile=tile, trace=True)
        np.testing.assert_array_equal(fast.result, _exact(a, b))
        np.testing.assert_array_equal(tr.result, fast.result)
    prog = generate_kernel("int7", 9, tile=(2, 8))
    assert prog.k_padded == 14 and prog.kstep == 14 and prog.accumulations == 7


def test_smlal_min_times_min_wraps_as_documented():
    # lane j of each 16-deep block holds products k=j and k=j+8; MIN*MIN twice = 32768 -> -32768
    a = np.full((4, 64), -128, np.int8)
    b = np.full((64, 4), -128, np.int8)
    fast = run_gemm(a, b, "smlal")
    tr = run_gemm(a, b, "smlal", trace=True)
    expected = 64 * 16384 - 32 * 65536                 # 32 wrapped pairs, each short by 65536
    assert (fast.result == expected).all() and (tr.result == expected).all()
    # random full-range int8 with scattered MIN: fast == trace bit for bit
    rng = np.random.default_rng(5)
    a = rng.choice(np.array([-128, -128, 5, -7, 127], np.int8), (6, 48))
    b = rng.choice(np.array([-128, -128, 3, 127], np.int8), (48, 5))
    fast = run_gemm(a, b, "smlal")
    assert not np.array_equal(fast.result, _exact(a, b))
    np.testing.assert_array_equal(run_gemm(a, b, "smlal", trace=True).result, fast.result)
    # 7-bit operands can never wrap
    np.testing.assert_array_equal(run_gemm(a // 2, b // 2, "smlal", bits=7).result,
                                  _exact(a // 2, b // 2))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dsq_wrap_at_one_more_accumulation(bits):
    safe = max_accumulations(bits, bits, 8)
    assert safe == {2: 31, 3: 7, 4: 1}[bits]
    lo = -(1 << (bits - 1))
    n_acc, segments = safe + 1, 3
    a = np.full((4, segments * n_acc), lo, np.int8)      # worst case: MIN * MIN = 4^(bits-1)
    b = np.full((segments * n_acc, 16), lo, np.int8)
    exact = _exact(a, b)
    # the safe kernel is exact on the same inputs
    np.testing.assert_array_equal(run_gemm(a, b, "mla-lowbit", bits=bits).result, exact)
    fast = run_gemm(a, b, "mla-lowbit", bits=bits, accumulations=n_acc)
    tr = run_gemm(a, b, "mla-lowbit", bits=bits, accumulations=n_acc, trace=True)
    seg = n_acc * lo * lo                                 # 128: one past int8's maximum
    wrapped = (seg + 128) % 256 - 128                     # the int8 lane's value: -128
    assert seg == 128 and wrapped == -128
    np.testing.assert_array_equal(fast.result, np.full_like(exact, segments * wrapped))
    np.testing.assert_array_equal(exact, np.full_like(exact, segments * seg))
    np.testing.assert_array_equal(tr.result, fast.result)
    # random operands with the unsafe count: the trace still agrees bit for bit
    rng = np.random.default_rng(bits)
    a, b = _operands(rng, bits, 5, 70, 17)
    fast = run_gemm(a, b, "mla-lowbit", bits=bits, accumulations=n_acc + 2)
    tr = run_gemm(a, b, "mla-lowbit", bits=bits, accumulations=n_acc + 2, trace=True)
    np.testing.assert_array_equal(tr.result, fast.result)


def test_int7_wrap_at_eight_accumulations():
    assert max_accumulations(7, 7, 16) == 7
    a = np.full((4, 32), -64, np.int8)
    b = np.full((32, 8), -64, np.int8)
    np.testing.assert_array_equal(run_gemm(a, b, "int7").result, _exact(a, b))
    fast = run_gemm(a, b, "int7", accumulations=8)
    tr = run_gemm(a, b, "int7", accumulations=8, trace=True)
    # 2 segments x 2 lanes (even/odd k) per column, each 8 * 4096 = 32768 -> -32768
    assert (fast.result == 4 * -32768).all()
    np.testing.assert_array_equal(tr.result, fast.result)


def test_mla_lowbit_int16_widening_schedule():
    # 4-bit, 1 product per segment: K = 600 > 256 segments forces two int16 -> int32 widenings
    a = np.full((4, 600), -8, np.int8)
    b = np.full((600, 16), -8, np.int8)
    prog = generate_kernel("mla-lowbit", 600, bits=4)
    assert "outer:" in prog.asm and "mla_tail:" in prog.asm
    fast = run_gemm(a, b, "mla-lowbit", bits=4, tile=(1, 16))
    tr = run_gemm(a[:1], b, "mla-lowbit", bits=4, tile=(1, 16), trace=True)
    assert (fast.result == 600 * 64).all() and (tr.result == 600 * 64).all()


# ---- requantisation ---------------------------------------------------------------------------
def _requant_python(acc, mult, shift, zp):
    """ARM pseudocode in Python ints (SQRDMULH, SRSHL, ADD, SQXTN, SQXTN)."""
    x = (2 * acc * mult + (1 << 31)) >> 32
    x = min(x, (1 << 31) - 1)
    if shift < 0:
        x = (x + (1 << (-shift - 1))) >> -shift
    x = ((x + zp + (1 << 31)) % (1 << 32)) - (1 << 31)
    return max(min(x, 127), -128)


def test_requantize_reference_hand_values():
    assert quantize_multiplier(0.5) == (1 << 30, 0)
    assert quantize_multiplier(0.25) == (1 << 30, -1)
    assert quantize_multiplier(0.75) == (3 << 29, 0)
    assert quantize_multiplier(0.01) == (1374389535, -6)      # 0.01 = 0.64 * 2^-6
    r = lambda acc, m, s, z: int(requantize_reference(np.array([acc]), m, s, z)[0])
    # SQRDMULH by 2^30 halves with rounding to +inf: 100 -> 50, 101 -> 51 (50.5), -101 -> -50
    assert (r(100, 1 << 30, 0, 0), r(101, 1 << 30, 0, 0), r(-101, 1 << 30, 0, 0)) == (50, 51, -50)
    assert r(12345, 1374389535, -6, 0) == 123                 # 12345 * 0.01 = 123.45
    assert r(12345, 1374389535, -6, 5) == 127                 # 128 saturates
    assert r(-12345, 1374389535, -6, -5) == -128
    assert r(-(1 << 31), -(1 << 31), 0, 0) == 127             # SQRDMULH MIN*MIN saturates
    # a negative tie: SRSHL rounds -1.5 up to -1 (gemmlowp's RoundingDivideByPOT gives -2)
    assert r(-6, 1 << 30, -1, 0) == -1 and r(6, 1 << 30, -1, 0) == 2


def test_requantize_reference_matches_python_ints_and_float():
    rng = np.random.default_rng(11)
    acc = rng.integers(-(1 << 20), 1 << 20, 4000)
    acc[:4] = [-(1 << 31), (1 << 31) - 1, 0, -1]
    for _ in range(20):
        scale = float(np.exp(rng.uniform(np.log(1e-6), np.log(0.9))))
        zp = int(rng.integers(-128, 128))
        m, s = quantize_multiplier(scale)
        assert (1 << 30) <= m < (1 << 31) and -31 <= s <= 0
        got = requantize_reference(acc, m, s, zp)
        assert got.dtype == np.int8
        want = [_requant_python(int(x), m, s, zp) for x in acc[:200]]
        np.testing.assert_array_equal(got[:200], want)
        flt = np.clip(np.round(acc * scale) + zp, -128, 127)
        assert np.abs(got - flt).max() <= 1


@pytest.mark.parametrize("kernel,bits", CONFIGS[:4])
def test_requant_epilogue_trace(kernel, bits):
    rng = np.random.default_rng(13)
    a, b = _operands(rng, bits, 8, 40, 19, b_lo=-127 if kernel == "smlal" else None)
    acc = _exact(a, b)
    per_tensor = quantize_multiplier(40.0 / max(1, np.abs(acc).max())) + (3,)
    per_channel = (rng.integers(1 << 30, (1 << 31) - 1, 19), rng.integers(-9, -1, 19),
                   rng.integers(-20, 20, 19))
    for rq in (per_tensor, per_channel):
        want = requantize_reference(acc, *rq)
        fast = run_gemm(a, b, kernel, bits=bits, requant=rq)
        tr = run_gemm(a, b, kernel, bits=bits, requant=rq, trace=True)
        assert fast.result.dtype == np.int8 and tr.result.dtype == np.int8
        np.testing.assert_array_equal(fast.result, want)
        np.testing.assert_array_equal(tr.result, want)
        assert "sqrdmulh" in tr.asm and "srshl" in tr.asm and "sqxtn2" in tr.asm


# ---- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("core", ["cortex-a53", "cortex-a72"])
def test_sdot_needs_dotprod(core):
    a = np.zeros((4, 4), np.int8)
    for trace in (False, True):
        with pytest.raises(FeatureError, match=f"SDOT.*{core}"):
            run_gemm(a, a, "sdot", core=core, trace=trace)


def test_errors():
    a = np.zeros((4, 8), np.int8)
    b = np.zeros((8, 4), np.int8)
    with pytest.raises(ValueError, match="kernel must be one of"):
        run_gemm(a, b, "gemv")
    with pytest.raises(ValueError, match="core must be one of"):
        run_gemm(a, b, "sdot", core="cortex-x1")
    with pytest.raises(ValueError, match="bits is required"):
        run_gemm(a, b, "mla-lowbit")
    with pytest.raises(ValueError, match="bits for kernel 'mla-lowbit'"):
        run_gemm(a, b, "mla-lowbit", bits=5)
    with pytest.raises(ValueError, match="bits for kernel 'int7'"):
        run_gemm(a, b, "int7", bits=8)
    with pytest.raises(ValueError, match=r"A values must fit .*bits=7"):
        run_gemm(np.full((4, 8), 64, np.int8), b, "int7")
    with pytest.raises(ValueError, match=r"B values must fit .*bits=2"):
        run_gemm(a, np.full((8, 4), -3, np.int8), "mla-lowbit", bits=2)
    with pytest.raises(ValueError, match="A values must fit"):
        run_gemm(a.astype(np.int32) + 200, b, "sdot")
    np.testing.assert_array_equal(run_gemm(a.astype(np.int64) + 1, b + 1, "sdot").result,
                                  np.full((4, 4), 8))              # integer dtypes within range
    with pytest.raises(TypeError, match="A must have an integer dtype"):
        run_gemm(a.astype(np.float32), b, "sdot")
    with pytest.raises(TypeError, match="B must be a numpy array"):
        run_gemm(a, b.tolist(), "sdot")
    with pytest.raises(ValueError, match="A must be a non-empty 2-D"):
        run_gemm(a[0], b, "sdot")
    with pytest.raises(ValueError, match="K"):
        run_gemm(a, b[:5], "sdot")
    with pytest.raises(ValueError, match="tile for kernel 'smlal'"):
        run_gemm(a, b, "smlal", tile=(4, 8))
    with pytest.raises(ValueError, match="accumulations applies"):
        run_gemm(a, b, "sdot", accumulations=3)
    with pytest.raises(ValueError, match="accumulations must be"):
        run_gemm(a, b, "int7", accumulations=0)
    with pytest.raises(ValueError, match="unroll applies"):
        run_gemm(a, b, "smlal", unroll=2)
    with pytest.raises(ValueError, match="requant shift"):
        run_gemm(a, b, "sdot", requant=(1 << 30, 1, 0))
    with pytest.raises(ValueError, match="requant multiplier must be a scalar or have shape"):
        run_gemm(a, b, "sdot", requant=(np.ones(3, np.int64), -1, 0))
    with pytest.raises(ValueError, match="requant needs MR"):
        run_gemm(a, b, "smlal", tile=(2, 4), requant=(1 << 30, -1, 0))
    with pytest.raises(TypeError, match="trace must be a bool"):
        run_gemm(a, b, "sdot", trace="yes")
    with pytest.raises(ValueError, match="real_scale"):
        quantize_multiplier(1.5)


# ---- smlal with more than two products per int16 lane (EasyQuant's INT7 argument) -------------
def _smlal_lanes_reference(a, b, acc_n):
    """Independent loop reference of the smlal kernel's arithmetic: depth blocks of 8 * acc_n,
    lane j of a block sums k = 8 i + j (i < acc_n) in int16 (wrapping), int32 sum of the lanes."""
    m, k = a.shape
    blk = 8 * acc_n
    kp = -(-k // blk) * blk
    ap = np.zeros((m, kp), np.int64)
    bp = np.zeros((kp, b.shape[1]), np.int64)
    ap[:, :k], bp[:k] = a, b
    out = np.zeros((m, b.shape[1]), np.int64)
    for r in range(m):
        for c in range(b.shape[1]):
            for s in range(0, kp, blk):
                for j in range(8):
                    lane = 0
                    for i in range(acc_n):
                        kk = s + 8 * i + j
                        lane = (lane + ap[r, kk] * bp[kk, c] + 32768) % 65536 - 32768
                    out[r, c] += lane
    return out


@pytest.mark.parametrize("acc_n,tile", [(4, (1, 4)), (8, (2, 4)), (8, (3, 4)), (16, (3, 4))])
def test_smlal_accumulations_exact_in_narrow_range(acc_n, tile):
    rng = np.random.default_rng(acc_n + tile[0])
    a = rng.integers(-63, 64, (7, 150)).astype(np.int8)
    b = rng.integers(-63, 64, (150, 9)).astype(np.int8)
    a[0], b[:, 0] = 63, -63                 # an extreme row and column
    fast = run_gemm(a, b, "smlal", bits=7, accumulations=acc_n, tile=tile)
    tr = run_gemm(a, b, "smlal", bits=7, accumulations=acc_n, tile=tile, trace=True)
    ref = _smlal_lanes_reference(a, b, acc_n)
    np.testing.assert_array_equal(tr.result, fast.result)
    np.testing.assert_array_equal(fast.result, ref)
    if acc_n <= 8:                           # 8 * 63^2 = 31752 fits int16: the exact product
        np.testing.assert_array_equal(fast.result, _exact(a, b))
    assert fast.program.accumulations == acc_n and fast.program.kstep == 8 * acc_n
    assert abs(tr.cycles / fast.cycles - 1) <= 0.05


def test_smlal_accumulations_wrap_like_int16_lanes():
    # INT7 full range: -64 * -64 = 4096, eight of them = 32768 wraps to -32768 in every lane
    a = np.full((2, 64), -64, np.int8)
    b = np.full((64, 4), -64, np.int8)
    fast = run_gemm(a, b, "smlal", bits=7, accumulations=8)
    tr = run_gemm(a, b, "smlal", bits=7, accumulations=8, trace=True)
    assert (fast.result == 8 * -32768).all() and (tr.result == fast.result).all()
    assert (run_gemm(a, b, "smlal", bits=7).result == 64 * 4096).all()   # 2 per lane: exact
    # int8 with 6 products per lane: random operands wrap; fast path, trace, loop reference agree
    rng = np.random.default_rng(11)
    a, b = _operands(rng, 8, 5, 100, 6)
    fast = run_gemm(a, b, "smlal", accumulations=6, tile=(3, 4))
    tr = run_gemm(a, b, "smlal", accumulations=6, tile=(3, 4), trace=True)
    ref = _smlal_lanes_reference(a, b, 6)
    assert not np.array_equal(ref, _exact(a, b))
    np.testing.assert_array_equal(fast.result, ref)
    np.testing.assert_array_equal(tr.result, ref)


def test_smlal_accumulations_instruction_counts():
    # 2 x 4 tile, 8 per lane, K = 128: two loop iterations of four depth groups of 16; counted
    # by hand: per group 2 + 4 LD1, 8 low-half SMULL (group 0) or SMLAL, 8 SMLAL2; per iteration
    # 8 SADALP, SUBS, B.NE; prologue 8 MOVI + MOV; epilogue 3 ADDP per row and one ST1
    prog = generate_kernel("smlal", 128, accumulations=8)
    assert (prog.mr, prog.nr, prog.kstep, prog.k_padded) == (2, 4, 64, 128)
    assert prog.mnemonic_counts == {"smlal2": 64, "ld1": 48, "smlal": 48, "smull": 16,
                                    "sadalp": 16, "movi": 8, "addp": 6, "b.ne": 2, "subs": 2,
                                    "mov": 1, "st1": 1}
    assert sum(prog.mnemonic_counts.values()) == prog.instructions
    # the default kernel: per 16-deep block and output, one SMULL, one SMLAL2, one SADALP
    base = generate_kernel("smlal", 128)
    c = base.mnemonic_counts
    assert c["smull"] == c["smlal2"] == c["sadalp"] == 8 * 16 and "smlal" not in c
    assert sum(c.values()) == base.instructions
    # 8 per lane: 9 multiply-or-widen instructions per 64 products and lane instead of 12
    per_mac = {p: (p.mnemonic_counts["smull"] + p.mnemonic_counts.get("smlal", 0)
                   + p.mnemonic_counts["smlal2"] + p.mnemonic_counts["sadalp"])
               / (p.mr * p.nr * p.k_padded) for p in (prog, base)}
    assert per_mac[prog] == pytest.approx(9 / 64)
    assert per_mac[base] == pytest.approx(12 / 64)


def test_smlal_accumulations_bad_values():
    a = np.ones((4, 16), np.int8)
    b = np.ones((16, 4), np.int8)
    for bad in (0, 1, 3, 258, 2.0, True):
        with pytest.raises(ValueError, match="accumulations for kernel 'smlal' must be an even"):
            run_gemm(a, b, "smlal", accumulations=bad)
    with pytest.raises(ValueError, match="MR in 1..3"):
        run_gemm(a, b, "smlal", accumulations=8, tile=(4, 4))
    with pytest.raises(ValueError, match="MR in 1..3"):
        generate_kernel("smlal", 64, accumulations=4, tile=(4, 4))
    assert generate_kernel("smlal", 64, accumulations=2).asm == generate_kernel("smlal", 64).asm

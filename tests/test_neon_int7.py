"""refimpl.neon.int7: the paper's SMLAL budget, int16 lanes wrapping at the 3rd (INT8) and 9th
(INT7) accumulation against numpy int16 arithmetic and QEMU (unicorn + keystone), the im2col
GEMM shape against torch's unfold and the book's model, the INT7/INT8 kernel comparison (outputs
against numpy, speed-ups recomputed, loops against their resource bounds and llvm-mca-19), and
the transcribed ncnn 2020 int8 kernel run on the Machine against numpy."""
import shutil

import numpy as np
import pytest

from refimpl.neon import max_accumulations, run_gemm, steady_state_cycles
from refimpl.neon import timing
from refimpl.neon.int7 import (INT7_CONFIGS, NCNN_INT8_LOOP, KernelConfig, compare_kernels,
                               conv_gemm_shape, max_smlal_accumulations, ncnn_int8_gemm,
                               resource_bounds, smlal_accumulate)

HAVE_MCA = shutil.which(timing.LLVM_MCA) is not None


# ---- the paper's arithmetic -------------------------------------------------------------------
def test_paper_budget():
    # floor((2^15 - 1) / (2^7 - 1)^2) = 2 and floor((2^15 - 1) / (2^6 - 1)^2) = 8 (paper §3.3)
    assert 32767 // 127 ** 2 == 2 and 32767 // 63 ** 2 == 8
    assert max_smlal_accumulations(8) == 2 and max_smlal_accumulations(7) == 8
    for bits in range(2, 9):
        full = max_smlal_accumulations(bits, narrow_range=False)
        assert full == max_accumulations(bits, bits, 16)
        top = 2 ** (bits - 1) - 1
        assert max_smlal_accumulations(bits) == 32767 // top ** 2
    with pytest.raises(ValueError, match="bits must be in 2..8"):
        max_smlal_accumulations(9)
    with pytest.raises(TypeError, match="bits must be an int"):
        max_smlal_accumulations(7.0)


def _int16_running_sums(a, w, n):
    """numpy int16 arithmetic: the products (exact in int16 for int8 operands except
    -128 * -128) added n times with int16 wrap-around."""
    prod = a.astype(np.int32) * w.astype(np.int32)
    acc = np.zeros(8, np.int16)
    rows = []
    for _ in range(n):
        acc = ((acc.astype(np.int32) + prod + 32768) % 65536 - 32768).astype(np.int16)
        rows.append(acc.copy())
    return np.array(rows)


@pytest.mark.parametrize("value,first", [(127, 3), (63, 9), (-128, 2), (-64, 8), (-63, 9)])
def test_first_wrap(value, first):
    tr = smlal_accumulate(value, value, 12)
    assert tr.first_wrap == first
    assert not tr.wrapped[:first - 1].any() and tr.wrapped[first - 1].all()
    np.testing.assert_array_equal(tr.lanes, _int16_running_sums(tr.a, tr.w, 12))
    np.testing.assert_array_equal(tr.exact[:, 0], value * value * np.arange(1, 13))


def test_lanes_are_independent():
    a = np.array([127, 63, -128, -64, 1, -1, 0, 100], np.int8)
    w = np.array([127, 63, -128, -64, 127, 127, -128, -100], np.int8)
    tr = smlal_accumulate(a, w, 10, core="cortex-a72")
    np.testing.assert_array_equal(tr.lanes, _int16_running_sums(a, w, 10))
    first = [int(np.argmax(tr.wrapped[:, j])) + 1 if tr.wrapped[:, j].any() else None
             for j in range(8)]
    # 16129: 3rd; 3969: 9th; 16384: 2nd; 4096: 8th; 127, -127, 0: never; -10000: 4th (-40000)
    assert first == [3, 9, 2, 8, None, None, None, 4]
    assert tr.first_wrap == 2
    # a short operand repeats across the lanes
    assert smlal_accumulate([1, 2], 3, 1).lanes[0].tolist() == [3, 6] * 4


def test_smlal_accumulate_bad_input():
    with pytest.raises(ValueError, match="a values must be int8"):
        smlal_accumulate(128, 1, 2)
    with pytest.raises(ValueError, match="w must be a scalar or have 1..8"):
        smlal_accumulate(1, np.ones(9, int), 2)
    with pytest.raises(TypeError, match="a must be an integer"):
        smlal_accumulate(1.5, 1, 2)
    with pytest.raises(ValueError, match="accumulations must be in 1..4096"):
        smlal_accumulate(1, 1, 0)
    with pytest.raises(ValueError, match="core must be one of"):
        smlal_accumulate(1, 1, 2, core="cortex-x1")


@pytest.fixture(scope="module")
def qemu():
    reason = "the QEMU comparison needs unicorn and keystone-engine (pip packages)"
    unicorn = pytest.importorskip("unicorn", reason=reason)
    keystone = pytest.importorskip("keystone", reason=reason)
    return unicorn, keystone


@pytest.mark.parametrize("value,first", [(127, 3), (63, 9)])
def test_wraps_like_qemu(qemu, value, first):
    """The same SMLAL, one instruction at a time on unicorn's AArch64 (QEMU), from the same
    registers: every lane after every accumulation equals the simulator's."""
    unicorn, keystone = qemu
    from unicorn import arm64_const as c
    code, _ = keystone.Ks(keystone.KS_ARCH_ARM64, keystone.KS_MODE_LITTLE_ENDIAN).asm(
        "smlal v2.8h, v0.8b, v1.8b", 0x10000)
    uc = unicorn.Uc(unicorn.UC_ARCH_ARM64, unicorn.UC_MODE_ARM)
    uc.mem_map(0x10000, 0x1000)
    uc.mem_write(0x10000, bytes(code))
    a = np.array([value, -value, value, 1, 0, value, -value, 5], np.int8)
    w = np.array([value, value, -value, value, value, value, -value, -7], np.int8)
    uc.reg_write(c.UC_ARM64_REG_Q0, int.from_bytes(a.tobytes() + bytes(8), "little"))
    uc.reg_write(c.UC_ARM64_REG_Q1, int.from_bytes(w.tobytes() + bytes(8), "little"))
    uc.reg_write(c.UC_ARM64_REG_Q2, 0)
    n = first + 2
    tr = smlal_accumulate(a, w, n)
    for i in range(n):
        uc.emu_start(0x10000, 0x10004)
        q2 = uc.reg_read(c.UC_ARM64_REG_Q2).to_bytes(16, "little")
        np.testing.assert_array_equal(np.frombuffer(q2, "<i2"), tr.lanes[i])
    assert tr.first_wrap == first


# ---- the convolution's GEMM ---------------------------------------------------------------------
def test_conv_gemm_shape_against_unfold_and_the_model():
    torch = pytest.importorskip("torch")
    from refimpl.models import ResNetCNN
    cases = [((64, 16, 8, 8), 16, 3, dict(padding=1)),
             ((64, 16, 8, 8), 32, 3, dict(stride=2, padding=1)),
             ((2, 3, 11, 9), 5, (3, 2), dict(stride=(2, 1), padding=(1, 0), dilation=(2, 1))),
             ((2, 8, 7, 7), 8, 3, dict(padding=1, groups=4))]
    for shape, out_ch, ks, kw in cases:
        x = torch.zeros(shape)
        ksz = (ks, ks) if isinstance(ks, int) else ks
        g = kw.get("groups", 1)
        cols = torch.nn.functional.unfold(x[:, :shape[1] // g], ksz, dilation=kw.get("dilation", 1),
                                          padding=kw.get("padding", 0), stride=kw.get("stride", 1))
        assert conv_gemm_shape(shape, out_ch, ks, **kw) == \
            (shape[0] * cols.shape[2], cols.shape[1], out_ch // g)
    # 1-D (MNIST-1D's models): length (40 + 2*2 - 4 - 1) // 2 + 1 = 20
    assert conv_gemm_shape((8, 4, 40), 6, 5, stride=2, padding=2) == (160, 20, 6)
    # the book's digits model: blocks.0.conv1 sees (batch, 16, 8, 8)
    model = ResNetCNN()
    seen = {}
    conv = model.blocks[0].conv1

    def hook(mod, inp, out):             # returns None: the output is left alone
        seen["x"] = inp[0].shape
    conv.register_forward_hook(hook)
    model(torch.zeros(64, 1, 8, 8))
    shape = conv_gemm_shape(tuple(seen["x"]), conv.out_channels, conv.kernel_size,
                            stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                            groups=conv.groups)
    assert shape == (4096, 144, 16)


def test_conv_gemm_shape_bad_input():
    with pytest.raises(ValueError, match="input_shape must be"):
        conv_gemm_shape((8, 8), 4, 3)
    with pytest.raises(ValueError, match="groups=3 must divide"):
        conv_gemm_shape((1, 4, 8, 8), 6, 3, groups=3)
    with pytest.raises(ValueError, match="does not fit"):
        conv_gemm_shape((1, 4, 2, 2), 6, 5)
    with pytest.raises(ValueError, match="stride must be an int or a tuple of 2"):
        conv_gemm_shape((1, 4, 8, 8), 6, 3, stride=(1, 1, 1))
    with pytest.raises(ValueError, match="stride values must be >= 1"):
        conv_gemm_shape((1, 4, 8, 8), 6, 3, stride=0)


# ---- kernels compared ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_rows():
    return compare_kernels(13, 150, 9, cores=("cortex-a53", "cortex-a72"), seed=3)


def test_compare_kernels_outputs_and_ratios(small_rows):
    by_name = {r.config.name: r for r in small_rows}
    assert [r.config for r in small_rows] == list(INT7_CONFIGS)
    assert all(r.exact for r in small_rows)
    rng = np.random.default_rng(0)
    for row in small_rows:
        cfg = row.config
        top = 2 ** (cfg.bits - 1) - 1
        a = rng.integers(-top, top + 1, (13, 150)).astype(np.int8)
        b = rng.integers(-top, top + 1, (150, 9)).astype(np.int8)
        for core in ("cortex-a53", "cortex-a72"):
            r = run_gemm(a, b, cfg.kernel, core=core, bits=cfg.bits, tile=cfg.tile,
                         accumulations=cfg.accumulations)
            assert r.cycles_per_mac == pytest.approx(row.cycles_per_mac[core])  # data-blind
            base = by_name.get(cfg.baseline)
            if base is None:
                assert row.speedup[core] is None
            else:
                assert row.speedup[core] == pytest.approx(
                    base.cycles_per_mac[core] / row.cycles_per_mac[core])
                assert row.saving[core] == pytest.approx(1 - 1 / row.speedup[core])
    # like for like: the INT7 kernel is the INT8 one with 4x fewer SADALP per MAC
    for tile in ((3, 4), (2, 4)):
        p8 = by_name[f"INT8 SMLAL {tile[0]}x4, 2/lane"].program
        p7 = by_name[f"INT7 SMLAL {tile[0]}x4, 8/lane"].program
        assert (p8.mr, p8.nr) == (p7.mr, p7.nr) == tile
        loop8 = [t for k, t, _ in p8.account if k == "loop"][0]
        loop7 = [t for k, t, _ in p7.account if k == "loop"][0]
        per_mac = {}
        for name, text, kstep in (("8", loop8, p8.kstep), ("7", loop7, p7.kstep)):
            mn = [line.split()[0] for line in text.splitlines() if " " in line]
            per_mac[name] = {m: mn.count(m) / (tile[0] * 4 * kstep) for m in ("sadalp", "ld1")}
        assert per_mac["8"]["sadalp"] == pytest.approx(4 * per_mac["7"]["sadalp"])
        assert per_mac["8"]["ld1"] == pytest.approx(per_mac["7"]["ld1"])      # same bytes


def test_loops_and_their_resource_bounds(small_rows):
    for row in small_rows:
        prog = row.program
        text = [t for k, t, _ in prog.account if k == "loop"][0]
        for core in ("cortex-a53", "cortex-a72"):
            bound = max(resource_bounds(text, core).values())
            macs = prog.mr * prog.nr * prog.kstep
            assert row.loop_cycles_per_mac[core] >= bound / macs - 1e-9
            if core == "cortex-a72" and prog.kernel == "smlal":
                # the guide's SMULL/SMLAL(2): one per cycle on F0 only, 8 MACs each; SADALP
                # runs on F1: every SMLAL kernel is F0-bound at 1/8 cycle per MAC
                assert resource_bounds(text, core)["pipes F0"] / macs == pytest.approx(1 / 8)
                assert row.loop_cycles_per_mac[core] == pytest.approx(1 / 8)


def test_resource_bounds_hand_case():
    body = "l:\n" + "smull v0.8h, v1.8b, v2.8b\n" * 4 + "subs x3, x3, #1\nb.ne l\n"
    a72 = resource_bounds(body, "cortex-a72")
    assert a72["pipes F0"] == 4 and a72["dispatch"] == 2          # 6 instructions, 3 per cycle
    a53 = resource_bounds(body, "cortex-a53")
    assert a53["pipes V0"] == 4 and a53["issue"] == 4              # Q-form: both 64-bit pipes
    ld = resource_bounds("l:\nld1 {v0.16b}, [x0], #16\nsubs x3, x3, #1\nb.ne l\n", "cortex-a53")
    assert ld["issue"] == 2 + 1                                    # alone, holds issue 2 cycles
    # A72: LD1R is L + F + base writeback, 3 micro-ops, a dispatch group of its own; two
    # SMULL and SUBS + B.NE pack into the groups in between: ld1r | smull smull | ld1r | subs b.ne
    body = ("l:\nld1r {v1.8h}, [x0], #2\nsmull v0.8h, v1.8b, v2.8b\nsmull v3.8h, v1.8b, v2.8b\n"
            "ld1r {v4.8h}, [x0], #2\nsubs x3, x3, #1\nb.ne l\n")
    assert resource_bounds(body, "cortex-a72")["dispatch"] == 4
    with pytest.raises(ValueError, match="core must be one of"):
        resource_bounds(body, "cortex-a9")


def test_compare_kernels_bad_input():
    with pytest.raises(ValueError, match="names baseline 'nope'"):
        compare_kernels(4, 16, 4, [KernelConfig("x", "smlal", 8, baseline="nope")])
    with pytest.raises(ValueError, match="cores must be taken from"):
        compare_kernels(4, 16, 4, cores=("cortex-a9",))
    with pytest.raises(TypeError, match="configs must be a non-empty sequence"):
        compare_kernels(4, 16, 4, [])
    with pytest.raises(ValueError, match="k must be in"):
        compare_kernels(4, 0, 4)


@pytest.mark.skipif(not HAVE_MCA, reason="llvm-mca-19 not installed (Debian package llvm-19); "
                    "comparison with llvm-mca skipped")
def test_loops_against_llvm_mca():
    rows = compare_kernels(8, 128, 8, cores=("cortex-a53", "cortex-a72", "cortex-a76"),
                           llvm_mca=True)
    for row in rows:
        assert "cortex-a53" not in row.llvm_mca_loop_cycles_per_mac     # LLVM has no A53 figures
        for core in ("cortex-a72", "cortex-a76"):
            ours, mca = row.loop_cycles_per_mac[core], row.llvm_mca_loop_cycles_per_mac[core]
            assert abs(ours / mca - 1) <= 0.10, (row.config.name, core, ours, mca)


# ---- ncnn's 2020 int8 kernel --------------------------------------------------------------------
def test_ncnn_kernel_computes_the_product():
    rng = np.random.default_rng(4)
    a = rng.integers(-127, 128, (10, 40)).astype(np.int8)
    b = rng.integers(-127, 128, (40, 7)).astype(np.int8)
    a[0], b[:, 0] = -127, -127
    tr = ncnn_int8_gemm(a, b, trace=True)
    fast = ncnn_int8_gemm(a, b)
    np.testing.assert_array_equal(tr.result, a.astype(np.int64) @ b.astype(np.int64))
    np.testing.assert_array_equal(fast.result, tr.result)
    assert tr.instructions == fast.instructions and tr.tiles == 3 * 2
    assert abs(tr.cycles / fast.cycles - 1) <= 0.05


def test_ncnn_loop_as_written():
    # per 16 k and 4 x 4 outputs (256 MACs): every output takes one SMULL, one SMLAL and one
    # SADALP; eight 16-byte LD1 (two 8-byte registers each); four scalar ADD, SUBS, B.NE
    mn = [line.split()[0] for line in NCNN_INT8_LOOP.splitlines() if " " in line]
    assert {m: mn.count(m) for m in set(mn)} == {"smull": 16, "smlal": 16, "sadalp": 16,
                                                 "ld1": 8, "add": 4, "subs": 1, "b.ne": 1}
    # only v0 and v1 carry the int16 products: SMULL -> SMLAL -> SADALP chains stall an
    # in-order core, so its steady state lies well above the loop's resource bound
    a53 = steady_state_cycles(NCNN_INT8_LOOP, "cortex-a53")
    assert a53 > 1.2 * max(resource_bounds(NCNN_INT8_LOOP, "cortex-a53").values())
    assert steady_state_cycles(NCNN_INT8_LOOP, "cortex-a72") == pytest.approx(
        resource_bounds(NCNN_INT8_LOOP, "cortex-a72")["pipes F0"])


def test_ncnn_bad_input():
    a = np.ones((4, 16), np.int8)
    with pytest.raises(ValueError, match=r"A values must be in \[-127, 127\]"):
        ncnn_int8_gemm(a * -128, a.T)
    with pytest.raises(ValueError, match="K"):
        ncnn_int8_gemm(a, a)
    with pytest.raises(TypeError, match="B must be an integer numpy array"):
        ncnn_int8_gemm(a, a.T.astype(float))

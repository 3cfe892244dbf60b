"""refimpl.neon.lowbit: MLA .16b into int8 lanes wraps one product after DSQ's count (31 / 7 / 1),
against numpy int8 arithmetic and QEMU (unicorn + keystone); DSQ_CONFIGS run through
compare_kernels with exact outputs."""
import numpy as np
import pytest

from refimpl.neon import max_accumulations
from refimpl.neon.int7 import compare_kernels
from refimpl.neon.lowbit import DSQ_CONFIGS, mla_accumulate


def _int8_running_sums(a, w, n):
    prod = a.astype(np.int64) * w.astype(np.int64)
    acc = np.zeros(16, np.int64)
    rows = []
    for _ in range(n):
        acc = (acc + prod + 128) % 256 - 128
        rows.append(acc.copy())
    return np.array(rows, np.int8)


@pytest.mark.parametrize("bits,count", [(2, 31), (3, 7), (4, 1)])
def test_worst_case_wraps_one_after_dsq_count(bits, count):
    assert max_accumulations(bits, bits, 8) == count
    lo = -(1 << (bits - 1))
    tr = mla_accumulate(lo, lo, count + 3)
    assert tr.first_wrap == count + 1
    assert not tr.wrapped[:count].any() and tr.wrapped[count].all()
    assert tr.lanes[count - 1].tolist() == [count * lo * lo] * 16
    np.testing.assert_array_equal(tr.lanes, _int8_running_sums(tr.a, tr.w, count + 3))


def test_lanes_are_independent():
    a = np.array([-2, 1, -4, 3, -8, 7, 0, 1, 2, -1, 5, -5, 6, -6, 127, -128], np.int8)
    w = np.array([-2, 1, -4, -3, -8, 7, 9, -1, 2, -1, 5, 5, -6, -6, 1, 1], np.int8)
    tr = mla_accumulate(a, w, 40, core="cortex-a76")
    np.testing.assert_array_equal(tr.lanes, _int8_running_sums(a, w, 40))
    assert mla_accumulate([1, 2], 3, 1).lanes[0].tolist() == [3, 6] * 8


def test_bad_input():
    with pytest.raises(ValueError, match="a values must be int8"):
        mla_accumulate(128, 1, 2)
    with pytest.raises(ValueError, match="w must be a scalar or have 1..16"):
        mla_accumulate(1, np.ones(17, int), 2)
    with pytest.raises(TypeError, match="a must be an integer"):
        mla_accumulate(1.5, 1, 2)
    with pytest.raises(ValueError, match="accumulations must be in 1..4096"):
        mla_accumulate(1, 1, 0)
    with pytest.raises(TypeError, match="accumulations must be an int"):
        mla_accumulate(1, 1, 2.0)
    with pytest.raises(ValueError, match="core must be one of"):
        mla_accumulate(1, 1, 2, core="cortex-x1")


def test_wraps_like_qemu():
    """The same MLA, one instruction at a time on unicorn's AArch64 (QEMU), from the same
    registers: every lane after every accumulation equals the simulator's."""
    reason = "the QEMU comparison needs unicorn and keystone-engine (pip packages)"
    unicorn = pytest.importorskip("unicorn", reason=reason)
    keystone = pytest.importorskip("keystone", reason=reason)
    from unicorn import arm64_const as c
    code, _ = keystone.Ks(keystone.KS_ARCH_ARM64, keystone.KS_MODE_LITTLE_ENDIAN).asm(
        "mla v2.16b, v0.16b, v1.16b", 0x10000)
    uc = unicorn.Uc(unicorn.UC_ARCH_ARM64, unicorn.UC_MODE_ARM)
    uc.mem_map(0x10000, 0x1000)
    uc.mem_write(0x10000, bytes(code))
    a = np.array([-2, 1, -4, 3, -8, 7, 0, 1, 2, -1, 5, -5, 6, -6, 127, -128], np.int8)
    w = np.array([-2, 1, -4, -3, -8, 7, 9, -1, 2, -1, 5, 5, -6, -6, 1, 1], np.int8)
    uc.reg_write(c.UC_ARM64_REG_Q0, int.from_bytes(a.tobytes(), "little"))
    uc.reg_write(c.UC_ARM64_REG_Q1, int.from_bytes(w.tobytes(), "little"))
    uc.reg_write(c.UC_ARM64_REG_Q2, 0)
    tr = mla_accumulate(a, w, 34)
    for i in range(34):
        uc.emu_start(0x10000, 0x10004)
        q2 = uc.reg_read(c.UC_ARM64_REG_Q2).to_bytes(16, "little")
        np.testing.assert_array_equal(np.frombuffer(q2, np.int8), tr.lanes[i])
    assert tr.first_wrap == 2     # lane 4: -8 * -8 = 64, twice 128


def test_dsq_configs_compare_exactly():
    rows = compare_kernels(24, 64, 32, DSQ_CONFIGS)
    assert [r.config.name for r in rows] == [c.name for c in DSQ_CONFIGS]
    assert all(r.exact for r in rows)
    sdot = rows[1]
    assert sdot.cycles_per_mac["cortex-a53"] is None and sdot.cycles_per_mac["cortex-a55"] > 0
    for r in rows[1:]:
        for core, s in r.speedup.items():
            if s is not None:
                assert s == pytest.approx(rows[0].cycles_per_mac[core] / r.cycles_per_mac[core])


def test_lane_accumulate_names_its_instructions():
    from refimpl.neon.int7 import lane_accumulate, smlal_accumulate
    with pytest.raises(ValueError, match=r"instruction must be one of \('smlal', 'mla'\)"):
        lane_accumulate("sdot", 1, 1, 2)
    np.testing.assert_array_equal(lane_accumulate("mla", -2, -2, 33).lanes, mla_accumulate(-2, -2, 33).lanes)
    np.testing.assert_array_equal(lane_accumulate("smlal", 127, 127, 4).lanes, smlal_accumulate(127, 127, 4).lanes)

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

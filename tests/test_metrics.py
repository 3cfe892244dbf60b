"""refimpl.metrics: the grid's levels, SQNR measured and predicted, and the rounding/clipping split
of the error, checked against independent NumPy computations."""

import math

import numpy as np
import pytest
import torch

from refimpl.metrics import grid_levels, quant_error_split, sqnr_db, uniform_sqnr_db
from refimpl.quant import QuantSpec, fake_quant, qparams

def test_grid_levels_are_every_fake_quant_output():
    for spec in (QuantSpec(4), QuantSpec(3, signed=False, symmetric=False), QuantSpec(4, narrow_range=True)):
        x = torch.linspace(-0.7, 1.9, 20001)
        s, z = qparams(x.min(), x.max(), spec)
        lv = grid_levels(s, z, spec)
        assert lv.numel() == spec.num_levels and bool((lv[1:] > lv[:-1]).all())
        assert set(fake_quant(x, s, z, spec).unique().tolist()) <= set(lv.tolist())
        over = torch.linspace(float(lv[0]), float(lv[-1]), 20001)       # data covering the whole grid
        assert torch.equal(fake_quant(over, s, z, spec).unique(), lv)
        codes = torch.arange(spec.qmin, spec.qmax + 1) - int(z)
        assert torch.equal(lv, codes.to(torch.float32) * s)         # one float32 product, eq. 6
    with pytest.raises(ValueError, match="per-tensor"):
        grid_levels(torch.ones(2), torch.zeros(2, dtype=torch.int32), QuantSpec(4, axis=0))

def test_sqnr_db():
    x = torch.tensor([1.0, -2.0, 3.0])
    y = x + torch.tensor([0.1, 0.0, -0.1])
    assert sqnr_db(x, y) == pytest.approx(10 * math.log10(14 / 0.02), rel=1e-6)
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(torch.zeros(3), y) == -math.inf
    with pytest.raises(ValueError, match="same shape"):
        sqnr_db(x, y[:2])

@pytest.mark.parametrize("bits", [4, 6, 8, 10])
def test_uniform_sqnr_formula_matches_uniform_data(bits):
    # uniform data on [-1, 1]: peak/rms = sqrt(3), and the rounding error is uniform by construction
    g = torch.Generator().manual_seed(bits)
    x = torch.rand(200_000, generator=g, dtype=torch.float64) * 2 - 1
    x[0], x[1] = -1.0, 1.0
    spec = QuantSpec(bits)
    xq = fake_quant(x, *qparams(x.min(), x.max(), spec), spec)
    peak_to_rms = float(x.abs().max() / x.pow(2).mean().sqrt())
    assert sqnr_db(x, xq) == pytest.approx(uniform_sqnr_db(bits, peak_to_rms), abs=0.1)

def test_uniform_sqnr_six_db_per_bit_and_errors():
    step = uniform_sqnr_db(12, 4.0) - uniform_sqnr_db(11, 4.0)
    assert step == pytest.approx(20 * math.log10(2), abs=0.01)
    with pytest.raises(ValueError, match="peak_to_rms"):
        uniform_sqnr_db(8, 0.5)
    with pytest.raises(ValueError, match="bits"):
        uniform_sqnr_db(0, 2.0)

def test_quant_error_split_against_numpy():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10_000, generator=g, dtype=torch.float64) * 2
    spec = QuantSpec(4, signed=False, symmetric=False)
    s, z = qparams(-1.0, 1.5, spec)            # clips both tails of the data
    out = quant_error_split(x, s, z, spec)
    xn, sn, zn = x.numpy(), float(s), int(z)
    code = np.round(xn / sn) + zn
    inside = (code >= spec.qmin) & (code <= spec.qmax)
    err2 = (sn * (np.clip(code, spec.qmin, spec.qmax) - zn) - xn) ** 2
    assert out["clipped_fraction"] == pytest.approx(1 - inside.mean(), abs=1e-12)
    assert out["rounding_mse"] == pytest.approx(err2[inside].sum() / xn.size, rel=1e-9)
    assert out["clipping_mse"] == pytest.approx(err2[~inside].sum() / xn.size, rel=1e-9)
    assert out["mse"] == pytest.approx(out["rounding_mse"] + out["clipping_mse"], rel=1e-12)
    assert np.sqrt(err2[inside]).max() <= sn / 2 + 1e-12     # rounding error is at most scale/2
    with pytest.raises(ValueError, match="per-tensor"):
        quant_error_split(x.reshape(100, 100), s.expand(100), z.expand(100), spec.per_channel(0))

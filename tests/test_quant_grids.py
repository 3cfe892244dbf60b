"""refimpl.quant's grids beyond the uniform quantizer itself: power-of-two levels and nearest-level
quantization (refimpl.quant.nonuniform) against brute force, and in_grid as the STE's pass-through set."""

import numpy as np
import pytest
import torch

from refimpl.quant import QuantSpec, fake_quant, in_grid, pow2_levels, qparams, quantize_to_levels

def test_pow2_levels():
    lv = pow2_levels(4, 0.5)
    assert lv.dtype == torch.float64 and lv.numel() == 15
    mags = sorted(set(abs(v) for v in lv.tolist()))
    assert mags == [0.0] + [0.5 * 2.0**-k for k in range(6, -1, -1)]
    assert torch.equal(lv, -lv.flip(0))
    assert pow2_levels(2, 1.0).tolist() == [-1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="max_abs"):
        pow2_levels(4, 0.0)

def test_quantize_to_levels_equals_brute_force_nearest():
    g = torch.Generator().manual_seed(0)
    levels = pow2_levels(4, 1.0)
    x = torch.randn(5000, generator=g) * 0.6
    got = quantize_to_levels(x, levels).double().numpy()
    lv = levels.numpy()
    d = np.abs(x.double().numpy()[:, None] - lv[None, :])
    ref = lv[np.argmin(d, axis=1)]
    assert np.array_equal(got, ref)
    # ties go towards zero; beyond the outermost levels values clip
    lv2 = torch.tensor([-1.0, 0.0, 1.0, 3.0])
    x2 = torch.tensor([0.5, -0.5, 2.0, 7.0, -9.0])
    assert quantize_to_levels(x2, lv2).tolist() == [0.0, 0.0, 1.0, 3.0, -1.0]
    assert quantize_to_levels(x2, torch.tensor([0.25])).tolist() == [0.25] * 5
    with pytest.raises(ValueError, match="increasing"):
        quantize_to_levels(x2, torch.tensor([1.0, 0.0]))

def test_in_grid_is_the_ste_pass_through_set():
    x = torch.linspace(-3, 3, 601)
    spec = QuantSpec(4)
    s, z = qparams(-1.0, 1.0, spec)
    xg = x.clone().requires_grad_()
    fake_quant(xg, s, z, spec).sum().backward()
    mask = in_grid(x, s, z, spec)
    assert mask.dtype == torch.bool and torch.equal(mask, xg.grad.bool())
    assert 0 < int(mask.sum()) < x.numel()

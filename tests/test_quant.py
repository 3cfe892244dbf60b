"""refimpl.quant checked against PyTorch's observers and fused fake-quant kernels."""

import math

import numpy as np
import pytest
import torch
from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver

from refimpl.quant import (QuantSpec, broadcast_qparams, dequantize, fake_quant, lsq_fake_quant,
                           lsq_grad_scale, qparams, quantize, round_to_int)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def data(shape, seed=0, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def torch_observer(spec, x):
    """The torch observer configured for spec's grid, after observing x."""
    if spec.axis is None:
        qscheme = torch.per_tensor_symmetric if spec.symmetric else torch.per_tensor_affine
        cls, kw = MinMaxObserver, {}
    else:
        qscheme = torch.per_channel_symmetric if spec.symmetric else torch.per_channel_affine
        cls, kw = PerChannelMinMaxObserver, {"ch_axis": spec.axis}
    dtype = torch.qint8 if spec.signed else torch.quint8
    default = (spec.bits == 8 and not spec.narrow_range)
    if not default:
        kw.update(quant_min=spec.qmin, quant_max=spec.qmax)
    if spec.bits > 8:
        dtype = torch.qint32
        kw.update(quant_min=spec.qmin, quant_max=spec.qmax)
    obs = cls(dtype=dtype, qscheme=qscheme, **kw)
    obs(x)
    return obs


GRIDS = [QuantSpec(b, signed=sg, symmetric=sy)
         for b in (8, 4, 2) for sg in (True, False) for sy in (True, False)
         if not (b != 8 and sy and not sg)]   # torch picks a down-rounded middle there: see below
GRIDS += [QuantSpec(8, narrow_range=True), QuantSpec(16, signed=True, symmetric=False),
          QuantSpec(12, signed=True, symmetric=True)]


@pytest.mark.parametrize("spec", GRIDS, ids=str)
@pytest.mark.parametrize("shift", [0.0, 2.0, -2.0])
def test_qparams_equal_torch_minmax_observer(spec, shift):
    x = data((1000,), seed=1) + shift
    obs = torch_observer(spec, x)
    s_ref, z_ref = obs.calculate_qparams()
    s, z = qparams(x.min(), x.max(), spec)
    assert s.dtype == torch.float32 and z.dtype == torch.int32 and s.ndim == 0
    assert torch.equal(s.reshape(1), s_ref.reshape(1))
    assert int(z) == int(z_ref)


@pytest.mark.parametrize("spec", GRIDS, ids=str)
@pytest.mark.parametrize("axis", [0, 1])
def test_qparams_equal_torch_per_channel_observer(spec, axis):
    w = data((6, 5, 3, 3), seed=2) * torch.linspace(0.01, 2, 6).reshape(6, 1, 1, 1) + 0.3
    spec = spec.per_channel(axis)
    obs = torch_observer(spec, w)
    s_ref, z_ref = obs.calculate_qparams()
    dims = [d for d in range(w.ndim) if d != axis]
    s, z = qparams(w.amin(dims), w.amax(dims), spec)
    assert torch.equal(s, s_ref)
    assert torch.equal(z.long(), z_ref.long())


def test_unsigned_symmetric_zero_point_convention():
    """Default quint8 grid: torch and we pick 128. Custom ranges: torch rounds the middle down."""
    x = data((100,))
    assert int(qparams(x.min(), x.max(), QuantSpec(8, signed=False))[1]) == 128
    assert int(qparams(x.min(), x.max(), QuantSpec(4, signed=False))[1]) == 8   # signed grid shifted
    obs = MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_symmetric, quant_min=0, quant_max=15)
    obs(x)
    assert int(obs.calculate_qparams()[1]) == 7     # torch's custom-range choice, documented in spec.py


def tie_heavy(shape, scale, seed=0, dtype=torch.float32):
    """Values at exact half-steps (k + 1/2) * scale, plus random ones and out-of-range ones."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(-300, 300, shape, generator=g).to(torch.float64)
    ties = ((k + 0.5) * float(scale)).to(dtype)
    rnd = (torch.randn(shape, generator=g) * 200 * float(scale)).to(dtype)
    pick = torch.rand(shape, generator=g) < 0.5
    return torch.where(pick, ties, rnd)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(8, signed=False, symmetric=False),
                                  QuantSpec(4, symmetric=False), QuantSpec(2), QuantSpec(16, symmetric=False),
                                  QuantSpec(1, signed=False, symmetric=False)], ids=str)
def test_fake_quant_per_tensor_bit_exact_with_torch(dtype, spec):
    x = data((4000,), seed=3, dtype=dtype)
    s, z = qparams(x.min(), x.max(), spec)
    x = torch.cat([x, tie_heavy((2000,), s, dtype=dtype)])
    ours = fake_quant(x, s, z, spec)
    ref = torch.fake_quantize_per_tensor_affine(x, float(s), int(z), spec.qmin, spec.qmax)
    assert ours.dtype == dtype
    if dtype == torch.float64:
        # torch's per-tensor op rounds float64 results to float32 precision; we return the exact
        # product (as torch's per-channel op does): equal after rounding ours to float32
        assert torch.equal(ours.float().double(), ref)
        assert torch.equal(ours, (quantize(x, s, z, spec).double() - int(z)) * float(s))
    else:
        assert torch.equal(ours, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quant_per_channel_bit_exact_with_torch(dtype, axis, symmetric):
    w = data((8, 6, 5), seed=4, dtype=torch.float32) * torch.logspace(-3, 1, 6).reshape(1, 6, 1)
    spec = QuantSpec(8, symmetric=symmetric, axis=axis)
    dims = [d for d in range(3) if d != axis % 3]
    s, z = qparams(w.amin(dims), w.amax(dims), spec)
    w = w.to(dtype)
    ours = fake_quant(w, s, z, spec)
    ref = torch.fake_quantize_per_channel_affine(w, s, z, axis % 3, spec.qmin, spec.qmax)
    assert ours.dtype == dtype
    assert torch.equal(ours, ref)


def test_fake_quant_large_tensor_blocks_bit_exact():
    """Big enough to run in several blocks, per-channel axis 0 and 1 with varying zero-points."""
    w = data((300, 700), seed=5) + torch.linspace(-2, 2, 700)
    for axis in (0, 1):
        spec = QuantSpec(8, signed=False, symmetric=False, axis=axis)
        s, z = qparams(w.amin(1 - axis), w.amax(1 - axis), spec)
        ref = torch.fake_quantize_per_channel_affine(w, s, z, axis, spec.qmin, spec.qmax)
        assert torch.equal(fake_quant(w, s, z, spec), ref)
        assert torch.equal(dequantize(quantize(w, s, z, spec), s, z, spec), ref)
        # STE gradients, block by block, equal torch's; on a non-contiguous view too
        for x in (w * 1.5, (w * 1.5).t().contiguous().t()):
            a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
            fake_quant(a, s, z, spec).sum().backward()
            torch.fake_quantize_per_channel_affine(b, s, z, axis, spec.qmin, spec.qmax).sum().backward()
            assert torch.equal(a.grad, b.grad) and 0 < int((a.grad == 0).sum())


@pytest.mark.parametrize("per_channel", [False, True])
def test_fake_quant_ste_gradient_equals_torch(per_channel):
    x = data((16, 50), seed=6)
    if per_channel:
        spec = QuantSpec(4, symmetric=False, axis=0)
        s, z = qparams(x.amin(1) * 0.5, x.amax(1) * 0.5, spec)    # clip: some gradients are zero
        ref_fn = lambda t: torch.fake_quantize_per_channel_affine(t, s, z, 0, spec.qmin, spec.qmax)
    else:
        spec = QuantSpec(4, symmetric=False)
        s, z = qparams(x.min() * 0.5, x.max() * 0.5, spec)
        ref_fn = lambda t: torch.fake_quantize_per_tensor_affine(t, float(s), int(z), spec.qmin, spec.qmax)
    g_out = data((16, 50), seed=7)
    a = x.clone().requires_grad_()
    fake_quant(a, s, z, spec).backward(g_out)
    b = x.clone().requires_grad_()
    ref_fn(b).backward(g_out)
    assert torch.equal(a.grad, b.grad)
    assert 0 < int((a.grad == 0).sum()) < a.numel()


@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(3, signed=False, symmetric=False),
                                  QuantSpec(8, axis=1), QuantSpec(16, symmetric=False)], ids=str)
def test_quantize_dequantize_roundtrip_equals_fake_quant(spec):
    x = data((7, 9), seed=8)
    if spec.axis is None:
        s, z = qparams(x.min(), x.max(), spec)
    else:
        s, z = qparams(x.amin(0), x.amax(0), spec)
    q = quantize(x, s, z, spec)
    assert q.dtype == spec.storage_dtype
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    assert torch.equal(dequantize(q, s, z, spec), fake_quant(x, s, z, spec))


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_bit_width_and_dtype(bits, dtype):
    for signed in (True, False):
        spec = QuantSpec(bits, signed=signed, symmetric=False)
        x = data((300,), seed=bits, dtype=dtype)
        s, z = qparams(x.min(), x.max(), spec)
        y = fake_quant(x, s, z, spec)
        assert y.dtype == dtype and y.shape == x.shape
        assert torch.isfinite(y).all()
        assert spec.num_levels == 2**bits
        # within half a step (plus the dtype's own rounding of the grid point)
        tol = float(s) / 2 * (1 + 1e-6) + 2 * torch.finfo(dtype).eps * float(x.abs().max())
        assert float((y.double() - x.double()).abs().max()) <= tol


def test_storage_dtypes():
    assert QuantSpec(8).storage_dtype == torch.int8
    assert QuantSpec(8, signed=False).storage_dtype == torch.uint8
    assert QuantSpec(12).storage_dtype == torch.int16
    assert QuantSpec(16, signed=False).storage_dtype == torch.int32
    assert (QuantSpec(8).qmin, QuantSpec(8).qmax) == (-128, 127)
    assert (QuantSpec(8, narrow_range=True).qmin, QuantSpec(4, signed=False).qmax) == (-127, 15)


# ---------------------------------------------------------------------------------------------
# rounding
# ---------------------------------------------------------------------------------------------
def test_rounding_modes_on_ties_and_hard_values():
    v = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49999997, -0.49999997, 2.4, -2.6, 3.0])
    assert round_to_int(v, "half_even").tolist() == [-2, -2, -0, 0, 2, 2, 0, -0, 2, -3, 3]
    assert round_to_int(v, "half_away").tolist() == [-3, -2, -1, 1, 2, 3, 0, 0, 2, -3, 3]
    assert round_to_int(v, "floor").tolist() == [-3, -2, -1, 0, 1, 2, 0, -1, 2, -3, 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_half_away_equals_exact_reference(dtype):
    v = data((100000,), seed=9, scale=50.0, dtype=dtype)
    v = torch.cat([v, torch.round(v) + 0.5, torch.round(v) - 0.5])
    a = np.abs(v.double().numpy())
    # exact for both dtypes: the fraction a - floor(a) of a float is exact
    ref = np.sign(v.double().numpy()) * np.where(a - np.floor(a) >= 0.5, np.floor(a) + 1, np.floor(a))
    assert np.array_equal(round_to_int(v, "half_away").double().numpy(), ref)


def test_stochastic_rounding_is_unbiased():
    """E[round(v)] = v: the sample mean over n draws lies within 5 standard errors of v."""
    n = 200_000
    g = torch.Generator().manual_seed(10)
    for v0 in (0.1, 0.5, 0.73, -1.3, 2.999, 7.0):
        v = torch.full((n,), v0, dtype=torch.float64)
        r = round_to_int(v, "stochastic", generator=g)
        frac = v0 - math.floor(v0)
        se = math.sqrt(frac * (1 - frac) / n)
        assert set(torch.unique(r).tolist()) <= {math.floor(v0), math.floor(v0) + 1}
        assert abs(float(r.mean()) - v0) <= 5 * se + 1e-12
    # a biased rounder fails the same test: floor at 0.5 is off by 0.5 >> 5 se
    r = round_to_int(torch.full((n,), 0.5, dtype=torch.float64), "floor")
    assert abs(float(r.mean()) - 0.5) > 5 * math.sqrt(0.25 / n)


def test_stochastic_fake_quant_is_seeded_and_unbiased():
    spec = QuantSpec(8)
    x = torch.full((100_000,), 0.3)
    s, z = torch.tensor(1.0), torch.tensor(0)
    a = fake_quant(x, s, z, spec, rounding="stochastic", generator=torch.Generator().manual_seed(1))
    b = fake_quant(x, s, z, spec, rounding="stochastic", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert abs(float(a.double().mean()) - 0.3) < 5 * math.sqrt(0.21 / 1e5)


# ---------------------------------------------------------------------------------------------
# LSQ / LSQ+
# ---------------------------------------------------------------------------------------------
def away_from_boundary(x, s, spec):
    """Drop values whose x/s lies in (qmax, qmax + 1/2] or [qmin - 1/2, qmin): there the paper's
    'v/s inside the grid' and torch's 'round(v/s) inside the grid' differ."""
    v = x / s
    keep = ~(((v > spec.qmax) & (v <= spec.qmax + 0.5)) | ((v < spec.qmin) & (v >= spec.qmin - 0.5)))
    return x[keep]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lsq_gradients_equal_torch_learnable_fake_quant(bits):
    spec = QuantSpec(bits)
    s0 = 0.7 / 2 ** (bits - 2)
    x = away_from_boundary(data((5000,), seed=11), s0, spec)
    g = lsq_grad_scale(x.numel(), spec)
    g_out = data(x.shape, seed=12)

    xa = x.clone().requires_grad_()
    sa = torch.tensor(s0, requires_grad=True)
    ya = lsq_fake_quant(xa, sa, spec, grad_scale=g)
    ya.backward(g_out)

    xb = x.clone().requires_grad_()
    sb = torch.tensor([s0], requires_grad=True)
    zb = torch.tensor([0.0], requires_grad=True)
    yb = torch._fake_quantize_learnable_per_tensor_affine(xb, sb, zb, spec.qmin, spec.qmax, g)
    yb.backward(g_out)

    assert torch.equal(ya, yb)
    assert torch.equal(xa.grad, xb.grad)
    assert torch.allclose(sa.grad.reshape(1), sb.grad, rtol=1e-5, atol=1e-6)


def test_lsq_per_channel_gradients_equal_torch():
    spec = QuantSpec(4, axis=0)
    s0 = torch.tensor([0.05, 0.2, 0.5])
    x = data((3, 400), seed=13)
    x = torch.where(((x / s0[:, None]) - spec.qmax).abs() < 0.6, torch.zeros_like(x), x)
    x = torch.where(((x / s0[:, None]) - spec.qmin).abs() < 0.6, torch.zeros_like(x), x)
    g_out = data(x.shape, seed=14)
    sa = s0.clone().requires_grad_()
    lsq_fake_quant(x, sa, spec, grad_scale=0.1).backward(g_out)
    sb = s0.clone().requires_grad_()
    torch._fake_quantize_learnable_per_channel_affine(
        x, sb, torch.zeros(3), 0, spec.qmin, spec.qmax, 0.1).backward(g_out)
    assert torch.allclose(sa.grad, sb.grad, rtol=1e-5, atol=1e-6)


def lsq_autograd_reference(x, s, spec, g, beta=None):
    """LSQ written with autograd and the 'detach trick' (Esser et al. 2020, appendix)."""
    s_scaled = (s - s * g).detach() + s * g
    b_scaled = None if beta is None else (beta - beta * g).detach() + beta * g
    v = (x - b_scaled) / s_scaled if beta is not None else x / s_scaled
    v = torch.clamp(v, spec.qmin, spec.qmax)
    v = (v.round() - v).detach() + v
    out = v * s_scaled
    return out + b_scaled if beta is not None else out


@pytest.mark.parametrize("with_offset", [False, True])
def test_lsq_and_lsq_plus_gradients_equal_autograd_reference(with_offset):
    spec = QuantSpec(3, signed=not with_offset, symmetric=False)
    x = data((2000,), seed=15, dtype=torch.float64)
    s0, b0 = 0.4, (-0.9 if with_offset else None)
    g = lsq_grad_scale(x.numel(), spec)
    g_out = data(x.shape, seed=16, dtype=torch.float64)
    grads = []
    for fn in (lambda xx, ss, bb: lsq_fake_quant(xx, ss, spec, g, offset=bb),
               lambda xx, ss, bb: lsq_autograd_reference(xx, ss, spec, g, bb)):
        xx = x.clone().requires_grad_()
        ss = torch.tensor(s0, dtype=torch.float64, requires_grad=True)
        bb = None if b0 is None else torch.tensor(b0, dtype=torch.float64, requires_grad=True)
        fn(xx, ss, bb).backward(g_out)
        grads.append((xx.grad, ss.grad, None if bb is None else bb.grad))
    (xa, sa, ba), (xb, sb, bb) = grads
    # the reference clamps before rounding, so x/s exactly on a bound passes the gradient there;
    # LSQ's eq. 3 uses open bounds: no sample of continuous data lands exactly on one.
    # autograd's x-gradient is g * (1/s) * s, one rounding away from g
    assert torch.equal(xa == 0, xb == 0)
    assert torch.allclose(xa, xb, rtol=1e-12, atol=0)
    assert torch.allclose(sa, sb, rtol=1e-9)
    if with_offset:
        assert torch.allclose(ba, bb, rtol=1e-9)
        assert float(ba) != 0.0


@pytest.mark.parametrize("with_offset", [False, True])
def test_lsq_step_gradient_matches_finite_difference_with_frozen_rounding(with_offset):
    """dx_hat/ds is the derivative with round()'s residual held fixed (the STE): check it by
    central differences on x_hat(s) = s * (clamp(v(s)) + r0) + beta with r0 frozen at s0."""
    spec = QuantSpec(4, signed=not with_offset, symmetric=False)
    x = data((500,), seed=17, dtype=torch.float64)
    s0, b0, h = 0.3, (0.2 if with_offset else 0.0), 1e-7
    v0 = (x - b0) / s0
    r0 = torch.round(v0) - v0
    inside = (v0 > spec.qmin) & (v0 < spec.qmax)

    def frozen(s):
        v = (x - b0) / s
        q = torch.where(inside, v + r0, torch.clamp(torch.round(v0), spec.qmin, spec.qmax))
        return (q * s + b0).sum()

    fd = (frozen(s0 + h) - frozen(s0 - h)) / (2 * h)
    s = torch.tensor(s0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(b0, dtype=torch.float64, requires_grad=True) if with_offset else None
    lsq_fake_quant(x, s, spec, grad_scale=1.0, offset=b).sum().backward()
    assert abs(float(s.grad) - float(fd)) < 1e-5 * max(1.0, abs(float(fd)))
    if with_offset:
        qc = torch.clamp(torch.round(v0), spec.qmin, spec.qmax)

        def frozen_b(bb):
            q = torch.where(inside, (x - bb) / s0 + r0, qc)
            return (q * s0 + bb).sum()

        fdb = (frozen_b(b0 + h) - frozen_b(b0 - h)) / (2 * h)
        assert abs(float(b.grad) - float(fdb)) < 1e-5 * max(1.0, abs(float(fdb)))


def test_lsq_forward_equals_fake_quant():
    spec = QuantSpec(4)
    x = data((1000,), seed=18)
    s = torch.tensor(0.25)
    assert torch.equal(lsq_fake_quant(x, s, spec), fake_quant(x, s, 0, spec))


# ---------------------------------------------------------------------------------------------
# degenerate and bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0.0, 3.0, -2.0])
@pytest.mark.parametrize("symmetric", [True, False])
def test_constant_tensors_give_valid_results(value, symmetric):
    spec = QuantSpec(8, symmetric=symmetric)
    x = torch.full((10,), value)
    s, z = qparams(x.min(), x.max(), spec)
    assert float(s) > 0 and torch.isfinite(s)
    y = fake_quant(x, s, z, spec)
    assert torch.isfinite(y).all()
    assert float((y - x).abs().max()) <= float(s) / 2 + 1e-6
    if value == 0.0:
        assert torch.equal(y, x)


def expect(exc, match, fn, *a, **kw):
    with pytest.raises(exc, match=match):
        fn(*a, **kw)


def test_bad_spec():
    expect(ValueError, "bits", QuantSpec, bits=0)
    expect(ValueError, "bits", QuantSpec, bits=17)
    expect(TypeError, "bits", QuantSpec, bits=8.0)
    expect(TypeError, "bits", QuantSpec, bits=True)
    expect(TypeError, "signed", QuantSpec, signed=1)
    expect(ValueError, "narrow_range", QuantSpec, bits=1, narrow_range=True)
    expect(TypeError, "axis", QuantSpec, axis=1.5)


def test_bad_qparams_input():
    spec = QuantSpec(8)
    expect(ValueError, "xmax must be >= xmin", qparams, 1.0, -1.0, spec)
    expect(ValueError, "xmin contains NaN", qparams, float("nan"), 1.0, spec)
    expect(ValueError, "xmax contains NaN or Inf", qparams, 0.0, float("inf"), spec)
    expect(ValueError, "xmin must be 0-d", qparams, torch.zeros(3), torch.ones(3), spec)
    expect(ValueError, "xmin must be 1-d", qparams, 0.0, 1.0, spec.per_channel(0))
    expect(ValueError, "same shape", qparams, torch.zeros(3), torch.ones(4), spec.per_channel(0))
    expect(ValueError, "xmin is empty", qparams, torch.zeros(0), torch.ones(0), spec.per_channel(0))
    expect(TypeError, "spec", qparams, 0.0, 1.0, "int8")
    expect(TypeError, "xmin", qparams, "0", 1.0, spec)


def test_bad_quantizer_input():
    spec = QuantSpec(8)
    x = data((4, 5))
    s, z = torch.tensor(0.1), torch.tensor(0)
    for fn in (fake_quant, quantize):
        expect(ValueError, "x contains NaN or Inf", fn, torch.tensor([1.0, float("nan")]), s, z, spec)
        expect(ValueError, "x contains NaN or Inf", fn, torch.tensor([1.0, float("inf")]), s, z, spec)
        expect(ValueError, "x is empty", fn, torch.zeros(0), s, z, spec)
        expect(TypeError, "x must have a floating dtype", fn, torch.ones(3, dtype=torch.int32), s, z, spec)
        expect(TypeError, "x must be a torch.Tensor", fn, [1.0], s, z, spec)
        expect(ValueError, "scale must be finite and > 0", fn, x, torch.tensor(0.0), z, spec)
        expect(ValueError, "scale must be finite and > 0", fn, x, torch.tensor(-0.1), z, spec)
        expect(ValueError, "scale must be finite and > 0", fn, x, torch.tensor(float("nan")), z, spec)
        expect(ValueError, "rounding must be one of", fn, x, s, z, spec, rounding="nearest")
        expect(ValueError, "zero_point must lie on the grid", fn, x, s, torch.tensor(200), spec)
        expect(ValueError, "zero_point must hold integer values", fn, x, s, torch.tensor(0.5), spec)
        expect(ValueError, "one scale and one zero_point", fn, x, torch.ones(4), torch.zeros(4), spec)
        expect(ValueError, "out of range", fn, x, torch.ones(4), torch.zeros(4), spec.per_channel(2))
        expect(ValueError, r"scale must be 1-d with one value per channel along axis 0 \(4\)",
               fn, x, torch.ones(5), torch.zeros(5), spec.per_channel(0))
        expect(ValueError, "zero_point must be 1-d", fn, x, torch.ones(4), torch.zeros(3), spec.per_channel(0))
        expect(TypeError, "generator", fn, x, s, z, spec, rounding="stochastic", generator=0)
    expect(TypeError, "q must be an integer tensor", dequantize, x, s, z, spec)
    expect(ValueError, "outside the grid", dequantize, torch.tensor([300], dtype=torch.int32), s, z, spec)
    expect(ValueError, "step_size must be finite and > 0", lsq_fake_quant, x, torch.tensor(0.0), spec)
    expect(ValueError, "step_size must hold 4", lsq_fake_quant, x, torch.ones(3), spec.per_channel(0))


def test_broadcast_qparams_shapes_and_dtypes():
    x = data((4, 5, 3))
    s, z, axis = broadcast_qparams(x, 0.1, 3, QuantSpec(4, signed=False, symmetric=False))
    assert axis is None and s.shape == z.shape == () and s.dtype == z.dtype == torch.float32
    assert float(s) == float(torch.tensor(0.1)) and float(z) == 3.0
    # float64: a Python float keeps its double precision
    s64, z64, _ = broadcast_qparams(x, 0.1, torch.tensor(3), QuantSpec(4, signed=False, symmetric=False),
                                    dtype=torch.float64)
    assert s64.dtype == z64.dtype == torch.float64 and float(s64) == 0.1
    spec = QuantSpec(8, symmetric=False, axis=-2)
    s, z, axis = broadcast_qparams(x, torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64),
                                   torch.tensor([1, 2, 3, 4, 5], dtype=torch.int8), spec)
    assert axis == 1 and s.shape == z.shape == (1, 5, 1) and s.dtype == z.dtype == torch.float32
    assert z.flatten().tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    # one value per channel or one for all
    s1, z1, _ = broadcast_qparams(x, torch.tensor(0.25), 7, spec)
    assert s1.shape == z1.shape == (1, 5, 1) and bool((s1 == 0.25).all()) and bool((z1 == 7).all())


def test_fake_quant_per_channel_accepts_one_scale_for_all_channels():
    x = data((6, 4), seed=21)
    spec = QuantSpec(8, axis=1)
    assert torch.equal(fake_quant(x, torch.tensor(0.05), 0, spec), fake_quant(x, torch.full((4,), 0.05), 0, spec))


def test_bad_broadcast_qparams_input():
    x, spec = data((4, 5)), QuantSpec(8)
    expect(TypeError, "spec", broadcast_qparams, x, 0.1, 0, "int8")
    expect(ValueError, "dtype", broadcast_qparams, x, 0.1, 0, spec, dtype=torch.float16)
    expect(TypeError, "scale must be a number", broadcast_qparams, x, "0.1", 0, spec)
    expect(TypeError, "scale must be a number", broadcast_qparams, x, True, 0, spec)
    expect(TypeError, "zero_point must be real", broadcast_qparams, x, 0.1, torch.tensor(True), spec)
    expect(TypeError, "scale must be real", broadcast_qparams, x, torch.tensor(0.1 + 0j), 0, spec)
    expect(ValueError, "scale must be finite and > 0", broadcast_qparams, x, float("inf"), 0, spec)
    expect(ValueError, "zero_point contains NaN", broadcast_qparams, x, 0.1, float("nan"), spec)
    expect(ValueError, "zero_point must hold integer values", broadcast_qparams, x, 0.1, 0.5, spec)
    expect(ValueError, "zero_point must lie on the grid", broadcast_qparams, x, 0.1, 128, spec)
    expect(ValueError, "one scale and one zero_point", broadcast_qparams, x, torch.ones(2), 0, spec)
    expect(ValueError, r"zero_point must be 1-d with one value per channel along axis 1 \(5\)",
           broadcast_qparams, x, torch.ones(5), torch.zeros(2, 5), spec.per_channel(1))


def test_lsq_quantizer_module_learns_its_step_size():
    from refimpl.quant.modules import LSQQuantizer

    torch.manual_seed(0)
    x = data((4096,), seed=20)
    for learn_offset in (False, True):
        spec = QuantSpec(3, signed=not learn_offset, symmetric=False)
        quantizer = LSQQuantizer(spec, learn_offset=learn_offset)
        x_in = x + (2.0 if learn_offset else 0.0)
        first = float(((quantizer(x_in) - x_in) ** 2).mean().detach())
        opt = torch.optim.Adam(quantizer.parameters(), lr=0.01)
        for _ in range(200):
            opt.zero_grad()
            loss = ((quantizer(x_in) - x_in) ** 2).mean()
            loss.backward()
            opt.step()
        last = float(((quantizer(x_in) - x_in) ** 2).mean().detach())
        assert last < 0.9 * first, (learn_offset, first, last)
        # the state dict round-trips
        clone = LSQQuantizer(spec, learn_offset=learn_offset)
        clone(x_in)
        clone.load_state_dict(quantizer.state_dict())
        assert torch.equal(clone(x_in), quantizer(x_in))


def test_zero_dim_and_scalar_inputs():
    spec = QuantSpec(8)
    x = torch.tensor(0.33, requires_grad=True)
    y = fake_quant(x, 0.1, 0, spec)
    assert y.shape == () and float(y.detach()) == pytest.approx(0.3)
    y.backward()
    assert float(x.grad) == 1.0
    assert quantize(torch.tensor(-0.26), 0.1, 0, spec).item() == -3
    assert float(dequantize(torch.tensor(5, dtype=torch.int8), 0.1, 0, spec)) == pytest.approx(0.5)

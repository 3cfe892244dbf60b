"""refimpl.quant.ste: the learnable-(scale, zero point) fake quantizer of the white paper's §4.1 and
its straight-through derivatives, against autograd of a straight-through reference, finite
differences of the frozen surrogate, and fake_quant's forward."""

import pytest
import torch

from refimpl.quant import QuantSpec, fake_quant, ste_derivatives, ste_fake_quant

ASYM4 = QuantSpec(4, signed=False, symmetric=False)
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _straight_through(v):
    """round(v) in the forward pass, identity in the backward pass."""
    return v + (torch.round(v) - v).detach()


def _reference(x, s, z, spec, axis):
    """Eq. 7 written with autograd ops, round straight-through, computed in float64."""
    shape = [1] * x.ndim
    if axis is not None:
        shape[axis] = x.shape[axis]
    sb = s.double().reshape(shape)
    zb = _straight_through(z.double()).reshape(shape)
    return sb * (torch.clamp(_straight_through(x.double() / sb) + zb, spec.qmin, spec.qmax) - zb)


def _inputs(dtype, axis, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(6, 9, generator=g, dtype=torch.float64) * 3).to(dtype)
    shape = () if axis is None else (x.shape[axis],)
    s = (torch.rand(shape, generator=g, dtype=torch.float64) * 0.3 + 0.2).float()
    z = torch.full(shape, 6.0)
    # dL/dx_hat, representable in dtype: the incoming gradient is rounded to x's dtype
    w = torch.randn(6, 9, generator=g, dtype=torch.float64).to(dtype).double()
    return x, s, z, w


def _away_from_thresholds(x, s, z, spec, axis, margin=1e-3):
    """True where x/s is not within ``margin`` of a rounding threshold (there the float path of
    the reference may round the other way)."""
    shape = [1] * x.ndim
    if axis is not None:
        shape[axis] = x.shape[axis]
    u = x.double() / s.double().reshape(shape)
    return (u - torch.floor(u) - 0.5).abs() > margin


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_gradients_equal_autograd_of_straight_through_reference(dtype, axis):
    spec = ASYM4 if axis is None else ASYM4.per_channel(axis)
    x, s, z, w = _inputs(dtype, axis)
    keep = _away_from_thresholds(x, s, z, spec, axis)
    assert keep.float().mean() > 0.95
    outs = []
    for fn in (lambda a, b, c: _reference(a, b, c, spec, axis), lambda a, b, c: ste_fake_quant(a, b, c, spec)):
        xa, sa, za = (t.clone().requires_grad_(True) for t in (x, s, z))
        y = fn(xa, sa, za)
        (y.double() * w * keep).sum().backward()
        outs.append((y.detach(), xa.grad, sa.grad, za.grad))
    (y_ref, gx_ref, gs_ref, gz_ref), (y, gx, gs, gz) = outs
    assert y.dtype == dtype and y.shape == x.shape and gx.dtype == dtype
    assert gs.dtype == s.dtype and gs.shape == s.shape and gz.shape == z.shape
    # forward: one rounding to dtype of a value computed in float32/float64
    tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-6, torch.float64: 1e-6}[dtype]
    torch.testing.assert_close(y.double()[keep], y_ref.to(dtype).double()[keep], rtol=tol, atol=tol)
    torch.testing.assert_close(gx.double(), gx_ref.to(dtype).double(), rtol=tol, atol=tol)
    torch.testing.assert_close(gs.double(), gs_ref.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gz.double(), gz_ref.double(), rtol=1e-5, atol=1e-5)
    assert (gz != 0).any() and (gx == 0).any()          # some values were clipped


def _surrogate(x, s, z, spec, residual, code):
    """Eq. 7 with round(u) = u + r, r frozen, and the clamp's active branch frozen (by the clipped
    code, as ste_fake_quant masks): the function whose exact derivatives are the STE's."""
    inside = x + s * residual
    below = torch.full_like(inside, 0.0) + s * (spec.qmin - z)
    above = torch.full_like(inside, 0.0) + s * (spec.qmax - z)
    return torch.where(code < spec.qmin, below, torch.where(code > spec.qmax, above, inside))


def test_gradients_equal_finite_differences_of_the_surrogate():
    spec, s0, z0, h = ASYM4, 0.1, 3.0, 1e-6
    g = torch.Generator().manual_seed(2)
    x = torch.rand(400, generator=g, dtype=torch.float64) * 3.0 - 1.0      # u in [-10, 20]
    u = x / s0
    x = x[(u - torch.floor(u) - 0.5).abs() > 0.05]
    n = x.numel()
    xa = x.clone().requires_grad_()
    sa = torch.full((n,), s0, dtype=torch.float64, requires_grad=True)   # one (s, z) per element:
    za = torch.full((n,), z0, dtype=torch.float64, requires_grad=True)   # elementwise derivatives
    ste_fake_quant(xa, sa, za, spec.per_channel(0)).sum().backward()
    residual = torch.round(x / s0) - x / s0
    code = torch.round(x / s0) + z0

    def f(a, s, z):
        return _surrogate(a, s, z, spec, residual, code)

    fd = {"x": (f(x + h, s0, z0) - f(x - h, s0, z0)) / (2 * h),
          "scale": (f(x, s0 + h, z0) - f(x, s0 - h, z0)) / (2 * h),
          "zero_point": (f(x, s0, z0 + h) - f(x, s0, z0 - h)) / (2 * h)}
    assert (code < spec.qmin).sum() > 10 and (code > spec.qmax).sum() > 10
    torch.testing.assert_close(xa.grad, fd["x"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sa.grad, fd["scale"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(za.grad, fd["zero_point"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("axis", [None, 1])
def test_forward_equals_fake_quant_in_float32(axis):
    # integer zero point: the same codes and the same float32 product as fake_quant, bit for bit
    spec = ASYM4 if axis is None else ASYM4.per_channel(axis)
    x, s, z, _ = _inputs(torch.float32, axis, seed=3)
    assert torch.equal(ste_fake_quant(x, s, z, spec), fake_quant(x, s, z.int(), spec))


def test_zero_point_is_rounded_and_clamped_in_the_forward_pass():
    x, s, _, _ = _inputs(torch.float32, None, seed=4)
    a = ste_fake_quant(x, s, torch.tensor(5.4), ASYM4)
    assert torch.equal(a, ste_fake_quant(x, s, torch.tensor(5.0), ASYM4))
    assert torch.equal(ste_fake_quant(x, s, torch.tensor(40.0), ASYM4), ste_fake_quant(x, s, torch.tensor(15.0), ASYM4))


def test_grad_scale_scales_the_parameter_gradients_only():
    x, s, z, w = _inputs(torch.float64, 0, seed=5)
    grads = []
    for gs in (1.0, 0.25):
        xa, sa, za = (t.clone().requires_grad_(True) for t in (x, s, z))
        (ste_fake_quant(xa, sa, za, ASYM4.per_channel(0), grad_scale=gs) * w).sum().backward()
        grads.append((xa.grad, sa.grad, za.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.equal(grads[0][1] * 0.25, grads[1][1]) and torch.equal(grads[0][2] * 0.25, grads[1][2])


def test_no_zero_point_gradient_when_it_is_not_learned():
    x, s, z, w = _inputs(torch.float32, None, seed=6)
    sa = s.clone().requires_grad_()
    (ste_fake_quant(x, sa, z, ASYM4) * w).sum().backward()
    assert sa.grad is not None and z.grad is None


def test_ste_derivatives_table():
    # the three regions by hand: s = 0.5, z = 2, grid [0, 15]; u = x/s
    u = torch.tensor([-4.0, 1.4, 14.0], dtype=torch.float64)
    s, z = torch.tensor(0.5, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    v = u + z
    inside, d_s, d_z = ste_derivatives(u, torch.round(u), v < 0, v > 15, s, z, 0, 15)
    assert inside.tolist() == [False, True, False]
    torch.testing.assert_close(d_s, torch.tensor([0 - 2, 1 - 1.4, 15 - 2], dtype=torch.float64))
    assert d_z.tolist() == [-0.5, 0.0, -0.5]
    _, none_s, none_z = ste_derivatives(u, torch.round(u), v < 0, v > 15, s, z, 0, 15,
                                        need_scale=False, need_zero_point=False)
    assert none_s is None and none_z is None


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ste_fake_quant([1.0], torch.tensor(0.1), torch.tensor(0.0), ASYM4), TypeError, "x"),
    (lambda: ste_fake_quant(torch.ones(3), torch.tensor(0.1), torch.tensor(0.0), "uint4"), TypeError, "spec"),
    (lambda: ste_fake_quant(torch.ones(3), 0.1, torch.tensor(0.0), ASYM4), TypeError, "scale"),
    (lambda: ste_fake_quant(torch.ones(3), torch.tensor(0.1), 0, ASYM4), TypeError, "zero_point"),
    (lambda: ste_fake_quant(torch.ones(2, 3), torch.ones(2), torch.zeros(2), ASYM4), ValueError, "scale"),
    (lambda: ste_fake_quant(torch.ones(2, 3), torch.ones(3), torch.zeros(2), ASYM4.per_channel(1)), ValueError,
     "zero_point"),
    (lambda: ste_fake_quant(torch.ones(2, 3), torch.ones(3), torch.zeros(3), ASYM4.per_channel(2)), ValueError,
     "spec.axis"),
    (lambda: ste_fake_quant(torch.ones(3), torch.tensor(0.1), torch.tensor(0.0), ASYM4, grad_scale=0.0),
     ValueError, "grad_scale"),
    (lambda: ste_derivatives(torch.ones(3, dtype=torch.int32), torch.ones(3), torch.ones(3) > 0,
                             torch.ones(3) > 0, 1.0, 0.0, 0, 15), TypeError, "u"),
    (lambda: ste_derivatives(torch.ones(3), torch.ones(3), torch.ones(3), torch.ones(3) > 0, 1.0, 0.0, 0, 15),
     TypeError, "below"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()

"""DSQ (Gong et al. 2019): the soft quantizer against a direct NumPy reading of its definition,
its limits and gradients, the hard quantizer, and the 'dsq' quantizer kind in a model."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from refimpl.qmodel import QuantConfig, calibrate, quantize_model, set_trainable
from refimpl.qmodel.control import act_quantizers, weight_quantizers
from refimpl.quant import dsq, dsq_hard, dsq_phi, dsq_ste


def _numpy_dsq(x, lo, up, alpha, bits, levels=None):
    """Q_S read element by element from the definition (issue 14 / ricky40403/DSQ)."""
    n = (2 ** bits if levels is None else levels) - 1
    d = (up - lo) / n
    s = 1.0 / (1.0 - alpha)
    k = math.log(2.0 / alpha - 1.0) / d
    out = []
    for v in np.asarray(x, dtype=np.float64).ravel():
        if v < lo:
            out.append(lo)
        elif v > up:
            out.append(up)
        else:
            i = min(int(math.floor((v - lo) / d)), n - 1)
            m = lo + (i + 0.5) * d
            phi = s * math.tanh(k * (v - m))
            out.append(lo + d * (i + (phi + 1) / 2))
    return np.array(out)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("alpha", [0.05, 0.2, 0.5, 0.9])
def test_soft_quantizer_matches_a_direct_reading(bits, alpha):
    g = torch.Generator().manual_seed(bits)
    x = torch.rand(200, generator=g, dtype=torch.float64) * 3.0 - 1.7
    lo, up = -1.1, 0.9
    got = dsq(x, torch.tensor(lo, dtype=torch.float64), torch.tensor(up, dtype=torch.float64),
              torch.tensor(alpha, dtype=torch.float64), bits)
    np.testing.assert_allclose(got.numpy(), _numpy_dsq(x.numpy(), lo, up, alpha, bits), rtol=0, atol=1e-12)


@pytest.mark.parametrize("alpha", [1e-3, 0.2, 0.5, 0.99])
def test_phi_reaches_plus_minus_one_at_the_interval_ends(alpha):
    lo, up, bits = -0.5, 1.0, 3
    d = (up - lo) / 7
    # tanh(k d / 2) = 1 - alpha with k = log(2/alpha - 1)/d, by hand
    assert math.tanh(math.log(2 / alpha - 1) / 2) == pytest.approx(1 - alpha, rel=1e-12)
    eps = 1e-9
    for i in range(7):
        left, right = lo + i * d, lo + (i + 1) * d
        x = torch.tensor([left + eps, right - eps, left + d / 2], dtype=torch.float64)
        phi = dsq_phi(x, lo, up, alpha, bits)
        np.testing.assert_allclose(phi.numpy(), [-1.0, 1.0, 0.0], atol=1e-6)
    # so Q_S is continuous and on the grid at every interval boundary
    b = torch.tensor([lo + i * d for i in range(1, 7)], dtype=torch.float64)
    for shift in (-1e-10, 1e-10):
        np.testing.assert_allclose(dsq(b + shift, lo, up, alpha, bits).numpy(), b.numpy(), atol=1e-7)


def test_forward_approaches_the_hard_quantizer_as_alpha_goes_to_zero():
    # a fine grid (step 1e-5), much finer than the tanh's width D/log(2/a) for the alphas below
    x = torch.linspace(-1.2, 1.2, 240_001, dtype=torch.float64)
    lo, up = torch.tensor(-1.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    hard = dsq_hard(x, lo, up, 2)
    alphas = (0.5, 0.2, 0.05, 1e-3, 1e-6, 1e-12, 1e-50)
    errs = [float((dsq(x, lo, up, a, 2) - hard).abs().mean()) for a in alphas]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    # the rate, by hand: k = log(2/a)/D as a -> 0, and the integral of |tanh(kt) - sign(t)| over
    # one interval is 2 ln(2)/k, so mean |Q_S - round| = (D/2)(2 ln 2/log(2/a)) x (share of x in [l, u])
    d, share = 2 / 3, float(((x >= -1) & (x <= 1)).double().mean())
    for a, e in zip(alphas[3:], errs[3:]):
        assert e == pytest.approx(d * math.log(2) * share / math.log(2 / a), rel=0.05)
    # pointwise: away from the centres (where round jumps), Q_S reaches the hard value
    centres = -1 + (torch.arange(3, dtype=torch.float64) + 0.5) * d
    far = (x[:, None] - centres).abs().min(dim=1).values > d / 8
    assert float((dsq(x, lo, up, 1e-200, 2) - hard)[far].abs().max()) < 1e-12
    # at alpha = 0.9 the soft curve is far from the staircase but still monotone
    soft = dsq(torch.sort(x).values, lo, up, 0.9, 2)
    assert float((soft[1:] - soft[:-1]).min()) > -1e-12      # rounding at the interval ends


def test_hard_quantizer_grid_by_hand():
    x = torch.tensor([-2.0, -1.0, -0.7, -0.6, -0.2, 0.1, 0.4, 0.7, 1.0, 5.0])
    # 2 bits on [-1, 1]: step 2/3, levels -1, -1/3, 1/3, 1
    want = torch.tensor([-1.0, -1.0, -1.0, -1 / 3, -1 / 3, 1 / 3, 1 / 3, 1.0, 1.0, 1.0])
    torch.testing.assert_close(dsq_hard(x, -1.0, 1.0, 2), want)
    # 1 bit: the two ends
    torch.testing.assert_close(dsq_hard(x, -1.0, 1.0, 1), torch.where(x < 0, -1.0, 1.0))
    # per-channel range broadcasting, (C, 1)
    lo, up = torch.tensor([[0.0], [-4.0]]), torch.tensor([[3.0], [4.0]])
    xx = torch.tensor([[0.4, 1.6, 2.9], [-3.0, 0.1, 3.5]])
    torch.testing.assert_close(dsq_hard(xx, lo, up, 2), torch.tensor([[0.0, 2.0, 3.0], [-4.0, 4 / 3, 4.0]]))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_narrow_grid_matches_the_reading_and_finite_differences(bits):
    """levels = 2^b - 1 (a narrow-range grid): the same definition with one interval fewer."""
    g = torch.Generator().manual_seed(bits)
    levels = 2 ** bits - 1
    x = torch.rand(200, generator=g, dtype=torch.float64) * 3.0 - 1.7
    got = dsq(x, -1.1, 0.9, 0.3, bits, levels=levels)
    np.testing.assert_allclose(got.numpy(), _numpy_dsq(x.numpy(), -1.1, 0.9, 0.3, bits, levels), rtol=0, atol=1e-12)
    d = 2.0 / (levels - 1)
    i = torch.randint(0, levels - 1, (10,), generator=g).double()
    x = (-1.0 + (i + 0.2 + 0.6 * torch.rand(10, generator=g, dtype=torch.float64)) * d).requires_grad_(True)
    lo = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    up = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    al = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c, e: dsq(a, b, c, e, bits, levels=levels), (x, lo, up, al),
                                    eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_gradients_match_finite_differences(bits):
    g = torch.Generator().manual_seed(1)
    n = 2 ** bits - 1
    lo0, up0 = -0.8, 1.1
    d = (up0 - lo0) / n
    # points away from interval boundaries (where floor jumps) and from l and u
    i = torch.randint(0, n, (12,), generator=g).double()
    x = (lo0 + (i + 0.15 + 0.7 * torch.rand(12, generator=g, dtype=torch.float64)) * d)
    x = torch.cat([x, torch.tensor([-1.5, 1.7], dtype=torch.float64)])   # one below l, one above u
    x.requires_grad_(True)
    lo = torch.tensor(lo0, dtype=torch.float64, requires_grad=True)
    up = torch.tensor(up0, dtype=torch.float64, requires_grad=True)
    al = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c, e: dsq(a, b, c, e, bits), (x, lo, up, al), eps=1e-7, atol=1e-6)
    # by hand: outside [l, u] the output is l or u, so d/dl = 1 below, d/du = 1 above, and no x gradient
    out = dsq(x, lo, up, al, bits)
    gx, gl, gu, ga = torch.autograd.grad(out[-2], (x, lo, up, al), retain_graph=True)
    assert float(gl) == 1.0 and float(gu) == 0.0 and float(gx.abs().sum()) == 0.0 and float(ga) == 0.0
    gx, gl, gu, ga = torch.autograd.grad(out[-1], (x, lo, up, al))
    assert float(gl) == 0.0 and float(gu) == 1.0 and float(gx.abs().sum()) == 0.0 and float(ga) == 0.0


def test_alpha_gradient_by_a_central_difference_of_the_numpy_reading():
    x = np.array([-0.31, 0.05, 0.52])
    al = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    dsq(torch.from_numpy(x), -1.0, 1.0, al, 2).sum().backward()
    h = 1e-6
    fd = (_numpy_dsq(x, -1.0, 1.0, 0.25 + h, 2).sum() - _numpy_dsq(x, -1.0, 1.0, 0.25 - h, 2).sum()) / (2 * h)
    assert float(al.grad) == pytest.approx(fd, rel=1e-6)
    assert abs(fd) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype):
    x = torch.linspace(-1.3, 1.3, 41).to(dtype)
    ref = dsq(x.double(), -1.0, 1.0, 0.2, 3)
    for f in (lambda v: dsq(v, -1.0, 1.0, 0.2, 3), lambda v: dsq_hard(v, -1.0, 1.0, 3),
              lambda v: dsq_phi(v, -1.0, 1.0, 0.2, 3)):
        assert f(x).dtype == dtype
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype, 1e-6)
    torch.testing.assert_close(dsq(x, -1.0, 1.0, 0.2, 3).double(), dsq(x.double(), -1.0, 1.0, 0.2, 3),
                               atol=tol, rtol=0)
    assert ref.dtype == torch.float64


def test_errors_name_the_parameter():
    x = torch.randn(10)
    for a in (0.0, 1.0, -0.1, 1.5, torch.tensor([0.2, 1.0])):
        with pytest.raises(ValueError, match="alpha"):
            dsq(x, -1.0, 1.0, a, 2)
    for lo, up in ((1.0, 1.0), (1.0, -1.0), (torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0]))):
        with pytest.raises(ValueError, match="lower"):
            dsq(x, lo, up, 0.2, 2)
        with pytest.raises(ValueError, match="lower"):
            dsq_hard(x, lo, up, 2)
    for b in (0, 9):
        with pytest.raises(ValueError, match="bits"):
            dsq(x, -1.0, 1.0, 0.2, b)
    with pytest.raises(TypeError, match="bits"):
        dsq_hard(x, -1.0, 1.0, 2.0)
    with pytest.raises(TypeError, match="x"):
        dsq(x.int(), -1.0, 1.0, 0.2, 2)
    with pytest.raises(TypeError, match="alpha"):
        dsq(x, -1.0, 1.0, "0.2", 2)


# --------------------------------------------------------------------------------------------
# The 'dsq' quantizer kind
# --------------------------------------------------------------------------------------------
def _tiny(seed=0):
    torch.manual_seed(seed)
    fp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return fp, x, y


def _dsq_model(fp, x, **cfg):
    q = quantize_model(fp, QuantConfig(weight_bits=3, act_bits=3, **cfg))
    calibrate(q, x)
    return q


@pytest.mark.parametrize("per_channel", [False, True])
def test_kind_initialises_from_the_calibrated_grid(per_channel):
    fp, x, _ = _tiny()
    q = _dsq_model(fp, x, weight_per_channel=per_channel)
    quants = list(weight_quantizers(q).values()) + list(act_quantizers(q).values())
    before = [(m.scale.clone(), m.zero_point.clone()) for m in quants]
    params = set_trainable(q, "dsq")
    assert len(params) == 3 * len(quants) == 15
    for m, (s, z) in zip(quants, before):
        torch.testing.assert_close(m.lower.detach(), (m.spec.qmin - z) * s)
        torch.testing.assert_close(m.upper.detach(), (m.spec.qmax - z) * s)
        assert float(m.alpha.detach()) == pytest.approx(0.2)
        torch.testing.assert_close(m.export()["scale"], s)
    # eval mode: the hard quantizer, which on the calibrated grid is the fixed fake quantizer,
    # except at ties (w/scale exactly half-way, e.g. the minimum weight on minmax's symmetric grid),
    # where floating-point rounding of (w - l)/D decides
    q.eval()
    plain = _dsq_model(fp, x, weight_per_channel=per_channel)
    for name, layer in weight_quantizers(plain).items():
        w = plain.get_submodule(name).weight.detach()
        got, want = weight_quantizers(q)[name](w), layer(w)
        s, _ = layer.qparams_like(w)
        v = w / s
        tie = ((v - torch.floor(v)) - 0.5).abs() < 1e-4
        torch.testing.assert_close(got[~tie], want[~tie])
        assert int(tie.sum()) < w.numel() // 5
    h = torch.randn(500, 16) * 2
    for name, aq in act_quantizers(plain).items():
        torch.testing.assert_close(act_quantizers(q)[name](h), aq(h))


def test_kind_trains_and_uses_the_hard_quantizer_in_eval():
    fp, x, y = _tiny()
    q = _dsq_model(fp, x, weight_per_channel=True)
    params = set_trainable(q, "dsq")
    opt = torch.optim.Adam(list(q.parameters()), lr=1e-2)
    q.train()
    losses = []
    for _ in range(25):
        loss = nn.functional.cross_entropy(q(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    q(x)            # a step may leave (0, 1); the next training forward projects alpha back
    alphas = [float(p.detach()) for n, p in q.named_parameters() if n.endswith("alpha")]
    assert len(alphas) == 5 and any(abs(a - 0.2) > 1e-3 for a in alphas)
    assert all(0.99e-4 <= a <= 1 - 0.99e-4 for a in alphas), alphas
    # every learned tensor received a gradient
    assert all(p.grad is not None for p in params)
    # eval: the hard quantizer; training: the soft one, which differs from it
    wq = q.get_submodule("0").weight_quantizer
    w = q.get_submodule("0").weight
    lo, up = wq.lower.detach()[:, None], wq.upper.detach()[:, None]
    q.eval()
    torch.testing.assert_close(wq(w), dsq_hard(w, lo, up, 3))
    q.train()
    torch.testing.assert_close(wq(w), dsq(w, lo, up, wq.alpha.detach(), 3))
    assert not torch.allclose(wq(w), dsq_hard(w, lo, up, 3))


def test_kind_round_trips_through_state_dict():
    fp, x, y = _tiny()
    q = _dsq_model(fp, x)
    set_trainable(q, "dsq")
    opt = torch.optim.SGD(list(q.parameters()), lr=0.05)
    q.train()
    for _ in range(3):
        loss = nn.functional.cross_entropy(q(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sd = q.state_dict()
    assert any(k.endswith(".alpha") for k in sd) and any(k.endswith(".lower") for k in sd)
    fresh = _dsq_model(_tiny(seed=1)[0], x)       # other weights, other ranges
    set_trainable(fresh, "dsq")
    assert not all(torch.equal(v, sd[k]) for k, v in fresh.state_dict().items() if k.endswith((".lower", ".alpha")))
    fresh.load_state_dict(sd)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k
    for mode in (True, False):
        q.train(mode)
        fresh.train(mode)
        assert torch.equal(q(x), fresh(x))


def test_leaving_the_kind_keeps_the_learned_grid():
    fp, x, y = _tiny()
    q = _dsq_model(fp, x)
    set_trainable(q, "dsq")
    opt = torch.optim.Adam(list(q.parameters()), lr=1e-2)
    q.train()       # calibrate leaves eval mode, where the hard quantizer passes no gradient to x
    for _ in range(5):
        loss = nn.functional.cross_entropy(q(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    aq = act_quantizers(q)["input"]
    lo, up = aq.lower.detach().clone(), aq.upper.detach().clone()
    grid = aq.export()
    torch.testing.assert_close(grid["scale"], (up - lo) / 7)
    assert set_trainable(q, "dsq") is not None and aq.lower is not None      # a second call keeps them
    assert torch.equal(aq.lower.detach(), lo)
    assert set_trainable(q, "fixed") == []
    assert not hasattr(aq, "alpha") and not hasattr(aq, "lower")
    torch.testing.assert_close(aq.scale, (up - lo) / 7)
    step = (up - lo) / 7
    z = aq.spec.qmin - lo / step
    torch.testing.assert_close(aq.zero_point, torch.round(z).clamp(aq.spec.qmin, aq.spec.qmax))
    assert float((z - torch.round(z)).abs()) > 1e-4       # training moved l off the integer grid
    # the fixed grid is the learned one with l moved to the nearest multiple of the step
    h = torch.linspace(-4, 4, 101)
    lo_r = (aq.spec.qmin - aq.zero_point) * step
    torch.testing.assert_close(aq(h), dsq_hard(h, lo_r, lo_r + 7 * step, 3), atol=1e-5, rtol=0)


def test_kind_on_a_narrow_range_grid():
    """TensorRT's weights [-(2^(b-1) - 1), 2^(b-1) - 1]: 2^b - 1 levels from l to u; the hard grid
    DSQ starts from is the calibrated one."""
    fp, x, _ = _tiny()
    q = _dsq_model(fp, x, weight_narrow_range=True)
    w = {n: q.get_submodule(n).weight.detach() for n in weight_quantizers(q)}
    fixed = {n: wq(w[n]) for n, wq in weight_quantizers(q).items()}
    set_trainable(q, "dsq", acts=False)
    q.eval()
    for n, wq in weight_quantizers(q).items():
        assert wq.spec.num_levels == 7
        torch.testing.assert_close(wq(w[n]), fixed[n], atol=1e-6, rtol=0)
        torch.testing.assert_close(wq.export()["scale"], (wq.upper - wq.lower).detach() / 6)
    # levels=2^b is the paper's grid; fewer levels widen the step
    t = torch.linspace(-1.5, 1.5, 301, dtype=torch.float64)
    assert torch.equal(dsq(t, -1.0, 1.0, 0.2, 3), dsq(t, -1.0, 1.0, 0.2, 3, levels=8))
    assert len(torch.unique(dsq_hard(t, -1.0, 1.0, 3, levels=7))) == 7
    with pytest.raises(ValueError, match="levels"):
        dsq(t, -1.0, 1.0, 0.2, 3, levels=9)


def test_dsq_ste_forward_is_hard_and_backward_is_soft():
    gen = torch.Generator().manual_seed(3)
    x = (torch.rand(200, generator=gen, dtype=torch.float64) * 3 - 1.5).requires_grad_()
    lo = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    up = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
    al = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    out = dsq_ste(x, lo, up, al, 3)
    torch.testing.assert_close(out, dsq_hard(x, lo, up, 3), rtol=0, atol=1e-15)
    g = torch.randn(200, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(out, (x, lo, up, al), g)
    soft = torch.autograd.grad(dsq(x, lo, up, al, 3), (x, lo, up, al), g)
    for a, b in zip(grads, soft):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_kind_hard_forward_option():
    fp, x, y = _tiny()
    q = _dsq_model(fp, x, weight_per_channel=True)
    set_trainable(q, "dsq")
    wq = q.get_submodule("0").weight_quantizer
    assert wq.hard_forward is False
    wq.set_option("hard_forward", True)
    w = q.get_submodule("0").weight
    lo, up = wq.lower.detach()[:, None], wq.upper.detach()[:, None]
    q.train()
    torch.testing.assert_close(wq(w), dsq_hard(w, lo, up, 3))
    wq(w).sum().backward()
    assert wq.alpha.grad is not None and wq.alpha.grad.abs().item() > 0


def test_kind_alpha_max_option_bounds_alpha():
    fp, x, y = _tiny()
    q = _dsq_model(fp, x, weight_per_channel=True)
    set_trainable(q, "dsq")
    wq = q.get_submodule("0").weight_quantizer
    with pytest.raises(ValueError, match=r"alpha_max must lie in \(0.0001, 1\)"):
        wq.set_option("alpha_max", 1.5)
    assert wq.alpha_max == pytest.approx(1 - 1e-4)
    wq.set_option("alpha_max", 0.1)
    q.train()
    q(x)
    assert wq.alpha.item() == pytest.approx(0.1)


def _autograd_reading(x, lo, up, al, bits):
    """Q_S written as plain torch ops, differentiated by autograd (the reference for the
    hand-written backward)."""
    n = 2 ** bits - 1
    delta = (up - lo) / n
    xc = torch.minimum(torch.maximum(x, lo.detach()), up.detach())
    i = torch.floor((xc - lo) / delta).clamp(0, n - 1).detach()
    m = lo + (i + 0.5) * delta
    phi = torch.tanh(torch.log(2 / al - 1) / delta * (xc - m)) / (1 - al)
    inside = lo + delta * (i + (phi + 1) / 2)
    return torch.where(x < lo, lo.expand_as(inside), torch.where(x > up, up.expand_as(inside), inside))


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("per_channel", [False, True])
def test_backward_equals_autograd_through_the_definition(bits, per_channel):
    gen = torch.Generator().manual_seed(bits)
    x = (torch.randn(3, 50, generator=gen, dtype=torch.float64) * 1.2).requires_grad_()
    shape = (3, 1) if per_channel else ()
    lo = (-1.0 - 0.1 * torch.rand(shape, generator=gen, dtype=torch.float64)).requires_grad_()
    up = (0.9 + 0.2 * torch.rand(shape, generator=gen, dtype=torch.float64)).requires_grad_()
    al = torch.tensor(0.27, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 50, generator=gen, dtype=torch.float64)
    ours = torch.autograd.grad(dsq(x, lo, up, al, bits), (x, lo, up, al), g)
    ref = torch.autograd.grad(_autograd_reading(x, lo, up, al, bits), (x, lo, up, al), g)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dsq(x, lo, up, al, bits), _autograd_reading(x, lo, up, al, bits), rtol=1e-14, atol=1e-15)

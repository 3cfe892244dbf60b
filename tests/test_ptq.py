"""refimpl.ptq: CLE, high-bias absorption and bias correction against brute force and Monte Carlo."""
import copy
import math

import pytest
import torch
from torch import nn

from refimpl.calib import minmax
from refimpl.fold import bn_statistics, fold_all_bn
from refimpl.models import ResNetCNN
from refimpl.ptq import (bias_correction_analytic, bias_correction_empirical, cross_layer_equalization,
                         find_equalization_chains, high_bias_absorption, relu6_mean, relu_mean, weight_ranges)
from refimpl.quant import QuantSpec, fake_quant, qparams


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models: one thread is as fast as two and does not collapse when another process
    # holds a core (oversubscribed OpenMP threads made convolutions ~25x slower here).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a, model):
    b = model.state_dict()
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _randomize_bn(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(0.5 * torch.randn(c, generator=gen))
                m.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.2)
                # widely spread per-channel scales: the case CLE is for
                m.weight.copy_(torch.exp(1.5 * torch.randn(c, generator=gen)))
                m.bias.copy_(torch.randn(c, generator=gen))
    return model.eval()


def _brute_out_ranges(w):
    return torch.stack([w[o].abs().max() for o in range(w.shape[0])])


def _brute_in_ranges(layer):
    """max |W| over every weight entry that multiplies input channel j, by explicit loops."""
    w = layer.weight.detach()
    groups = getattr(layer, "groups", 1)
    c_in = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    out_per_g, in_per_g = w.shape[0] // groups, w.shape[1]
    r = torch.zeros(c_in, dtype=w.dtype)
    for o in range(w.shape[0]):
        g = o // out_per_g
        for i in range(in_per_g):
            j = g * in_per_g + i
            r[j] = max(r[j], w[o, i].abs().max())
    return r


class _Chain(nn.Module):
    """conv -> BN -> ReLU -> depthwise -> BN -> ReLU -> grouped conv -> ReLU -> 1x1 conv, a
    Linear -> ReLU -> Linear tail (a chain of four conv pairs and one Linear pair)."""

    def __init__(self, dims=2, act=nn.ReLU):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        bn = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
        self.c1, self.b1, self.a1 = conv(3, 8, 3, padding=1, bias=False), bn(8), act()
        self.dw, self.b2, self.a2 = conv(8, 8, 3, padding=1, groups=8, bias=False), bn(8), act()
        self.gc, self.a3 = conv(8, 12, 3, padding=1, groups=4), act()
        self.pw = conv(12, 6, 1)
        self.pool = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool1d(1)
        self.flatten = nn.Flatten()
        self.fc1, self.a4, self.fc2 = nn.Linear(6, 10), act(), nn.Linear(10, 4)

    def forward(self, x):
        y = self.a1(self.b1(self.c1(x)))
        y = self.a2(self.b2(self.dw(y)))
        y = self.pw(self.a3(self.gc(y)))
        return self.fc2(self.a4(self.fc1(self.flatten(self.pool(y)))))


def _chain_model(dims=2, act=nn.ReLU, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = _Chain(dims, act).to(dtype)
    with torch.no_grad():  # spread the per-channel scales of the plain convs too
        for lay in (m.gc, m.pw, m.fc1):
            lay.weight.mul_(torch.exp(torch.randn(lay.weight.shape[0], *([1] * (lay.weight.dim() - 1)), dtype=dtype)))
    return _randomize_bn(m, seed)


# --------------------------------------------------------------------------------------------
# cross-layer equalization
# --------------------------------------------------------------------------------------------
def test_weight_ranges_against_brute_force():
    m = _chain_model()
    for lay in (m.c1, m.dw, m.gc, m.pw, m.fc1):
        torch.testing.assert_close(weight_ranges(lay, "out"), _brute_out_ranges(lay.weight.detach()))
        torch.testing.assert_close(weight_ranges(lay, "in"), _brute_in_ranges(lay))
    with pytest.raises(ValueError, match="side"):
        weight_ranges(m.c1, "both")
    with pytest.raises(TypeError, match="layer"):
        weight_ranges(nn.ReLU())


@pytest.mark.parametrize("dims", [1, 2])
def test_cle_chains_optimality_and_function(dims):
    m = _chain_model(dims)
    before = _state(m)
    cm, rep = cross_layer_equalization(m, return_report=True, tol=1e-10)
    assert _same_state(before, m)
    assert rep.chains == [("c1", "dw", "gc", "pw"), ("fc1", "fc2")]
    assert rep.converged and rep.iterations > 1
    x = torch.randn(5, 3, *([9] * dims), dtype=torch.float64)
    ref = m(x)
    torch.testing.assert_close(cm(x), ref, rtol=1e-11, atol=1e-11)
    for p in rep.pairs:
        l1, l2 = cm.get_submodule(p.layer1), cm.get_submodule(p.layer2)
        r1, r2 = _brute_out_ranges(l1.weight.detach()), _brute_in_ranges(l2)
        # DFQ's optimum: r1_i / R1 == r2_i / R2 for every channel (here even r1 == r2)
        torch.testing.assert_close(r1 / r1.max(), r2 / r2.max(), rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(r1, r2, rtol=1e-8, atol=0)
        torch.testing.assert_close(p.ranges1_after, r1)
        assert p.proportionality_error < 1e-8
    # a single pair is solved in closed form: r1' = r2' = sqrt(r1 r2)
    f = fold_all_bn(m)
    r1, r2 = _brute_out_ranges(f.fc1.weight.detach()), _brute_in_ranges(f.fc2)
    torch.testing.assert_close(_brute_out_ranges(cm.fc1.weight.detach()), torch.sqrt(r1 * r2))
    pair = [p for p in rep.pairs if p.layer1 == "c1"][0]
    assert pair.spread1_before > 5 and pair.spread1_after < pair.spread1_before


def test_cle_float32_function():
    m = _chain_model(dtype=torch.float32)
    cm = cross_layer_equalization(m)
    x = torch.randn(16, 3, 9, 9)
    ref = m(x)
    err = (cm(x) - ref).abs().max() / ref.abs().max()
    assert err < 1e-5
    assert cm.c1.weight.dtype == torch.float32


@pytest.mark.parametrize("dims,shape", [(2, (4, 1, 8, 8)), (1, (4, 1, 40))])
def test_cle_resnet(dims, shape):
    m = _randomize_bn(ResNetCNN(dims=dims, width=8, num_blocks=3).double())
    before = _state(m)
    cm, rep = cross_layer_equalization(m, return_report=True)
    assert _same_state(before, m)
    # the block's conv1 -> relu1 -> conv2 only: every other tensor also feeds a residual add
    assert rep.chains == [(f"blocks.{i}.conv1", f"blocks.{i}.conv2") for i in range(3)]
    assert find_equalization_chains(m) == rep.chains
    x = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(cm(x), m(x), rtol=1e-11, atol=1e-11)
    assert all(p.proportionality_error < 1e-10 for p in rep.pairs)


def test_cle_relu6_replace_and_skip():
    m = _chain_model(act=nn.ReLU6)
    x = torch.randn(6, 3, 9, 9, dtype=torch.float64)
    cm, rep = cross_layer_equalization(m, return_report=True)
    assert rep.relu6_replaced == ["a1", "a2", "a3", "a4"]
    assert all(type(cm.get_submodule(n)) is nn.ReLU for n in rep.relu6_replaced)
    # the function is that of the model with ReLU6 -> ReLU ...
    relu_model = copy.deepcopy(m)
    for n in rep.relu6_replaced:
        setattr(relu_model, n, nn.ReLU())
    torch.testing.assert_close(cm(x), relu_model(x), rtol=1e-11, atol=1e-11)
    # ... which equals the original where no activation exceeds 6 (small inputs) ...
    small = 1e-3 * x
    torch.testing.assert_close(cm(small), m(small), rtol=1e-11, atol=1e-11)
    # ... and differs where one does
    big = 100 * x
    assert not torch.allclose(cm(big), m(big))
    sk, rep_s = cross_layer_equalization(m, relu6="skip", return_report=True)
    assert rep_s.chains == [] and rep_s.relu6_replaced == []
    torch.testing.assert_close(sk(big), m(big), rtol=1e-11, atol=1e-11)
    with pytest.raises(ValueError, match="relu6"):
        cross_layer_equalization(m, relu6="keep")


def test_cle_no_chain_through_shared_tensor_and_errors():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.r, self.b, self.c = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            y = self.r(self.a(x))
            return self.b(y) + self.c(y)  # y feeds two layers: no positive scaling is free

    assert find_equalization_chains(Branch()) == []
    with pytest.raises(ValueError, match="iterations"):
        cross_layer_equalization(Branch(), iterations=0)
    with pytest.raises(ValueError, match="tol"):
        cross_layer_equalization(Branch(), tol=-1)


def test_cle_mobilenetv2():
    models = pytest.importorskip("refimpl.models")
    if not hasattr(models, "MobileNetV2CNN"):
        pytest.skip("MobileNetV2CNN not available")
    m = _randomize_bn(models.MobileNetV2CNN(dims=2, width=8))
    cm, rep = cross_layer_equalization(m, return_report=True)
    n_blocks = len(m.blocks)
    assert rep.chains == [tuple(f"blocks.{i}.{k}_conv" for k in ("expand", "dw", "project"))
                          for i in range(n_blocks)]
    assert len(rep.relu6_replaced) == 2 * n_blocks
    assert all(p.proportionality_error < 1e-4 for p in rep.pairs)
    relu_model = copy.deepcopy(m)
    for n in rep.relu6_replaced:
        parent, _, leaf = n.rpartition(".")
        setattr(relu_model.get_submodule(parent), leaf, nn.ReLU())
    x = torch.randn(4, 1, 8, 8)
    ref = relu_model(x)
    assert (cm(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


# --------------------------------------------------------------------------------------------
# high-bias absorption
# --------------------------------------------------------------------------------------------
class _TwoConv(nn.Module):
    def __init__(self, padding):
        super().__init__()
        self.c1, self.r, self.c2 = nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=padding, groups=2)

    def forward(self, x):
        return self.c2(self.r(self.c1(x)))


@pytest.mark.parametrize("padding", [0, 1])
def test_high_bias_absorption_exact_when_preactivation_above_c(padding):
    torch.manual_seed(0)
    m = _TwoConv(padding).double().eval()
    with torch.no_grad():
        m.c1.bias.copy_(torch.tensor([4.0, -1, 3, 0.5, 6, 2], dtype=torch.float64))
    x = torch.randn(64, 3, 8, 8, dtype=torch.float64)
    z = m.c1(x).detach()
    zmin, std = z.amin((0, 2, 3)), z.std((0, 2, 3))
    # statistics whose beta - 3 gamma is the smallest pre-activation: c <= z everywhere
    stats = {"c1": (zmin + 3 * std, std)}
    before = _state(m)
    hm, new_stats = high_bias_absorption(m, stats, return_report=True)
    assert _same_state(before, m)
    c = torch.clamp(zmin, min=0)
    assert (c > 0).sum() >= 3
    torch.testing.assert_close(hm.c1.bias, m.c1.bias - c)
    torch.testing.assert_close(new_stats["c1"][0], stats["c1"][0] - c)
    y, ref = hm(x), m(x)
    if padding == 0:
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    else:  # exact away from the zero-padded border
        torch.testing.assert_close(y[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], rtol=1e-12, atol=1e-12)
        assert not torch.allclose(y, ref)


def test_high_bias_absorption_on_real_statistics():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 8, 3, bias=False), nn.BatchNorm2d(8, momentum=None), nn.ReLU(),
                      nn.Conv2d(8, 4, 3)).double()
    with torch.no_grad():
        m[1].weight.uniform_(0.2, 1)
        m[1].bias.uniform_(0, 5)  # high biases: most of the mass passes the ReLU
    x = torch.randn(512, 2, 8, 8, dtype=torch.float64)
    m.train()
    with torch.no_grad():
        m(x)
    m.eval()
    stats = bn_statistics(m)
    hm = high_bias_absorption(m, stats)
    assert not torch.equal(hm.get_submodule("0").bias, fold_all_bn(m).get_submodule("0").bias)
    y, ref = hm(x), m(x)
    rel = ((y - ref).abs().mean() / ref.abs().mean()).item()
    assert rel < 1e-3   # only pre-activations below beta - 3 gamma (~0.1 %) change
    with pytest.raises(TypeError, match="bn_stats"):
        high_bias_absorption(m, [1, 2])


# --------------------------------------------------------------------------------------------
# bias correction
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta,gamma", [(0.5, 1.0), (-2.0, 0.7), (3.0, 2.5), (7.0, 0.5), (0.0, 3.0)])
def test_relu_means_against_monte_carlo(beta, gamma):
    gen = torch.Generator().manual_seed(0)
    z = beta + gamma * torch.randn(2_000_000, generator=gen, dtype=torch.float64)
    tol = 4 * gamma / math.sqrt(z.numel())
    b, g = torch.tensor(beta, dtype=torch.float64), torch.tensor(gamma, dtype=torch.float64)
    assert abs(relu_mean(b, g) - z.clamp(min=0).mean()) < tol
    assert abs(relu6_mean(b, g) - z.clamp(0, 6).mean()) < tol
    assert relu_mean(b, torch.zeros_like(g)) == max(beta, 0.0)


def _fq_weight(w, bits=3):
    spec = QuantSpec(bits, axis=0)
    lo, hi = minmax(w.detach(), spec)
    scale, zp = qparams(lo, hi, spec)
    return fake_quant(w, scale, zp, spec)


class _QConv2d(nn.Conv2d):
    """Stand-in for refimpl.qmodel's QuantConv2d: forward with a fake-quantized weight."""

    def quantized_weight(self):
        return _fq_weight(self.weight)

    def forward(self, x):
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class _QLinear(nn.Linear):
    def quantized_weight(self):
        return _fq_weight(self.weight)

    def forward(self, x):
        return nn.functional.linear(x, self.quantized_weight(), self.bias)


def _standin_qmodel(fp, skip=()):
    q = copy.deepcopy(fp)
    for name, mod in q.named_modules():
        if name in skip:
            continue
        if type(mod) is nn.Conv2d:
            mod.__class__ = _QConv2d
        elif type(mod) is nn.Linear:
            mod.__class__ = _QLinear
    return q


class _Gauss(nn.Module):
    """p: a 1x1 conv whose pre-activation on N(0, 1) input is exactly N(beta, gamma^2) per channel."""

    def __init__(self, beta, gamma, act):
        super().__init__()
        c = beta.numel()
        self.p = nn.Conv2d(c, c, 1)
        with torch.no_grad():
            self.p.weight.copy_(torch.diag(gamma).reshape(c, c, 1, 1))
            self.p.bias.copy_(beta)
        self.act = act
        self.conv = nn.Conv2d(c, 5, 3)

    def forward(self, x):
        return self.conv(self.act(self.p(x)))


@pytest.mark.parametrize("act,kind", [(nn.ReLU(), "relu"), (nn.ReLU6(), "relu6"), (nn.Identity(), "none")])
def test_bias_correction_analytic_matches_empirical(act, kind):
    torch.manual_seed(0)
    beta = torch.tensor([0.5, -1.0, 2.0, 6.5], dtype=torch.float64)
    gamma = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=torch.float64)
    fp = _Gauss(beta, gamma, act).double().eval()
    q = _standin_qmodel(fp, skip=("p",))
    before = _state(q)
    qa, corr = bias_correction_analytic(q, {"p": (beta, gamma)}, return_report=True)
    assert _same_state(before, q) and set(corr) == {"conv"}
    # independent expectation: E[x] by Monte Carlo through the real activation, padding 0
    x = torch.randn(4000, 4, 5, 5, dtype=torch.float64)
    ex = act(fp.p(x)).mean((0, 2, 3)).detach()
    dw = (q.conv.quantized_weight() - q.conv.weight).detach()
    expected = (dw.sum((2, 3)) * ex).sum(1)
    assert (expected.abs() > 1e-3).any()  # the correction is not trivially 0
    torch.testing.assert_close(corr["conv"], expected, rtol=0, atol=5e-3 * dw.abs().sum((1, 2, 3)).max().item())
    torch.testing.assert_close(qa.conv.bias, q.conv.bias - corr["conv"])
    # the empirical variants on the same data measure the same quantity
    # (measured directly: the mean of (W~ - W) * input over the valid output positions)
    measured = nn.functional.conv2d(act(fp.p(x)), dw).mean((0, 2, 3)).detach()
    torch.testing.assert_close(measured, expected, rtol=0, atol=5e-3 * dw.abs().sum((1, 2, 3)).max().item())
    for ref in ("same_input", "fp_model"):
        qe, ce = bias_correction_empirical(q, fp, x, batch_size=1000, reference=ref, return_report=True)
        torch.testing.assert_close(ce["conv"], measured, rtol=1e-9, atol=1e-9)
    # the mean output error after analytic correction is small compared to before
    err_before = (q(x) - fp(x)).mean((0, 2, 3)).abs().max()
    err_after = (qa(x) - fp(x)).mean((0, 2, 3)).abs().max()
    assert err_after < 0.1 * err_before


def test_bias_correction_empirical_zeroes_mean_error_per_layer():
    torch.manual_seed(0)
    fp = fold_all_bn(_chain_model(dtype=torch.float32))
    q = _standin_qmodel(fp)
    x = torch.randn(256, 3, 9, 9)
    before, fp_before = _state(q), _state(fp)
    qc = bias_correction_empirical(q, fp, x, batch_size=100)
    assert _same_state(before, q) and _same_state(fp_before, fp)
    layers = ["c1", "dw", "gc", "pw", "fc1", "fc2"]

    def outputs(model):
        got = {}
        hs = [model.get_submodule(n).register_forward_hook(
            lambda _m, _i, o, n=n: got.__setitem__(n, o.detach())) for n in layers]
        model(x)
        for h in hs:
            h.remove()
        return got

    ref, raw, cor = outputs(fp), outputs(q), outputs(qc)
    red = lambda t: [d for d in range(t.dim()) if d != 1]  # noqa: E731
    for n in layers:
        e_raw = (raw[n] - ref[n]).mean(red(ref[n])).abs().max()
        e_cor = (cor[n] - ref[n]).mean(red(ref[n])).abs().max()
        assert e_cor < 1e-5 * max(1.0, ref[n].abs().max().item()), n
        assert e_raw > 10 * e_cor, n
    # same_input: removes the mean weight-quantization error of each layer on its own input
    qs = bias_correction_empirical(q, fp, x, reference="same_input")
    acts = {}
    hs = [qs.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: acts.__setitem__(n, (o - fp.get_submodule(n)(i[0])).detach())) for n in layers]
    qs(x)
    for h in hs:
        h.remove()
    for n in layers:
        assert acts[n].mean(red(acts[n])).abs().max() < 1e-5, n


def test_bias_correction_errors():
    fp = _TwoConv(0)
    with pytest.raises(ValueError, match="quantized layer"):
        bias_correction_analytic(fp, {})
    q = _standin_qmodel(fp)
    with pytest.raises(ValueError, match="reference"):
        bias_correction_empirical(q, fp, torch.randn(2, 3, 8, 8), reference="other")
    with pytest.raises(ValueError, match="fp_model has no"):
        bias_correction_empirical(q, nn.Sequential(), torch.randn(2, 3, 8, 8))


def test_cle_report_rescales_bn_statistics():
    m = _chain_model()
    cm, rep = cross_layer_equalization(m, return_report=True)
    stats = bn_statistics(m)
    new = rep.rescale_bn_statistics(stats)
    f = fold_all_bn(m)
    x = torch.randn(4, 3, 9, 9, dtype=torch.float64)
    for name in ("c1", "dw"):
        got = {}
        for model, key in ((f, "fp"), (cm, "cle")):
            h = model.get_submodule(name).register_forward_hook(lambda _m, _i, o, key=key: got.__setitem__(key, o))
            model(x)
            h.remove()
        s = rep.output_scales[name]
        # the equalized layer's pre-activation is the original one divided by s, channel by channel
        torch.testing.assert_close(got["cle"], got["fp"] / s.reshape(-1, 1, 1), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(new[name][0], stats[name][0] / s)
        torch.testing.assert_close(new[name][1], stats[name][1] / s)


def _trained_like_resnet(seed=0):
    """ResNetCNN whose BN running statistics are those of its own data (BN momentum=None)."""
    torch.manual_seed(seed)
    m = ResNetCNN(dims=2, width=8, num_blocks=2)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.momentum = None
            with torch.no_grad():
                mod.weight.uniform_(0.3, 2)
                mod.bias.uniform_(-1, 1)
    x = torch.randn(256, 1, 8, 8)
    m.train()
    with torch.no_grad():
        m(x)
    return m.eval(), x


def test_bias_correction_with_quantize_model():
    qmodel_mod = pytest.importorskip("refimpl.qmodel")
    m, x = _trained_like_resnet()
    fp, stats = fold_all_bn(m), bn_statistics(m)
    q = qmodel_mod.quantize_model(fp, qmodel_mod.QuantConfig(weight_bits=4, act_bits=8))
    qmodel_mod.calibrate(q, x)
    before = _state(q)
    qa, ca = bias_correction_analytic(q, stats, return_report=True)
    # inputs from conv -> ReLU (through the activation quantizer); not after residual adds
    assert list(ca) == ["blocks.0.conv1", "blocks.0.conv2", "blocks.1.conv2"]
    qe, ce = bias_correction_empirical(q, fp, x, return_report=True)
    assert _same_state(before, q)
    assert set(ce) == set(qmodel_mod.quant_layers(q))
    ref = fp(x)
    mse = {k: (mdl(x) - ref).pow(2).mean().item() for k, mdl in (("q", q), ("analytic", qa), ("empirical", qe))}
    assert mse["analytic"] < mse["q"] and mse["empirical"] < mse["q"]
    # per layer, the corrected model's mean output equals the FP model's on the calibration data
    for name in ce:
        got = {}
        for model, key in ((fp, "fp"), (qe, "q")):
            h = model.get_submodule(name).register_forward_hook(lambda _m, _i, o, key=key: got.__setitem__(key, o))
            model(x)
            h.remove()
        red = [d for d in range(got["fp"].dim()) if d != 1]
        assert (got["q"] - got["fp"]).mean(red).abs().max() < 1e-5, name


def test_bias_correction_empirical_linear_on_sequences():
    """Linear layers on (N, L, features): the channel is the last dim."""
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)).double()
    q = _standin_qmodel(fp)
    x = torch.randn(64, 7, 6, dtype=torch.float64)
    qc = bias_correction_empirical(q, fp, x)
    err = (qc(x) - fp(x)).mean((0, 1))
    assert err.abs().max() < 1e-10
    assert (q(x) - fp(x)).mean((0, 1)).abs().max() > 1e-3

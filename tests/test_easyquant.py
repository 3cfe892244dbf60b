"""refimpl.ptq.easyquant: the batched search against the plain loop (same scales); on one layer,
each step of the search against a brute force over its candidate grid, written here from the
paper's eq. 1 and eq. 4 (and from the released tool's numpy grids and scipy cosine); the cosine
never falls below the max-abs start; the released variant's ranges and KL start; errors,
dtypes, devices."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import cosine as scipy_cosine_distance
from torch import nn

from refimpl.calib import kl_tensorrt
from refimpl.capture import capture_activations
from refimpl.fold import fold_all_bn
from refimpl.models import MobileNetV2CNN, ResNetCNN
from refimpl.ptq import EASYQUANT_VARIANTS, EasyQuantLayer, easyquant, easyquant_config
from refimpl.qmodel import act_quantizers, quant_layers, weight_quantizers
from refimpl.quant import QuantSpec

TOL = 1e-10     # cosines here are float64 sums of the same products: far below any real gap


def _resnet(seed=0):
    torch.manual_seed(seed)
    return ResNetCNN(1, 4, width=4, num_blocks=2, dims=1).eval()


def _mbv2(seed=0):
    torch.manual_seed(seed)
    return MobileNetV2CNN(1, 4, width=4, blocks=((2, 1, 1), (2, 1.5, 2)), dims=1).eval()


def _data(n=24, shape=(1, 12), seed=1):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# batched == loop
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", EASYQUANT_VARIANTS)
@pytest.mark.parametrize("make", [_resnet, _mbv2], ids=["resnet", "mbv2"])
def test_batched_search_equals_the_loop(variant, make):
    model, x = make(), _data()
    kw = dict(variant=variant, n=16, progress=False, return_report=True)
    qb, rb = easyquant(model, x, 4, 4, batched=True, **kw)
    ql, rl = easyquant(model, x, 4, 4, batched=False, **kw)
    assert [r.layer for r in rb] == [r.layer for r in rl]
    for a, b in zip(rb, rl):
        assert torch.equal(a.weight_scale, b.weight_scale), a.layer
        assert a.act_scale == b.act_scale and a.site == b.site, a.layer
    # the search moved scales (else equality proves nothing)
    assert any(bool((r.weight_ratio != 1).any()) for r in rb)
    assert any(r.act_ratio not in (None, 1.0) for r in rb)
    assert torch.equal(qb(x), ql(x))


# --------------------------------------------------------------------------------------------
# one layer: every step of the search reaches the best cosine on its grid
# --------------------------------------------------------------------------------------------
WB = AB = 4


def _q(x, step, qmin, qmax):
    """Eq. 1 with round to nearest: clamp(round(x / step)) * step, dividing as refimpl documents
    (times the float32 reciprocal); float64 result."""
    v = torch.round(x.float() * torch.reciprocal(step.float()))
    return (v.clamp(qmin, qmax) * step.float()).double()


def _outputs(conv, x, sw, sa, relu):
    """(O, Ô) of eq. 4 for a Conv1d: float32 FP32 output, float64 quantized one; both after the
    ReLU when ``relu``."""
    w, b = conv.weight.detach(), conv.bias.detach()
    o = F.conv1d(x, w, b, padding=conv.padding).double()
    xq = _q(x, sa, -2 ** (AB - 1), 2 ** (AB - 1) - 1)                       # signed input site
    wq = _q(w, sw[:, None, None], -(2 ** (WB - 1) - 1), 2 ** (WB - 1) - 1)   # narrow, per channel
    y = F.conv1d(xq, wq, b.double(), padding=conv.padding)
    return (o.relu(), y.relu()) if relu else (o, y)


def _mean_cos(conv, x, sw, sa, relu=False):
    o, y = _outputs(conv, x, sw, sa, relu)
    return float(F.cosine_similarity(o.flatten(1), y.flatten(1), dim=1).mean())


def _layer(seed=3):
    torch.manual_seed(seed)
    return nn.Conv1d(3, 5, 3, padding=1)


def _x1(seed=4):
    return torch.randn(16, 3, 10, generator=torch.Generator().manual_seed(seed))


def _paper_grid(start, n, alpha=0.5, beta=2.0):
    return [float(v) for v in (start.double() / torch.linspace(alpha, beta, n, dtype=torch.float64)).float()]


def test_paper_search_on_one_layer_reaches_the_best_of_each_grid():
    conv, x, n = _layer(), _x1(), 15
    qm, (rep,) = easyquant(nn.Sequential(conv), x, WB, AB, n=n, progress=False, return_report=True)
    w = conv.weight.detach()
    w0 = (w.abs().amax(dim=(1, 2)) / (2 ** (WB - 1) - 1)).float()            # max-abs start
    a0 = (x.abs().max() / (2 ** (AB - 1) - 1)).float()
    torch.testing.assert_close(rep.weight_scale * rep.weight_ratio.float(), w0, rtol=1e-6, atol=0)
    assert rep.site == "input" and abs(rep.act_ratio * rep.act_scale - float(a0)) <= 1e-6 * float(a0)
    final, a = rep.weight_scale, torch.tensor(rep.act_scale)
    # weights first, channel by channel, the activation scale at its start (§3.2)
    for k in range(len(w0)):
        trial = torch.cat([final[:k], w0[k:]])
        best = max(_mean_cos(conv, x, torch.cat([trial[:k], torch.tensor([s]), trial[k + 1:]]), a0)
                   for s in [float(w0[k])] + _paper_grid(w0[k], n))
        assert _mean_cos(conv, x, torch.cat([final[:k + 1], w0[k + 1:]]), a0) >= best - TOL, k
    # then the activation scale with the final weights
    best = max(_mean_cos(conv, x, final, torch.tensor(s)) for s in [float(a0)] + _paper_grid(a0, n))
    assert _mean_cos(conv, x, final, a) >= best - TOL
    assert abs(rep.cos_final - _mean_cos(conv, x, final, a)) < 1e-9
    assert abs(rep.cos_init - _mean_cos(conv, x, w0, a0)) < 1e-9
    assert rep.cos_final > rep.cos_init + 1e-4
    # the model quantizes with the searched scales, rounding to nearest
    wq = quant_layers(qm)["0"].quantized_weight()
    assert torch.equal(wq.double(), _q(w, final[:, None, None], -7, 7))


def test_rounds_reach_a_point_no_single_scale_on_the_grid_improves():
    conv, x, n = _layer(5), _x1(6), 12
    kw = dict(n=n, progress=False, return_report=True)
    _, (r6,) = easyquant(nn.Sequential(conv), x, WB, AB, rounds=6, **kw)
    _, (r7,) = easyquant(nn.Sequential(conv), x, WB, AB, rounds=7, **kw)
    assert torch.equal(r6.weight_scale, r7.weight_scale) and r6.act_scale == r7.act_scale   # a fixed point
    w0 = r6.weight_scale * r6.weight_ratio.float()
    a0 = torch.tensor(r6.act_scale * r6.act_ratio)
    sw, sa = r6.weight_scale, torch.tensor(r6.act_scale)
    here = _mean_cos(conv, x, sw, sa)
    for k in range(len(sw)):
        for s in _paper_grid(w0[k], n):
            assert _mean_cos(conv, x, torch.cat([sw[:k], torch.tensor([s]), sw[k + 1:]]), sa) <= here + TOL
    for s in _paper_grid(a0, n):
        assert _mean_cos(conv, x, sw, torch.tensor(s)) <= here + TOL


def _released_cos(o, y):
    """The released tool's cosSimilatity on two numpy vectors (tools/scale_fine_tuning.py)."""
    if np.sum(np.abs(o)) == 0 or np.sum(np.abs(y)) == 0:
        o, y = o + 1e-5, y + 1e-5
    return 1 - scipy_cosine_distance(o, y)


def test_released_search_on_one_layer_follows_the_released_tool():
    torch.manual_seed(7)
    conv, x, n = nn.Conv1d(3, 4, 3, padding=1), _x1(8), 8
    x[x.abs() < 0.4] = 0.0          # a spike of zeros, as after a ReLU: the KL start leaves it out
    qm, (rep,) = easyquant(nn.Sequential(conv, nn.ReLU()), x, WB, AB, variant="released", n=n,
                           progress=False, return_report=True)
    w0 = (conv.weight.detach().abs().amax(dim=(1, 2)) / (2 ** (WB - 1) - 1)).float()
    spec = QuantSpec(AB, signed=True, symmetric=True)
    a0 = (kl_tensorrt(x, spec, ignore_zeros=True)[1] / (2 ** (AB - 1) - 1)).float()       # the KL start
    assert abs(rep.act_ratio * rep.act_scale - float(a0)) <= 1e-6 * float(a0)
    final = rep.weight_scale
    # weights: each channel's own feature map after the ReLU, candidates [S] + linspace(1, S, n)[1:-1]
    for k in range(len(w0)):
        mult = 1.0 / float(w0[k])
        grid = [float(w0[k])] + [float(np.float32(1.0 / m)) for m in np.linspace(1, mult, n)[1:-1]]

        def channel_cos(s):
            sw = w0.clone()
            sw[k] = s
            o, y = _outputs(conv, x, sw, a0, relu=True)
            return np.mean([_released_cos(o[i, k].numpy(), y[i, k].numpy()) for i in range(len(x))])

        assert min(abs(float(final[k]) / g - 1) for g in grid) < 1e-6          # on its grid
        assert channel_cos(float(final[k])) >= max(channel_cos(s) for s in grid) - TOL
    # activations: whole output after the ReLU, candidates [S] + linspace(0.8 S, S, 2n)[1:-1]
    mult = 1.0 / float(a0)
    grid = [float(a0)] + [float(np.float32(1.0 / m)) for m in np.linspace(0.8 * mult, mult, 2 * n)[1:-1]]

    def whole_cos(s):
        o, y = _outputs(conv, x, final, torch.tensor(s), relu=True)
        return np.mean([_released_cos(o[i].flatten().numpy(), y[i].flatten().numpy()) for i in range(len(x))])

    assert min(abs(rep.act_scale / g - 1) for g in grid) < 1e-6              # on its grid
    assert whole_cos(rep.act_scale) >= max(whole_cos(s) for s in grid) - TOL
    assert 0.8 - 1e-6 <= rep.act_ratio <= 1 + 1e-6
    assert bool((rep.weight_ratio <= 1 + 1e-6).all())


def test_released_candidate_ranges_on_a_network():
    model, x = _mbv2(), _data()
    _, rep = easyquant(model, x, 5, 5, variant="released", n=12, progress=False, return_report=True)
    for r in rep:
        s0 = 1.0 / (r.weight_scale.double() * r.weight_ratio)          # the starting multipliers
        assert bool((r.weight_ratio <= 1 + 1e-6).all()) and bool((r.weight_ratio >= 1 / s0 - 1e-6).all())
        if r.site is not None:
            assert 0.8 - 1e-6 <= r.act_ratio <= 1 + 1e-6
    assert any(bool((r.weight_ratio < 1).any()) for r in rep) and any(r.act_ratio not in (None, 1.0) for r in rep)
    sites = [r.site for r in rep if r.site is not None]
    assert len(sites) == len(set(sites)) and sites[0] == "input"


# --------------------------------------------------------------------------------------------
# networks: never below the max-abs start; the report matches the returned model
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [_resnet, _mbv2], ids=["resnet", "mbv2"])
def test_cosine_never_falls_below_the_max_abs_start(make):
    model, x = make(), _data(40)
    qm, rep = easyquant(model, x, 4, 4, n=20, progress=False, return_report=True)
    assert [r.layer for r in rep] == list(quant_layers(qm))
    assert all(r.cos_final >= r.cos_init - TOL for r in rep)
    assert sum(r.cos_final > r.cos_init + 1e-6 for r in rep) >= len(rep) // 2
    assert all(bool((0.5 - 1e-6 <= r.weight_ratio).all() and (r.weight_ratio <= 2 + 1e-6).all()) for r in rep)
    # each layer's final cosine, recomputed on the returned model: its quantized output against
    # the FP32 (BN-folded) model's, on the same samples
    fp = fold_all_bn(model)
    names = [r.layer for r in rep]
    o = capture_activations(fp, x, names)
    y = capture_activations(qm, x, names)
    for r in rep:
        cos = F.cosine_similarity(o[r.layer].double().flatten(1), y[r.layer].double().flatten(1), dim=1).mean()
        assert abs(float(cos) - r.cos_final) < 1e-5, r.layer


def test_easyquant_config_is_the_papers_grid():
    model = _resnet()
    config = easyquant_config(model, 6, 5)
    qm, rep = easyquant(model, _data(), 6, 5, n=4, progress=False, return_report=True)
    assert all(q.spec == QuantSpec(6, True, True, True, 0) for q in weight_quantizers(qm).values())
    for name, q in act_quantizers(qm).items():
        want = QuantSpec(5, True, True) if q.spec.signed else QuantSpec(4, False, False)
        assert q.spec == want and q.spec.qmax == 15 and float(q.zero_point) == 0, name
    assert dict(config.site_act_bits) == {n: 4 for n, q in act_quantizers(qm).items() if not q.spec.signed}
    assert isinstance(rep[0], EasyQuantLayer)


def test_the_model_is_not_modified_and_the_result_runs():
    model, x = _resnet(), _data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qm = easyquant(model, x, 8, 8, n=8, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not qm.training
    torch.testing.assert_close(qm(x), model(x), atol=0.05, rtol=0.05)


# --------------------------------------------------------------------------------------------
# errors, dtypes, devices
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, name", [
    (dict(weight_bits=1), "weight_bits"), (dict(weight_bits=17), "weight_bits"), (dict(act_bits=0), "act_bits"),
    (dict(alpha=2.0, beta=0.5), "alpha"), (dict(alpha=1.0, beta=1.0), "alpha"), (dict(alpha=-1.0), "alpha"),
    (dict(n=0), "n"), (dict(rounds=0), "rounds"), (dict(variant="ncnn"), "variant"),
    (dict(act_init="mse"), "act_init"), (dict(num_samples=0), "num_samples"),
])
def test_bad_arguments_name_the_parameter(kw, name):
    args = dict(weight_bits=8, act_bits=8)
    args.update({k: kw.pop(k) for k in ("weight_bits", "act_bits") if k in kw})
    with pytest.raises(ValueError, match=name):
        easyquant(_resnet(), _data(), args["weight_bits"], args["act_bits"], progress=False, **kw)


def test_empty_or_wrong_calibration_data():
    with pytest.raises(ValueError, match="calib_data"):
        easyquant(_resnet(), torch.empty(0, 1, 12), progress=False)
    with pytest.raises(ValueError, match="calib_data"):
        easyquant(_resnet(), torch.full((4, 1, 12), float("nan")), progress=False)
    with pytest.raises(TypeError, match="calib_data"):
        easyquant(_resnet(), [[0.0]], progress=False)
    with pytest.raises(TypeError, match="model"):
        easyquant("resnet", _data(), progress=False)
    with pytest.raises(TypeError, match="batched"):
        easyquant(_resnet(), _data(), batched="yes", progress=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_calibration_data_of_any_float_dtype(dtype):
    model, x = _resnet(), _data()
    qm, rep = easyquant(model, x.to(dtype), 6, 6, n=8, progress=False, return_report=True)
    assert all(r.weight_scale.dtype == torch.float32 for r in rep)
    assert qm(x).dtype == torch.float32
    if dtype == torch.float64:      # exactly the float32 data: the same search
        _, ref = easyquant(model, x, 6, 6, n=8, progress=False, return_report=True)
        assert all(torch.equal(a.weight_scale, b.weight_scale) and a.act_scale == b.act_scale for a, b in zip(rep, ref))


def test_a_float64_model_stays_float64():
    model, x = _resnet().double(), _data().double()
    qm = easyquant(model, x, 8, 8, n=8, progress=False)
    assert all(p.dtype == torch.float64 for p in qm.parameters())
    out = qm(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, model(x), atol=0.05, rtol=0.05)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_results_follow_the_models_device(device):
    model, x = _mbv2().to(device), _data()               # data on the CPU, moved to the model
    qm, rep = easyquant(model, x, 6, 6, n=8, progress=False, return_report=True)
    assert {p.device.type for p in qm.parameters()} == {device}
    assert {b.device.type for b in qm.buffers()} == {device}
    assert all(r.weight_scale.device.type == device and r.weight_ratio.device.type == device for r in rep)
    assert qm(x.to(device)).device.type == device


def test_no_device_is_hard_coded():
    import importlib
    source = open(importlib.import_module("refimpl.ptq.easyquant").__file__).read()
    assert '"cpu"' not in source and "'cpu'" not in source and ".cuda" not in source


def test_easyquant_baseline_is_the_grid_with_unsearched_scales():
    # the baseline shares easyquant's grids; with min-max ranges its weight scales are the max-abs
    # start easyquant begins from, and bad calibration data is refused
    from refimpl.ptq import easyquant_baseline, easyquant_config
    from refimpl.qmodel import weight_quantizers
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5)).eval()
    x = torch.randn(20, 1, 8, 8)
    q = easyquant_baseline(model, x, 5, 5)
    specs = {n: wq.spec for n, wq in weight_quantizers(q).items()}
    assert all(sp.bits == 5 and sp.narrow_range and sp.axis == 0 for sp in specs.values())
    for name, wq in weight_quantizers(q).items():
        w = q.get_submodule(name).weight.detach()
        expected = w.flatten(1).abs().amax(1) / 15
        assert torch.allclose(wq.scale.flatten(), expected, rtol=1e-6), name
    assert torch.isfinite(q(x)).all()
    q_kl = easyquant_baseline(model, x, 5, 5, range_method="kl_tensorrt")
    assert torch.isfinite(q_kl(x)).all()
    with pytest.raises(ValueError, match="calib_data"):
        easyquant_baseline(model, x[:0], 5, 5)
    with pytest.raises(ValueError, match="act_range_method"):
        easyquant_baseline(model, x, 5, 5, range_method="nope")

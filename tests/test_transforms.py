"""refimpl.transforms: weight fake-quantization of a model checked against PyTorch's observers and
fused fake-quant ops; error metrics, non-uniform grids and the quantized dynamics checked against
independent NumPy computations."""

import math

import numpy as np
import pytest
import torch
from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver

from refimpl.models import ResNetCNN
from refimpl.quant import QuantSpec, fake_quant, qparams
from refimpl.experiments import accumulate_updates, ste_gradient_descent
from refimpl.metrics import grid_levels, quant_error_split, sqnr_db, uniform_sqnr_db
from refimpl.quant import in_grid, pow2_levels, quantize_to_levels
from refimpl.transforms import fake_quantize_weights, quantizable_layers, weight_quant_report


def small_model(seed=0):
    torch.manual_seed(seed)
    model = ResNetCNN(width=4, num_blocks=2).eval()
    # a spread of per-channel scales, as BatchNorm-trained weights have
    with torch.no_grad():
        for m in quantizable_layers(model).values():
            m.weight.mul_(torch.linspace(0.05, 2.0, m.weight.shape[0]).reshape(-1, *[1] * (m.weight.ndim - 1)))
    return model


def torch_fake_quant_weight(w, per_channel, bits=8):
    """PyTorch's own path: min-max observer -> qparams -> fused fake-quant op (symmetric, signed)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if per_channel:
        obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                       quant_min=qmin, quant_max=qmax)
        obs(w)
        s, z = obs.calculate_qparams()
        return torch.fake_quantize_per_channel_affine(w, s, z.to(torch.int32), 0, qmin, qmax)
    obs = MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=qmin, quant_max=qmax)
    obs(w)
    s, z = obs.calculate_qparams()
    return torch.fake_quantize_per_tensor_affine(w, float(s), int(z), qmin, qmax)


def test_quantizable_layers_lists_conv_and_linear_in_order():
    model = small_model()
    names = list(quantizable_layers(model))
    assert names[0] == "stem.conv" and names[-1] == "head"
    assert "blocks.1.shortcut.conv" in names and not any("bn" in n for n in names)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [8, 4])
def test_fake_quantize_weights_equals_torch_observer_and_fused_op(per_channel, bits):
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = QuantSpec(bits, axis=0 if per_channel else None)
    q = fake_quantize_weights(model, spec)
    for name, layer in quantizable_layers(model).items():
        w = layer.weight.detach()
        ref = torch_fake_quant_weight(w, per_channel, bits)
        assert torch.equal(quantizable_layers(q)[name].weight.detach(), ref), name
    for k, v in model.state_dict().items():                 # the original is untouched
        assert torch.equal(v, before[k]), k
    for k, v in q.state_dict().items():                     # everything but weights is copied as is
        if not k.endswith("weight") or "bn" in k:
            assert torch.equal(v, before[k]), k


def test_names_and_mixed_precision_mapping():
    model = small_model()
    q = fake_quantize_weights(model, QuantSpec(2), names=["head"])
    layers, qlayers = quantizable_layers(model), quantizable_layers(q)
    assert torch.equal(qlayers["stem.conv"].weight, layers["stem.conv"].weight)
    assert qlayers["head"].weight.unique().numel() <= 4
    mixed = fake_quantize_weights(model, {"stem.conv": QuantSpec(8), "head": QuantSpec(3, axis=0)})
    ql = quantizable_layers(mixed)
    assert torch.equal(ql["stem.conv"].weight, torch_fake_quant_weight(layers["stem.conv"].weight.detach(), False))
    assert torch.equal(ql["blocks.0.conv1"].weight, layers["blocks.0.conv1"].weight)
    assert all(r.unique().numel() <= 8 for r in ql["head"].weight)


def test_range_fn_is_used_and_clips():
    model = small_model()
    half = lambda w, spec: (w.min() / 2, w.max() / 2)        # noqa: E731
    q = fake_quantize_weights(model, QuantSpec(8), names=["head"], range_fn=half)
    w = quantizable_layers(model)["head"].weight.detach()
    wq = quantizable_layers(q)["head"].weight.detach()
    spec = QuantSpec(8)
    s, _ = qparams(*half(w, spec), spec)
    assert float(wq.max()) == pytest.approx(spec.qmax * float(s)) and float(wq.min()) >= spec.qmin * float(s)
    assert float(w.abs().max()) > 1.5 * float(wq.abs().max())          # the tails were clipped


def test_fake_quantize_weights_errors():
    model = small_model()
    with pytest.raises(ValueError, match="not quantizable layers"):
        fake_quantize_weights(model, QuantSpec(8), names=["stem.bn"])
    with pytest.raises(ValueError, match="give names only"):
        fake_quantize_weights(model, {"head": QuantSpec(8)}, names=["head"])
    with pytest.raises(TypeError, match="spec must be a QuantSpec"):
        fake_quantize_weights(model, 8)
    with pytest.raises(TypeError, match=r"spec\['head'\] must be a QuantSpec"):
        fake_quantize_weights(model, {"head": 8})
    with pytest.raises(TypeError, match="range_fn must be callable"):
        fake_quantize_weights(model, QuantSpec(8), range_fn="minmax")
    with pytest.raises(ValueError, match="rounding must be one of"):
        fake_quantize_weights(model, QuantSpec(8), rounding="up")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fake_quantize_weights("model", QuantSpec(8))


def test_weight_quant_report_matches_the_quantized_model():
    model = small_model()
    spec = QuantSpec(4, axis=0)
    q = quantizable_layers(fake_quantize_weights(model, spec))
    rows = weight_quant_report(model, spec)
    assert [r.name for r in rows] == list(q)
    for r, (name, layer) in zip(rows, quantizable_layers(model).items()):
        w = layer.weight.detach().double().numpy()
        e = q[name].weight.detach().double().numpy() - w
        assert r.shape == w.shape and r.numel == w.size
        assert r.mse == pytest.approx(np.mean(e**2), rel=1e-12)
        assert r.sqnr_db == pytest.approx(10 * np.log10(np.sum(w**2) / np.sum(e**2)), rel=1e-12)
    per_tensor = weight_quant_report(model, QuantSpec(4))
    # with the spread of channel scales above, per-channel must beat per-tensor on every conv layer
    assert all(pc.sqnr_db > pt.sqnr_db for pc, pt in zip(rows, per_tensor))


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


def test_accumulate_updates_nearest_stalls_stochastic_follows_in_expectation():
    spec, s = QuantSpec(16), 1.0 / 64
    x0 = torch.zeros(2000, dtype=torch.float64)
    near = accumulate_updates(x0, 0.3 * s, 100, s, spec)
    assert near.shape == (101, 2000) and torch.equal(near, torch.zeros_like(near))
    up = accumulate_updates(x0[:3], 0.7 * s, 10, s, spec)      # above s/2: one code per step
    assert torch.allclose(up[-1], torch.full((3,), 10 * s, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    sto = accumulate_updates(x0, 0.3 * s, 100, s, spec, "stochastic", g)
    final = sto[-1].numpy()
    se = final.std(ddof=1) / math.sqrt(final.size)
    assert abs(final.mean() - 100 * 0.3 * s) < 4 * se
    assert np.all(np.abs(np.round(final / s) - final / s) == 0)        # always on the grid


def test_ste_gradient_descent_equals_numpy_recurrence_and_oscillates():
    spec, s, t, lr = QuantSpec(8), 0.5, 0.3 * 0.5, 0.2
    latent, quantized = ste_gradient_descent(0.45, t, s, spec, lr, 200)
    w, ws, qs = 0.45, [], []
    for _ in range(201):
        q = s * np.clip(np.round(w / s), spec.qmin, spec.qmax)     # np.round: half to even
        ws.append(w)
        qs.append(q)
        w = w - lr * (q - t)
    assert np.allclose(latent.numpy(), ws, rtol=0, atol=1e-12)
    assert np.array_equal(quantized.numpy(), np.array(qs))
    tail = quantized[50:]
    assert set(tail.tolist()) == {0.0, 0.5}                          # flips between the neighbours
    assert float(latent[50:].min()) < s / 2 < float(latent[50:].max())
    with pytest.raises(ValueError, match="lr"):
        ste_gradient_descent(0.0, 0.1, s, spec, -1.0, 3)


def test_in_grid_is_the_ste_pass_through_set():
    x = torch.linspace(-3, 3, 601)
    spec = QuantSpec(4)
    s, z = qparams(-1.0, 1.0, spec)
    xg = x.clone().requires_grad_()
    fake_quant(xg, s, z, spec).sum().backward()
    mask = in_grid(x, s, z, spec)
    assert mask.dtype == torch.bool and torch.equal(mask, xg.grad.bool())
    assert 0 < int(mask.sum()) < x.numel()

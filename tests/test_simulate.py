"""refimpl.simulate: weight fake-quantization of a model checked against PyTorch's observers and
fused fake-quant ops; activation fake-quantization by hooks checked against a hand-built forward."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver

from refimpl.calib import minmax
from refimpl.models import ResNetCNN
from refimpl.quant import QuantSpec, fake_quant, qparams
from refimpl.simulate import (activation_fake_quant, evaluate_with_activation_ranges, fake_quantize_weights,
                              quantizable_layers, weight_quant_report)
from refimpl.train import evaluate

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

def test_range_method_callable_is_used_and_clips():
    model = small_model()
    half = lambda w, spec: (w.min() / 2, w.max() / 2)        # noqa: E731
    q = fake_quantize_weights(model, QuantSpec(8), names=["head"], range_method=half)
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
    with pytest.raises(ValueError, match="range_method must be one of"):
        fake_quantize_weights(model, QuantSpec(8), range_method="max")
    with pytest.raises(TypeError, match="range_method must be a name"):
        fake_quantize_weights(model, QuantSpec(8), range_method=3)
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

class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.fc1, self.relu, self.fc2 = nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))

def test_activation_fake_quant_equals_a_hand_built_forward():
    model = TwoLayer().eval()
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(2))
    relu_spec, out_spec = QuantSpec(3, signed=False, symmetric=False), QuantSpec(4)
    ranges = {"relu": (torch.tensor(0.0), torch.tensor(0.7)), "fc2": (torch.tensor(-0.5), torch.tensor(0.5))}
    with torch.no_grad():
        ref_before = model(x)
        with activation_fake_quant(model, ranges, {"relu": relu_spec, "fc2": out_spec}) as m:
            got = m(x)
        s1, z1 = qparams(*ranges["relu"], relu_spec)
        s2, z2 = qparams(*ranges["fc2"], out_spec)
        h = fake_quant(torch.relu(model.fc1(x)), s1, z1, relu_spec)
        want = fake_quant(model.fc2(h), s2, z2, out_spec)
        assert torch.equal(got, want)
        assert torch.equal(model(x), ref_before)                             # hooks removed
        assert not model.relu._forward_hooks and not model.fc2._forward_hooks

def test_activation_fake_quant_removes_hooks_on_error_and_validates():
    model = TwoLayer()
    with pytest.raises(RuntimeError, match="boom"):
        with activation_fake_quant(model, {"relu": (torch.tensor(0.0), torch.tensor(1.0))}, QuantSpec(8)):
            raise RuntimeError("boom")
    assert not model.relu._forward_hooks
    with pytest.raises(ValueError, match="not found"):
        with activation_fake_quant(model, {"conv": (torch.tensor(0.0), torch.tensor(1.0))}, QuantSpec(8)):
            pass
    with pytest.raises(TypeError, match="no QuantSpec"):
        with activation_fake_quant(model, {"relu": (torch.tensor(0.0), torch.tensor(1.0))}, {"fc2": QuantSpec(8)}):
            pass

def test_evaluate_with_activation_ranges():
    model = TwoLayer().eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 6, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)                                             # the model is 100 % right
    spec = QuantSpec(16, signed=False, symmetric=False)
    acts = torch.relu(model.fc1(x)).detach()
    fine = evaluate_with_activation_ranges(model, {"relu": minmax(acts, spec)}, spec, x, y)
    assert fine == pytest.approx(100.0, abs=1.0)
    spec2 = QuantSpec(1, signed=False, symmetric=False)
    coarse_range = {"relu": (torch.tensor(0.0), torch.tensor(1e-3))}
    coarse = evaluate_with_activation_ranges(model, coarse_range, spec2, x, y)
    with torch.no_grad(), activation_fake_quant(model, coarse_range, spec2):
        want = 100.0 * float((model(x).argmax(1) == y).double().mean())
    assert coarse == pytest.approx(want) and coarse < fine
    assert evaluate(model, x, y) == 100.0                                   # hooks gone


def test_range_method_by_name_equals_the_function():
    model = small_model()
    from refimpl.calib import mse
    for spec in (QuantSpec(4), QuantSpec(4, axis=0)):
        by_name = fake_quantize_weights(model, spec, names=["head"], range_method="mse")
        by_fn = fake_quantize_weights(model, spec, names=["head"], range_method=mse)
        assert torch.equal(quantizable_layers(by_name)["head"].weight, quantizable_layers(by_fn)["head"].weight)
        rows_name = weight_quant_report(model, spec, names=["head"], range_method="mse")
        rows_fn = weight_quant_report(model, spec, names=["head"], range_method=mse)
        assert rows_name == rows_fn


@pytest.mark.parametrize("fn", [fake_quantize_weights, weight_quant_report])
def test_old_range_fn_keyword_names_range_method(fn):
    with pytest.raises(TypeError, match="'range_fn' is now spelled 'range_method'"):
        fn(small_model(), QuantSpec(8), range_fn=minmax)

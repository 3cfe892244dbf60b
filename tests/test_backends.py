"""MQBench's deployment rules: power-of-two scales, the three quantizer-insertion patterns, the
backend table as data, and the errors a user meets (unknown backend, inexpressible grid,
untraceable model)."""
import dataclasses
import math

import pytest
import torch
from torch import nn

from refimpl.fold import fold_all_bn
from refimpl.graph import is_add, is_pool, passes_values
from refimpl.models import MobileNetV2CNN, ResNetCNN
from refimpl.qmodel import (BACKENDS, INSERTION_PATTERNS, ActQuantizer, QuantConfig, WeightQuantizer,
                            act_quantizers, backend_names, calibrate, get_backend, input_sites, quant_layers,
                            quantize_model, register_backend, set_trainable, weight_quantizers)
from refimpl.quant import QuantSpec, fake_quant, lsq_fake_quant, pot_scale, qparams, ste_fake_quant


def _is_pow2(t: torch.Tensor) -> bool:
    m, _ = torch.frexp(t)
    return bool((m == 0.5).all())


# --------------------------------------------------------------------------------------------
# power-of-two scales
# --------------------------------------------------------------------------------------------
def test_pot_scale_is_the_nearest_power_of_two():
    gen = torch.Generator().manual_seed(0)
    s = torch.exp(torch.randn(10_000, generator=gen, dtype=torch.float64) * 5)
    p = pot_scale(s)
    assert _is_pow2(p)
    # MQBench's formula, 2^round(log2 s), in float64 (no value here is within 1e-9 of a tie)
    log2 = torch.log2(s)
    assert (log2 - torch.floor(log2) - 0.5).abs().min() > 1e-9
    assert torch.equal(p, torch.exp2(torch.round(log2)))
    # nearest in the log domain: never more than half an octave away
    assert float((torch.log2(p) - log2).abs().max()) <= 0.5
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        q = pot_scale(s.clamp(1e-3, 1e3).to(dtype))
        assert q.dtype == dtype and _is_pow2(q.float())


def test_pot_scale_gradient_is_the_ste_through_log2():
    s = torch.tensor([0.3, 0.05, 1.7, 6.0], dtype=torch.float64, requires_grad=True)
    pot_scale(s).sum().backward()
    ref_s = s.detach().clone().requires_grad_(True)
    log2 = torch.log2(ref_s)
    (2 ** ((torch.round(log2) - log2).detach() + log2)).sum().backward()
    assert torch.allclose(s.grad, ref_s.grad, rtol=1e-12)


def test_pot_scale_rejects_bad_scales():
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        pot_scale(torch.tensor([0.5, 0.0]))
    with pytest.raises(TypeError, match="scale must be a floating"):
        pot_scale(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="pot_scale must be a bool"):
        QuantSpec(4, pot_scale=1)


@pytest.mark.parametrize("symmetric", [True, False])
def test_pot_qparams_and_fake_quant(symmetric):
    spec = QuantSpec(4, signed=True, symmetric=symmetric, pot_scale=True)
    plain = dataclasses.replace(spec, pot_scale=False)
    scale, zp = qparams(-1.3, 2.2, spec)
    s0, _ = qparams(-1.3, 2.2, plain)
    assert _is_pow2(scale) and float(scale) == float(pot_scale(s0))
    if not symmetric:   # the zero point belongs to the power-of-two scale
        assert int(zp) == spec.qmin - round(-1.3 / float(scale))
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 2
    # fake_quant rounds a given scale to its power of two: the same as passing that power
    assert torch.equal(fake_quant(x, 0.3, zp, spec), fake_quant(x, 0.25, zp, plain))
    assert torch.equal(fake_quant(x, 0.25, zp, plain),
                       torch.fake_quantize_per_tensor_affine(x, 0.25, int(zp), spec.qmin, spec.qmax))


def test_pot_in_learned_quantizers():
    spec = QuantSpec(4, signed=True, symmetric=True, pot_scale=True)
    plain = dataclasses.replace(spec, pot_scale=False)
    x = torch.randn(500, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for fn in (lambda x, s, sp: lsq_fake_quant(x, s, sp, grad_scale=0.1),
               lambda x, s, sp: ste_fake_quant(x, s, torch.zeros(()), sp, grad_scale=0.1)):
        s = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        y = fn(x, s, spec)
        y.sum().backward()
        p = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
        y_ref = fn(x, p, plain)
        y_ref.sum().backward()
        assert torch.equal(y, y_ref)
        # chain rule through the power of two: d/ds = d/dp * p / s
        assert torch.allclose(s.grad, p.grad * 0.25 / 0.3, rtol=1e-12)


def test_pot_backend_exports_powers_of_two():
    qm = quantize_model(_resnet(), get_backend("tvm").config(4, 4))
    calibrate(qm, _x())
    set_trainable(qm, "lsq")
    with torch.no_grad():
        for q in list(weight_quantizers(qm).values()) + list(act_quantizers(qm).values()):
            q.scale.mul_(1.3)           # learned scales drift off the powers of two
    for q in list(weight_quantizers(qm).values()) + list(act_quantizers(qm).values()):
        assert _is_pow2(q.export()["scale"])
        assert q.spec.pot_scale


# --------------------------------------------------------------------------------------------
# insertion patterns
# --------------------------------------------------------------------------------------------
def _resnet(seed=0):
    torch.manual_seed(seed)
    return fold_all_bn(ResNetCNN(1, 10, width=8, num_blocks=2).eval())


def _x(seed=1):
    return torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _source(node, modules):
    """The node whose tensor ``node`` reads, through identity/flatten ops."""
    while passes_values(node, modules):
        node = node.args[0]
    return node


def _quantized_inputs(qm):
    """{consumer node name: [is each tensor input an activation quantizer's output]}."""
    modules = dict(qm.named_modules())
    out = {}
    for node in qm.graph.nodes:
        ins = [_source(a, modules) for a in node.all_input_nodes if a.op != "get_attr"]
        out[node] = [a.op == "call_module" and isinstance(modules[a.target], ActQuantizer) for a in ins]
    return out


@pytest.mark.parametrize("pattern", [1, 2, 3])
def test_every_quantized_layer_reads_a_quantized_tensor(pattern):
    qm = quantize_model(_resnet(), QuantConfig(insertion=pattern))
    for layer in quant_layers(qm):
        assert input_sites(qm, layer), layer


def test_pattern_1_quantizes_only_layer_inputs():
    qm = quantize_model(_resnet(), QuantConfig(insertion=1))
    modules = dict(qm.named_modules())
    reads = _quantized_inputs(qm)
    adds = [n for n in qm.graph.nodes if is_add(n)]
    assert adds
    # the residual branch of the first block (an identity shortcut) reads the float tensor
    assert not all(reads[adds[0]])
    # nothing that is not a layer reads a quantized tensor, and the logits are not quantized
    for node, flags in reads.items():
        if any(flags) and node.op != "output":
            is_layer = node.op == "call_module" and node.target in quant_layers(qm)
            assert is_layer or passes_values(node, modules), node
    assert list(act_quantizers(qm)) == ["input", "stem.relu", "blocks.0.relu1", "blocks.0.relu2",
                                        "blocks.1.relu1", "pool"]


def test_pattern_2_also_quantizes_add_and_pool_inputs():
    qm = quantize_model(_resnet(), QuantConfig(insertion=2))
    modules = dict(qm.named_modules())
    reads = _quantized_inputs(qm)
    checked = [n for n in qm.graph.nodes if is_add(n) or is_pool(n, modules)]
    assert len(checked) == 3            # two residual adds, the average pool
    for node in checked:
        assert all(reads[node]), node
    # one quantizer per tensor: the block input feeds conv1 and the identity shortcut
    sources = [_source(a, modules) for a in next(n for n in checked if is_add(n)).all_input_nodes]
    assert sum(a.op == "call_module" and isinstance(modules[a.target], ActQuantizer) for a in sources) == 2


def test_pattern_3_is_the_white_paper_placement():
    """Pattern 3 is the placement quantize_model always had (the white paper's Fig. 4)."""
    qm = quantize_model(_resnet(), QuantConfig())
    assert QuantConfig().insertion == 3
    assert list(act_quantizers(qm)) == [
        "input", "stem.conv", "blocks.0.conv1", "blocks.0.conv2", "blocks.0.relu2",
        "blocks.1.conv1", "blocks.1.conv2", "blocks.1.shortcut.conv", "blocks.1.relu2", "pool", "head"]


@pytest.mark.parametrize("pattern", [1, 2, 3])
def test_patterns_at_16_bits_match_fp32(pattern):
    model = _resnet()
    qm = quantize_model(model, QuantConfig(weight_bits=16, act_bits=16, insertion=pattern))
    x = _x(3)
    calibrate(qm, x)
    with torch.no_grad():
        ref = model(x)
        assert float((qm(x) - ref).abs().max()) < 1e-3 * float(ref.abs().max())


def test_pattern_on_mobilenetv2_and_keep_bn():
    torch.manual_seed(0)
    model = MobileNetV2CNN(1, 10, width=8).eval()
    for pattern in (1, 2):
        qm = quantize_model(model, QuantConfig(insertion=pattern), keep_bn=True)
        calibrate(qm, torch.randn(8, 1, 16, 16))
        assert all(input_sites(qm, layer) for layer in quant_layers(qm))


def test_adaptive_sign_off_gives_signed_grids():
    qm = quantize_model(_resnet(), QuantConfig(act_adaptive_sign=False, insertion=1))
    assert all(q.spec.signed for q in act_quantizers(qm).values())
    qm = quantize_model(_resnet(), QuantConfig(insertion=1))
    assert [n for n, q in act_quantizers(qm).items() if q.spec.signed] == ["input"]


@pytest.mark.parametrize("bad", [0, 4, True, "1", None])
def test_unknown_insertion_pattern(bad):
    with pytest.raises(ValueError, match=r"insertion must be one of MQBench's patterns \(1, 2, 3\)"):
        QuantConfig(insertion=bad)
    assert set(INSERTION_PATTERNS) == {1, 2, 3}


def test_untraceable_model_names_the_submodule_and_node():
    class Gate(nn.Module):
        def forward(self, x):
            s = x.sum()
            return x if s > 0 else -x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.body = nn.Sequential(nn.ReLU(), Gate())

        def forward(self, x):
            return self.body(self.conv(x))

    with pytest.raises(ValueError, match=r"submodule 'body\.1', after node 'gt'"):
        quantize_model(Net(), get_backend("tensorrt").config(8, 8))


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------
def test_backend_table():
    """The rules of MQBench's table, row by row (scale form, granularity, symmetry, graph, fold BN)."""
    table = {   # name: (pot, per-channel, symmetric, graph, fold BN)
        "academic": (False, False, True, 1, False), "tensorrt": (False, True, True, 2, True),
        "acl": (False, True, False, 1, True), "tvm": (True, False, True, 3, True),
        "snpe": (False, False, False, 3, True), "fbgemm": (False, True, False, 3, True),
    }
    assert backend_names()[:6] == tuple(table)
    for name, (pot, per_channel, symmetric, graph, fold) in table.items():
        b = get_backend(name)
        assert (b.pot_scale, b.per_channel, b.symmetric, b.insertion, b.fold_bn) == (
            pot, per_channel, symmetric, graph, fold)
        assert b.source
        qm = quantize_model(_resnet(), b.config(4, 4))
        calibrate(qm, _x())
        for q in weight_quantizers(qm).values():
            assert q.spec.axis == (0 if per_channel else None)
            assert q.spec.symmetric == symmetric and q.spec.pot_scale == pot
            if symmetric:
                assert bool((q.zero_point == 0).all())
        for q in act_quantizers(qm).values():
            assert q.spec.signed or name == "academic"
            assert q.spec.symmetric == (symmetric and q.spec.signed)
    assert get_backend("tensorrt").config(8, 8).weight_spec().qmin == -127


def test_asymmetric_backend_uses_the_whole_grid_on_relu_outputs():
    """A signed asymmetric grid on a ReLU output puts its zero point at qmin: 2^b levels used,
    as the unsigned grid; a signed symmetric one (TensorRT, TVM) uses half of them."""
    for name, used in (("snpe", 16), ("tensorrt", 8)):
        qm = quantize_model(_resnet(), get_backend(name).config(4, 4))
        calibrate(qm, _x())
        q = act_quantizers(qm)["blocks.0.relu2"]
        levels = torch.unique(q(torch.linspace(0, 50, 10_001)))
        assert len(levels) == used, name


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(ValueError, match="backend must be one of 'academic', 'tensorrt', 'acl', 'tvm', "
                                         "'snpe', 'fbgemm'; got 'trt'"):
        get_backend("trt")


def test_backend_refuses_a_grid_it_cannot_express():
    for kind in ("apot", "pot", "pwlq"):
        with pytest.raises(ValueError, match=f"the '{kind}' quantizer has a non-uniform grid, which tensorrt"):
            get_backend("tensorrt").check_kind(kind)
        assert get_backend("academic").check_kind(kind) == kind
    with pytest.raises(ValueError, match="non-uniform grid, which tvm"):
        get_backend("tvm").config(4, 4, weight_quantizer="apot")
    for kind in ("fixed", "lsq", "ste", "dsq"):
        assert get_backend("fbgemm").check_kind(kind) == kind


def test_backend_fixed_fields_cannot_be_overridden():
    with pytest.raises(ValueError, match=r"the tvm backend fixes \['weight_per_channel'\]"):
        get_backend("tvm").config(4, 4, weight_per_channel=True)
    cfg = get_backend("tvm").config(4, 4, act_range_method="mse")
    assert cfg.act_range_method == "mse"


def test_a_new_backend_is_one_entry():
    b = dataclasses.replace(get_backend("fbgemm"), name="fbgemm_pot", pot_scale=True, source="test")
    register_backend(b)
    try:
        assert get_backend("fbgemm_pot").config(8, 8).pot_scale
        with pytest.raises(ValueError, match="registered already"):
            register_backend(b)
    finally:
        BACKENDS.pop("fbgemm_pot")
    with pytest.raises(ValueError, match=r"insertion must be one of \(1, 2, 3\)"):
        dataclasses.replace(b, insertion=4)
    with pytest.raises(TypeError, match="backend must be a Backend"):
        register_backend("fbgemm")


def test_lsq_learns_the_zero_point_on_request():
    """LSQ+ as MQBench runs it: the asymmetric zero point learned with LSQ's gradient scale."""
    qm = quantize_model(_resnet(), get_backend("snpe").config(4, 4))
    calibrate(qm, _x())
    set_trainable(qm, "lsq")
    q = weight_quantizers(qm)["blocks.0.conv1"]
    assert not isinstance(q.zero_point, nn.Parameter)
    q.set_option("learn_zero_point", True)
    assert isinstance(q.zero_point, nn.Parameter)
    w = qm.get_submodule("blocks.0.conv1").weight
    q(w).sum().backward()
    assert q.zero_point.grad is not None and q.scale.grad is not None
    # the same gradients as the STE quantizer with LSQ's gradient scale
    g = 1 / math.sqrt(w.numel() * q.spec.qmax)
    s = q.scale.detach().clone().requires_grad_(True)
    z = q.zero_point.detach().clone().requires_grad_(True)
    ste_fake_quant(w.detach(), s, z, q.spec, grad_scale=g).sum().backward()
    assert torch.allclose(q.scale.grad, s.grad) and torch.allclose(q.zero_point.grad, z.grad)
    q.set_option("learn_zero_point", False)
    assert not isinstance(q.zero_point, nn.Parameter)
    assert isinstance(q, WeightQuantizer)

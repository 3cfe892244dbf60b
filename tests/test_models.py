"""Tests for refimpl.models: shapes, layer names, torch.fx traceability and argument errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from refimpl.models import BasicBlock, ResNetCNN, make_model

INPUTS = {2: (1, 8, 8), 1: (1, 40)}


def _input(dims, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *INPUTS[dims], generator=g)


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("num_blocks", [0, 1, 2, 3])
def test_output_shape(dims, num_blocks):
    model = ResNetCNN(dims=dims, num_blocks=num_blocks, width=8, num_classes=7)
    out = model(_input(dims))
    assert out.shape == (4, 7) and out.dtype == torch.float32


def test_in_channels():
    model = ResNetCNN(in_channels=3, dims=2)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("dims, conv, bn", [(2, nn.Conv2d, nn.BatchNorm2d), (1, nn.Conv1d, nn.BatchNorm1d)])
def test_layer_names_and_types(dims, conv, bn):
    modules = dict(ResNetCNN(dims=dims, width=16).named_modules())
    for name in ["stem.conv", "blocks.0.conv1", "blocks.0.conv2", "blocks.1.conv1", "blocks.1.conv2",
                 "blocks.1.shortcut.conv"]:
        assert type(modules[name]) is conv, name
        assert modules[name].bias is None, f"{name}: a conv before BN needs no bias"
    for name in ["stem.bn", "blocks.0.bn1", "blocks.0.bn2", "blocks.1.bn1", "blocks.1.bn2", "blocks.1.shortcut.bn"]:
        assert type(modules[name]) is bn, name
    assert isinstance(modules["blocks.0.shortcut"], nn.Identity)
    assert isinstance(modules["head"], nn.Linear)


def test_second_block_downsamples_and_doubles_width():
    model = ResNetCNN(dims=2, width=16)
    b0, b1 = model.blocks
    assert b0.conv1.stride == (1, 1) and b0.conv1.out_channels == 16
    assert b1.conv1.stride == (2, 2) and b1.conv1.out_channels == 32
    assert b1.shortcut.conv.stride == (2, 2)
    assert model.head.in_features == 32
    feats = model.blocks(model.stem(_input(2)))
    assert feats.shape == (4, 32, 4, 4)


def test_basic_block_identity_path():
    block = BasicBlock(8, 8, stride=1, dims=1).eval()
    # With the residual branch's last BN zeroed the block is relu(x).
    nn.init.zeros_(block.bn2.weight)
    x = torch.randn(2, 8, 10)
    assert torch.equal(block(x), torch.relu(x))


@pytest.mark.parametrize("dims", [1, 2])
def test_fx_traceable_and_equivalent(dims):
    torch.manual_seed(0)
    model = ResNetCNN(dims=dims, num_blocks=3)
    model.train()
    model(_input(dims, n=16, seed=1))  # give BN non-trivial running statistics
    traced = fx.symbolic_trace(model)
    called = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert {"stem.conv", "stem.bn", "blocks.0.conv1", "blocks.1.shortcut.conv", "head"} <= called
    x = _input(dims, seed=2)
    model.eval()
    traced.eval()
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))


def test_fx_traced_train_mode_matches():
    torch.manual_seed(0)
    model = ResNetCNN(dims=2)
    traced = fx.symbolic_trace(model)  # shares the parameters and buffers of model
    x = _input(2, n=8)
    with torch.no_grad():
        out_traced = traced(x)
        # Batch statistics do not depend on running stats, so the second call sees the same thing.
        assert torch.equal(out_traced, model(x))


def test_follows_input_device_and_dtype():
    # No hard-coded device: the model runs on the meta device, and in float64.
    model = ResNetCNN(dims=2).to("meta")
    assert model(torch.empty(2, 1, 8, 8, device="meta")).device.type == "meta"
    model = ResNetCNN(dims=1).double()
    assert model(_input(1).double()).dtype == torch.float64


def test_make_model():
    d, m = make_model("digits"), make_model("mnist1d")
    assert d.dims == 2 and m.dims == 1
    assert d(_input(2)).shape == (4, 10) and m(_input(1)).shape == (4, 10)
    assert make_model("mnist1d", width=8).stem.conv.out_channels == 8


def test_same_seed_same_init():
    torch.manual_seed(5)
    a = ResNetCNN()
    torch.manual_seed(5)
    b = ResNetCNN()
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(dims=3), ValueError, "dims"),
        (dict(dims=0), ValueError, "dims"),
        (dict(dims=2.0), TypeError, "dims"),
        (dict(width=0), ValueError, "width"),
        (dict(width=1.5), TypeError, "width"),
        (dict(num_blocks=-1), ValueError, "num_blocks"),
        (dict(in_channels=0), ValueError, "in_channels"),
        (dict(num_classes=1), ValueError, "num_classes"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ResNetCNN(**kwargs)


def test_make_model_unknown_name():
    with pytest.raises(ValueError, match="dataset_name.*'digits'.*'mnist1d'"):
        make_model("cifar10")


# ------------------------------------------------------------------------------------------
# MobileNetV2CNN
# ------------------------------------------------------------------------------------------
import operator  # noqa: E402

from refimpl.models import MOBILENET_BLOCKS, InvertedResidual, MobileNetV2CNN  # noqa: E402


def _bn_nontrivial(model, x):
    """One train-mode pass so BN running statistics differ from their (0, 1) init."""
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


@pytest.mark.parametrize("dims", [1, 2])
def test_mobilenet_output_and_feature_shapes(dims):
    torch.manual_seed(0)
    model = MobileNetV2CNN(dims=dims, width=8, num_classes=7)
    x = _input(dims)
    out = model(x)
    assert out.shape == (4, 7) and out.dtype == torch.float32
    # Two stride-2 blocks: 8x8 -> 2x2, 40 -> 10; the last block outputs 2 * width channels.
    feats = model.blocks(model.stem(x))
    assert feats.shape == ((4, 16, 2, 2) if dims == 2 else (4, 16, 10))
    assert model.last.conv.out_channels == 32 and model.head.in_features == 32


def test_mobilenet_make_model_and_default_arch():
    d = make_model("digits", "mobilenetv2")
    m = make_model("mnist1d", arch="mobilenetv2", width=8)
    assert type(d) is MobileNetV2CNN and type(m) is MobileNetV2CNN
    assert d.dims == 2 and m.dims == 1 and m.stem.conv.out_channels == 8
    assert d(_input(2)).shape == (4, 10) and m(_input(1)).shape == (4, 10)
    # The default architecture is the ResNet, built exactly as before (same init from a seed).
    assert type(make_model("digits")) is ResNetCNN and type(make_model("mnist1d", "resnet")) is ResNetCNN
    torch.manual_seed(3)
    a = make_model("mnist1d", width=8)
    torch.manual_seed(3)
    b = ResNetCNN(in_channels=1, num_classes=10, dims=1, width=8)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("dims, conv", [(1, nn.Conv1d), (2, nn.Conv2d)])
def test_mobilenet_depthwise_convs_are_depthwise(dims, conv):
    model = MobileNetV2CNN(dims=dims, width=8)
    assert len(model.blocks) == len(MOBILENET_BLOCKS)
    for i, block in enumerate(model.blocks):
        expansion, _, stride = MOBILENET_BLOCKS[i]
        dw, ex, pr = block.dw_conv, block.expand_conv, block.project_conv
        for layer in (dw, ex, pr):
            assert type(layer) is conv and layer.bias is None
        c_in = ex.in_channels
        assert ex.out_channels == c_in * expansion and ex.kernel_size == (1,) * dims and ex.groups == 1
        # Depthwise: one input channel per filter, groups == channels, weight (C, 1, k, ...).
        assert dw.groups == dw.in_channels == dw.out_channels == c_in * expansion
        assert dw.weight.shape[1] == 1 and dw.stride == (stride,) * dims
        assert pr.kernel_size == (1,) * dims and pr.groups == 1
        # Linear bottleneck: the projection's BN feeds no activation.
        assert not any(isinstance(m, (nn.ReLU, nn.ReLU6)) for n, m in block.named_children()
                       if n.startswith("project"))


def _trace_adds(model):
    """{block index: number of tensor adds} in the fx graph of ``model``."""
    traced = fx.symbolic_trace(model)
    adds = {}
    for node in traced.graph.nodes:
        if node.op == "call_function" and node.target in (operator.add, torch.add):
            # The add's operands come from the block's project_bn; read the block index from there.
            src = [a.target for a in node.args if isinstance(a, fx.Node) and a.op == "call_module"]
            idx = int(next(s for s in src if s.startswith("blocks.")).split(".")[1])
            adds[idx] = adds.get(idx, 0) + 1
    return adds


@pytest.mark.parametrize("dims", [1, 2])
def test_mobilenet_residual_adds_where_expected(dims):
    model = MobileNetV2CNN(dims=dims, width=8)
    expected = {i for i, (_, mult, stride) in enumerate(MOBILENET_BLOCKS)
                if stride == 1 and (i == 0 and mult == 1 or i > 0 and mult == MOBILENET_BLOCKS[i - 1][1])}
    assert expected == {0, 2, 4}  # the default config: width-keeping stride-1 blocks
    assert {i for i, b in enumerate(model.blocks) if b.residual} == expected
    assert _trace_adds(model) == {i: 1 for i in expected}


def test_inverted_residual_identity_path():
    # With the projection's BN zeroed the block is the identity (residual) or zero (no residual).
    for c_out, stride, residual in [(8, 1, True), (12, 1, False), (8, 2, False)]:
        block = InvertedResidual(8, c_out, stride=stride, expansion=3, dims=1).eval()
        nn.init.zeros_(block.project_bn.weight)
        x = torch.randn(2, 8, 10)
        expected = x if residual else torch.zeros(2, c_out, 10 // stride)
        assert torch.equal(block(x), expected), (c_out, stride)


def test_inverted_residual_matches_functional():
    # Independent re-computation with torch.nn.functional (eval-mode BN).
    torch.manual_seed(0)
    block = _bn_nontrivial(InvertedResidual(6, 6, stride=1, expansion=4, dims=2), torch.randn(8, 6, 5, 5))
    x = torch.randn(3, 6, 5, 5)

    def bn(t, m):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    h = torch.clamp(bn(F.conv2d(x, block.expand_conv.weight), block.expand_bn), 0, 6)
    h = torch.clamp(bn(F.conv2d(h, block.dw_conv.weight, padding=1, groups=24), block.dw_bn), 0, 6)
    ref = bn(F.conv2d(h, block.project_conv.weight), block.project_bn) + x
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref)


def test_mobilenet_relu6_distinct_per_site():
    model = MobileNetV2CNN(dims=2, width=8)
    relus = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ReLU6)]
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    # stem, last, and two per block; each site its own module object.
    assert len(relus) == 2 + 2 * len(model.blocks)
    assert len({id(m) for _, m in relus}) == len(relus)
    names = {n for n, _ in relus}
    assert {"stem.relu", "last.relu", "blocks.0.expand_relu", "blocks.0.dw_relu"} <= names
    # Each ReLU6 is called exactly once in the traced graph.
    traced = fx.symbolic_trace(model)
    called = [n.target for n in traced.graph.nodes if n.op == "call_module" and n.target in names]
    assert sorted(called) == sorted(names)


@pytest.mark.parametrize("dims", [1, 2])
def test_mobilenet_fx_traceable_and_equivalent(dims):
    torch.manual_seed(0)
    model = _bn_nontrivial(MobileNetV2CNN(dims=dims, width=8), _input(dims, n=16, seed=1))
    traced = fx.symbolic_trace(model)
    called = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert {"stem.conv", "blocks.0.dw_conv", "blocks.4.project_bn", "last.relu", "head"} <= called
    x = _input(dims, seed=2)
    traced.eval()
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))


def test_mobilenet_device_dtype_and_kernel_size():
    model = MobileNetV2CNN(dims=2).to("meta")
    assert model(torch.empty(2, 1, 8, 8, device="meta")).device.type == "meta"
    model = MobileNetV2CNN(dims=1, width=4).double()
    assert model(_input(1).double()).dtype == torch.float64
    model = MobileNetV2CNN(dims=1, width=4, kernel_size=5, last_channels=10,
                           blocks=((2, 1, 1), (3, 2, 2)))
    assert model.blocks[0].dw_conv.kernel_size == (5,) and model.stem.conv.kernel_size == (5,)
    assert model.last.conv.out_channels == 10 and len(model.blocks) == 2
    assert model.blocks[1].dw_conv.groups == 12 and model.blocks[1].project_conv.out_channels == 8
    assert model(_input(1)).shape == (4, 10)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(dims=3), ValueError, "dims"),
        (dict(width=0), ValueError, "width"),
        (dict(width=2.5), TypeError, "width"),
        (dict(kernel_size=4), ValueError, "kernel_size"),
        (dict(kernel_size=0), ValueError, "kernel_size"),
        (dict(last_channels=0), ValueError, "last_channels"),
        (dict(num_classes=1), ValueError, "num_classes"),
        (dict(in_channels=0), ValueError, "in_channels"),
        (dict(blocks=((4, 1, 3),)), ValueError, r"blocks\[0\] stride"),
        (dict(blocks=((0, 1, 1),)), ValueError, r"blocks\[0\] expansion"),
        (dict(blocks=((4, 1, 1), (4, -1, 1))), ValueError, r"blocks\[1\] width multiple"),
        (dict(blocks=((4, "1", 1),)), TypeError, r"blocks\[0\] width multiple"),
        (dict(blocks=((4, 1),)), TypeError, r"blocks\[0\]"),
        (dict(blocks=5), TypeError, "blocks"),
    ],
)
def test_mobilenet_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MobileNetV2CNN(**kwargs)


def test_make_model_unknown_arch():
    with pytest.raises(ValueError, match="arch.*'resnet'.*'mobilenetv2'"):
        make_model("digits", arch="vgg")
    with pytest.raises(TypeError, match="num_blocks"):
        make_model("digits", "mobilenetv2", num_blocks=2)  # a ResNet-only argument

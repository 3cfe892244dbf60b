"""Tests for refimpl.models: shapes, layer names, torch.fx traceability and argument errors."""

import pytest
import torch
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

"""refimpl.fold against torch.nn.utils.fusion and against the unfolded model."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from refimpl.fold import bn_statistics, fold_all_bn, fold_bn
from refimpl.models import ResNetCNN


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models: one thread is as fast as two and does not collapse when another process
    # holds a core (oversubscribed OpenMP threads made convolutions ~25x slower here).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _randomize_bn(bn, gen):
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen, dtype=bn.running_mean.dtype))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=gen, dtype=bn.running_var.dtype) + 0.1)
        if bn.affine:
            bn.weight.copy_(torch.randn(bn.num_features, generator=gen, dtype=bn.weight.dtype))
            bn.bias.copy_(torch.randn(bn.num_features, generator=gen, dtype=bn.bias.dtype))
    return bn.eval()


def _randomize_all_bn(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            _randomize_bn(m, gen)
    return model.eval()


CASES = [
    ("conv2d", lambda b: nn.Conv2d(4, 6, 3, bias=b), nn.BatchNorm2d(6), (2, 4, 7, 7)),
    ("conv2d_grouped", lambda b: nn.Conv2d(4, 6, 3, groups=2, bias=b), nn.BatchNorm2d(6), (2, 4, 7, 7)),
    ("conv2d_depthwise", lambda b: nn.Conv2d(5, 5, 3, groups=5, bias=b, padding=1), nn.BatchNorm2d(5), (2, 5, 6, 6)),
    ("conv2d_depthwise_mult", lambda b: nn.Conv2d(3, 6, 3, groups=3, bias=b), nn.BatchNorm2d(6), (2, 3, 6, 6)),
    ("conv1d", lambda b: nn.Conv1d(3, 8, 5, bias=b, stride=2), nn.BatchNorm1d(8), (2, 3, 20)),
    ("conv1d_depthwise", lambda b: nn.Conv1d(4, 4, 3, groups=4, bias=b), nn.BatchNorm1d(4), (2, 4, 20)),
    ("linear", lambda b: nn.Linear(7, 5, bias=b), nn.BatchNorm1d(5), (3, 7)),
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name,make_layer,bn,shape", CASES, ids=[c[0] for c in CASES])
def test_fold_bn_equals_torch_fusion(name, make_layer, bn, shape, bias):
    torch.manual_seed(0)
    layer = make_layer(bias).double().eval()
    bn = _randomize_bn(copy.deepcopy(bn).double(), torch.Generator().manual_seed(1))
    before = copy.deepcopy((layer.state_dict(), bn.state_dict()))
    ours = fold_bn(layer, bn)
    ref = (fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval)(layer, bn)
    assert type(ours) is type(ref)
    assert ours.weight.shape == ref.weight.shape and ours.bias.shape == ref.bias.shape
    assert ours.weight.dtype == torch.float64
    torch.testing.assert_close(ours.weight, ref.weight, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(ours.bias, ref.bias, rtol=1e-13, atol=1e-13)
    for attr in ("stride", "padding", "groups", "dilation", "in_features", "out_features"):
        assert getattr(ours, attr, None) == getattr(ref, attr, None)
    x = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(ours(x), bn(layer(x)), rtol=1e-12, atol=1e-12)
    # inputs untouched
    for a, b in zip(before, (layer.state_dict(), bn.state_dict())):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_fold_bn_no_affine_and_float32():
    layer = nn.Conv2d(3, 4, 3).eval()
    bn = _randomize_bn(nn.BatchNorm2d(4, affine=False), torch.Generator().manual_seed(0))
    ours, ref = fold_bn(layer, bn), fuse_conv_bn_eval(layer, bn)
    assert ours.weight.dtype == torch.float32
    torch.testing.assert_close(ours.weight, ref.weight)
    torch.testing.assert_close(ours.bias, ref.bias)


def test_fold_bn_errors():
    with pytest.raises(TypeError, match="layer"):
        fold_bn(nn.ReLU(), nn.BatchNorm2d(3))
    with pytest.raises(TypeError, match="bn"):
        fold_bn(nn.Conv2d(3, 3, 1), nn.ReLU())
    with pytest.raises(TypeError, match="BatchNorm1d"):
        fold_bn(nn.Conv2d(3, 3, 1), nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="num_features"):
        fold_bn(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="running"):
        fold_bn(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dims,shape", [(2, (4, 1, 8, 8)), (1, (4, 1, 40))])
def test_fold_all_bn_resnet(dims, shape):
    torch.manual_seed(0)
    model = _randomize_all_bn(ResNetCNN(dims=dims, width=8, num_blocks=3).double())
    model.train()  # the caller's mode must be kept; the fold uses running statistics
    before = _state(model)
    folded = fold_all_bn(model)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(folded, torch.fx.GraphModule) and not folded.training
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    convs = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))}
    kept = {n for n, m in folded.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))}
    assert kept == convs
    assert "blocks.0.conv1" in kept and "blocks.1.shortcut.conv" in kept
    assert all(folded.get_submodule(n).bias is not None for n in kept)
    x = torch.randn(*shape, dtype=torch.float64)
    model.eval()
    torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)


class _Hand(nn.Module):
    """Linear -> BN1d (folds); a conv feeding both a BN and a second branch (does not fold)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.side = nn.Conv2d(4, 4, 1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * 5 * 5, 6)
        self.bn_fc = nn.BatchNorm1d(6)

    def forward(self, x):
        y = self.conv(x)
        y = self.bn(y) + self.side(y)
        y = self.relu(self.bn2(self.conv2(y)))
        return self.bn_fc(self.fc(self.flatten(y)))


def test_fold_all_bn_hand_model():
    model = _randomize_all_bn(_Hand().double())
    before = _state(model)
    folded = fold_all_bn(model)
    names = dict(folded.named_modules())
    assert "bn" in names          # the conv output also feeds "side": not folded
    assert "bn2" not in names and "bn_fc" not in names
    torch.testing.assert_close(folded.conv.weight, model.conv.weight)
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # folded parameters are not shared with the input
    with torch.no_grad():
        folded.fc.weight.zero_()
    assert not torch.equal(model.fc.weight, folded.fc.weight)


def test_bn_statistics():
    model = _randomize_all_bn(_Hand())
    stats = bn_statistics(model)
    assert set(stats) == {"conv2", "fc"}
    beta, gamma = stats["conv2"]
    torch.testing.assert_close(beta, model.bn2.bias.detach())
    torch.testing.assert_close(gamma, model.bn2.weight.detach().abs())
    # the BN output (folded layer's pre-activation) has mean beta and std |gamma| when the BN
    # running statistics are those of the layer's output
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, momentum=None)
    seq = nn.Sequential(conv, bn)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(256, 3, 8, 8)
    seq.train()
    with torch.no_grad():
        seq(x)
    seq.eval()
    y = fold_all_bn(seq)(x).detach()
    beta, gamma = bn_statistics(seq)["0"]
    torch.testing.assert_close(y.mean((0, 2, 3)), beta, atol=1e-2, rtol=0)
    torch.testing.assert_close(y.std((0, 2, 3)), gamma, atol=2e-2, rtol=2e-2)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.conv(x)
        return x


def test_untraceable_model_error():
    with pytest.raises(ValueError, match="torch.fx"):
        fold_all_bn(_Untraceable())
    with pytest.raises(TypeError, match="model"):
        fold_all_bn("not a model")


def test_reestimate_bn_equals_the_statistics_of_the_data():
    """After reestimate_bn, each BN's running mean/var are the batch-averaged mean and unbiased
    variance of its input on x, computed here directly with hooks; flags and momentum restored."""
    from refimpl.fold import reestimate_bn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3), nn.BatchNorm2d(3))
    model.eval()
    x = torch.randn(81, 1, 8, 8) * 2 + 1
    seen = {}
    hooks = [bn.register_forward_hook(lambda m, inp, out, k=k: seen.setdefault(k, []).append(inp[0]))
             for k, bn in ((1, model[1]), (4, model[4]))]
    assert reestimate_bn(model, x, batch_size=40) == 2
    for h in hooks:
        h.remove()
    assert not model.training and all(not m.training for m in model.modules())
    assert model[1].momentum == 0.1
    for k, batches in seen.items():
        assert len(batches) == 2        # 40 + 41: a last batch of < 2 rows joins the one before
        mean = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
        var = torch.stack([b.var(dim=(0, 2, 3), unbiased=True) for b in batches]).mean(0)
        torch.testing.assert_close(model[k].running_mean, mean)
        torch.testing.assert_close(model[k].running_var, var)
    with pytest.raises(ValueError, match="batch_size"):
        reestimate_bn(model, x, batch_size=1)
    with pytest.raises(TypeError, match="x"):
        reestimate_bn(model, x.long())
    assert reestimate_bn(nn.Linear(2, 2), torch.randn(4, 2)) == 0

"""refimpl.qmodel.bnfold: MQBench's BN-folding strategies for QAT (Li et al. 2021; mqbench-paper's
bn_fold.py). Eval mode against torch.nn.utils.fusion and refimpl.fold.fold_bn; each strategy's
train-mode definition (batch statistics, the white paper's correction, PyTorch's ConvBn2d);
gradients; fuse/unfuse round trips; qat_pipeline with every strategy ("static" and "keep"
unchanged); bad input."""
import copy
import dataclasses
import math

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.intrinsic.qat import ConvBn2d
from torch.ao.quantization import FakeQuantize, PerChannelMinMaxObserver, QConfig
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from refimpl.fold import fold_all_bn, fold_bn, reestimate_bn
from refimpl.models import ResNetCNN
from refimpl.qat import BN_MODES, qat_pipeline
from refimpl.qmodel import (BN_FOLDS, act_quantizers, QuantConfig, QuantConv2d, QuantConvBN2d, QuantLayerBN, calibrate, freeze,
                            fuse_bn, fuse_layer_bn, merge_bn, quant_layers, quantize_model, set_trainable,
                            unfuse_bn, weight_quantizers)
from refimpl.train import evaluate, fit, train_fp32

FUSED = ("freeze", "naive", "white_paper", "torch")
W4 = QuantConfig(weight_bits=4, act_bits=None)
W4A4 = QuantConfig(weight_bits=4, act_bits=4)


def _pair(kind="conv2d", bias=False, dtype=torch.float32, seed=0):
    """A (layer, BN) nn.Sequential with random weights and BN statistics (some gamma < 0), eval mode."""
    g = torch.Generator().manual_seed(seed)
    layer, bn = {"conv2d": (nn.Conv2d(3, 6, 3, padding=1, bias=bias), nn.BatchNorm2d(6)),
                 "conv1d": (nn.Conv1d(3, 6, 3, padding=1, bias=bias), nn.BatchNorm1d(6)),
                 "linear": (nn.Linear(5, 6, bias=bias), nn.BatchNorm1d(6))}[kind]
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.3)
        if bias:
            layer.bias.copy_(torch.randn(6, generator=g) * 0.2)
        bn.running_mean.copy_(torch.randn(6, generator=g) * 0.3)
        bn.running_var.copy_(torch.rand(6, generator=g) + 0.3)
        bn.weight.copy_((torch.rand(6, generator=g) + 0.5) * torch.tensor([1, -1, 1, 1, -1, 1.]))
        bn.bias.copy_(torch.randn(6, generator=g) * 0.2)
    return nn.Sequential(layer, bn).to(dtype).eval()


def _input(kind="conv2d", dtype=torch.float32, n=16, seed=1):
    shape = {"conv2d": (n, 3, 7, 7), "conv1d": (n, 3, 11), "linear": (n, 5)}[kind]
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _fused(seq, strategy, cfg=W4):
    """The fused module of quantize_model(seq, keep_bn=True) after fuse_bn."""
    return fuse_bn(quantize_model(seq, cfg, keep_bn=True), strategy).get_submodule("0")


def _op(kind, x, w, b):
    return F.linear(x, w, b) if kind == "linear" else (F.conv1d if kind == "conv1d" else F.conv2d)(x, w, b, padding=1)


def _stats(y):
    dims = [0] + list(range(2, y.dim()))
    return y.mean(dims), y.var(dims, unbiased=False), y.var(dims, unbiased=True)


def _chan(v, y):
    return v.reshape([1, -1] + [1] * (y.dim() - 2))


def test_bn_folds_are_mqbench_codes():
    assert BN_FOLDS == {"keep": -1, "static": 0, "freeze": 1, "naive": 2, "white_paper": 3, "torch": 4}
    assert BN_MODES == tuple(BN_FOLDS)


# --------------------------------------------------------------------------------------------
# Eval mode: every fused strategy is the folded layer with a quantized folded weight
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind,bias", [("conv2d", False), ("conv2d", True), ("conv1d", True), ("linear", True)])
@pytest.mark.parametrize("strategy", FUSED)
def test_eval_equals_the_folded_layer(strategy, kind, bias, dtype):
    seq = _pair(kind, bias, dtype)
    x = _input(kind, dtype)
    fused = _fused(seq, strategy).eval()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    fuse = fuse_linear_bn_eval if kind == "linear" else fuse_conv_bn_eval
    with torch.no_grad():
        # quantizer off: torch's eval-mode fusion, refimpl.fold.fold_bn and the float pair itself
        fused.weight_quantizer.enabled = False
        out = fused(x)
        assert out.dtype == dtype
        torch.testing.assert_close(out, fuse(copy.deepcopy(seq[0]), copy.deepcopy(seq[1]))(x), **tol)
        torch.testing.assert_close(out, fold_bn(seq[0], seq[1])(x), **tol)
        # unfused: another rounding order (up to ~4e-5 measured in float32)
        torch.testing.assert_close(out, seq(x), **(dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else tol))
        # quantizer on: a plain quantized layer on the folded weight, with the same grid
        fused.weight_quantizer.enabled = True
        qout = fused(x)
        ref = quantize_model(nn.Sequential(fold_bn(seq[0], seq[1])), W4).get_submodule("0")
        assert torch.equal(ref.weight_quantizer.scale, fused.weight_quantizer.scale)
        assert torch.equal(qout, ref(x))
        assert not torch.allclose(qout, out, rtol=1e-3, atol=1e-3)           # the quantizer is on
        # unfusing keeps the function bit for bit
        assert torch.equal(fused.unfused()(x), qout)


def test_keep_eval_is_bn_after_the_quantized_layer():
    seq = _pair()
    x = _input()
    q = quantize_model(seq, W4, keep_bn=True)
    assert fuse_bn(q, "keep") is q
    layer = q.get_submodule("0")
    with torch.no_grad():
        expected = seq[1](F.conv2d(x, layer.weight_quantizer(seq[0].weight), None, padding=1))
        torch.testing.assert_close(q(x), expected)
        assert not torch.allclose(q(x), seq(x), rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------------------------
# Train mode: each strategy's definition
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["conv2d", "linear"])
def test_naive_folds_the_batch_statistics(kind, dtype):
    seq = _pair(kind, bias=True, dtype=dtype)
    x = _input(kind, dtype)
    fused = _fused(seq, "naive").train()
    wq = fused.weight_quantizer
    y = _op(kind, x, seq[0].weight, seq[0].bias)
    mean, var, _ = _stats(y)
    a = seq[1].weight * torch.rsqrt(var + seq[1].eps)
    w = seq[0].weight * a.reshape([-1] + [1] * (seq[0].weight.dim() - 1))
    b = seq[0].bias * a + seq[1].bias - a * mean
    with torch.no_grad():
        expected = _op(kind, x, wq(w), b)
    out = fused(x)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.detach(), expected, **tol)
    # not the running statistics
    assert not torch.allclose(out.detach(), fused.eval()(x).detach(), rtol=1e-2, atol=1e-2)
    # quantizer off: training-mode BN on the float layer's output
    fused.train()
    wq.enabled = False
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else tol      # another rounding order
    torch.testing.assert_close(fused(x).detach(), copy.deepcopy(seq[1]).train()(y).detach(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_white_paper_corrects_the_running_fold_to_batch_statistics(dtype):
    seq = _pair("conv2d", bias=True, dtype=dtype)
    x = _input("conv2d", dtype)
    fused = _fused(seq, "white_paper").train()
    wq = fused.weight_quantizer
    out = fused(x).detach()
    bn = fused.bn                        # the running statistics as this step updated them
    y = F.conv2d(x, seq[0].weight, seq[0].bias, padding=1)
    mean, var, _ = _stats(y)
    with torch.no_grad():
        sd_run, sd_batch = torch.rsqrt(bn.running_var + bn.eps) ** -1, torch.rsqrt(var + bn.eps) ** -1
        w_run = seq[0].weight * (bn.weight / sd_run).reshape(-1, 1, 1, 1)
        bias_batch = bn.weight * (seq[0].bias - mean) / sd_batch + bn.bias
        expected = F.conv2d(x, wq(w_run), None, padding=1) * _chan(sd_run / sd_batch, y) + _chan(bias_batch, y)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, expected, **tol)
    # the quantized weight is the running fold (not the batch fold, as naive's is)
    with torch.no_grad():
        w_batch = seq[0].weight * (bn.weight / sd_batch).reshape(-1, 1, 1, 1)
        naive_like = F.conv2d(x, wq(w_batch), bias_batch, padding=1)
    assert not torch.allclose(out, naive_like, rtol=1e-4, atol=1e-4)
    # quantizer off: training-mode BN on the float layer's output
    wq.enabled = False
    torch.testing.assert_close(fused(x).detach(), copy.deepcopy(seq[1]).train()(y).detach(), **tol)


def _torch_convbn(seq, scale, qmin, qmax):
    """torch.ao's QAT ConvBn2d with seq's parameters and a per-channel fake quantizer on our grid."""
    conv, bn = seq
    fq = FakeQuantize.with_args(observer=PerChannelMinMaxObserver, quant_min=qmin, quant_max=qmax,
                                dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
    m = ConvBn2d(conv.in_channels, conv.out_channels, 3, padding=1, bias=conv.bias is not None,
                 qconfig=QConfig(activation=fq, weight=fq))
    with torch.no_grad():
        m.weight.copy_(conv.weight)
        if conv.bias is not None:
            m.bias.copy_(conv.bias)
    m.bn.load_state_dict(bn.state_dict())
    m.weight_fake_quant.disable_observer()
    m.weight_fake_quant.scale = scale.detach().clone().float()
    m.weight_fake_quant.zero_point = torch.zeros(scale.numel(), dtype=torch.int32)
    return m


@pytest.mark.parametrize("bias", [False, True])
def test_torch_strategy_matches_torch_ao_convbn2d(bias):
    seq = _pair("conv2d", bias=bias)
    x = _input("conv2d").requires_grad_(True)
    fused = _fused(seq, "torch").train()
    wq = fused.weight_quantizer
    # a min-max grid puts each channel's largest weight on a rounding tie (max|w| / s = 7.5), where
    # torch's sqrt and our rsqrt can round apart: a narrower grid, which also clips some weights
    wq.set_qparams(wq.scale * 0.77, wq.zero_point)
    ref = _torch_convbn(seq, wq.scale, wq.spec.qmin, wq.spec.qmax).train()
    g = torch.randn(16, 6, 7, 7, generator=torch.Generator().manual_seed(5))
    out, out_ref = fused(x), ref(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    (out * g).sum().backward()
    gx = x.grad.clone()
    x.grad = None
    (out_ref * g).sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-4, atol=1e-5)
    pairs = [(fused.weight, ref.weight), (fused.bn.weight, ref.bn.weight), (fused.bn.bias, ref.bn.bias)]
    if bias:
        pairs.append((fused.bias, ref.bias))
    for p, p_ref in pairs:
        assert p.grad.abs().sum() > 0
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.bn.running_mean, ref.bn.running_mean)
    torch.testing.assert_close(fused.bn.running_var, ref.bn.running_var)
    fused.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
    # the fake quantizers really quantize: without them the outputs move
    wq.enabled = False
    with torch.no_grad():
        assert not torch.allclose(fused(x), ref(x), rtol=1e-3, atol=1e-3)


def test_freeze_uses_and_keeps_the_running_statistics():
    seq = _pair("conv2d", bias=True)
    x = _input()
    fused = _fused(seq, "freeze")
    before = copy.deepcopy(fused.bn.state_dict())
    with torch.no_grad():
        eval_out = fused.eval()(x)
    fused.train()
    out = fused(x)
    assert torch.equal(out.detach(), eval_out)
    out.sum().backward()
    for k, v in fused.bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert fused.weight.grad.abs().sum() > 0 and fused.bn.weight.grad.abs().sum() > 0
    # one optimizer step moves gamma, and with it the folded weight, but not the statistics
    torch.optim.SGD(fused.parameters(), lr=0.1).step()
    assert not torch.equal(fused.bn.weight, before["weight"])
    assert torch.equal(fused.bn.running_var, before["running_var"])


@pytest.mark.parametrize("strategy", ["naive", "white_paper", "torch"])
def test_running_statistics_follow_bn_momentum(strategy):
    seq = _pair("conv2d", bias=True)
    x = _input()
    fused = _fused(seq, strategy).train()
    fused.weight_quantizer.enabled = False          # torch's BN then reads the float conv output
    y = F.conv2d(x, seq[0].weight, seq[0].bias, padding=1)
    ref_bn = copy.deepcopy(seq[1]).train()
    for _ in range(3):
        fused(x)
        ref_bn(y)
    torch.testing.assert_close(fused.bn.running_mean, ref_bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.bn.running_var, ref_bn.running_var, rtol=1e-5, atol=1e-6)
    assert int(fused.bn.num_batches_tracked) == 3
    mean, _, var_unbiased = _stats(y)
    m = seq[1].momentum
    torch.testing.assert_close(fused.bn.running_mean, (1 - m) ** 3 * seq[1].running_mean
                               + (1 - (1 - m) ** 3) * mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.bn.running_var, (1 - m) ** 3 * seq[1].running_var
                               + (1 - (1 - m) ** 3) * var_unbiased, rtol=1e-5, atol=1e-6)
    # refimpl.fold.reestimate_bn (eval model, BNs in train mode, momentum None) finds the fused BN
    fused.eval()
    assert reestimate_bn(fused, x, batch_size=len(x)) == 1
    torch.testing.assert_close(fused.bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.bn.running_var, var_unbiased, rtol=1e-5, atol=1e-6)
    assert fused.bn.momentum == m and not fused.training and not fused.bn.training


@pytest.mark.parametrize("strategy", FUSED)
def test_gradients_reach_weight_gamma_beta_and_the_quantizer(strategy):
    seq = _pair("conv2d", bias=True)
    q = fuse_bn(quantize_model(seq, W4, keep_bn=True), strategy)
    params = set_trainable(q, "lsq")
    fused = q.get_submodule("0").train()
    out = fused(_input())
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    for name, p in [("weight", fused.weight), ("bias", fused.bias), ("gamma", fused.bn.weight),
                    ("beta", fused.bn.bias)] + [("scale", p) for p in params]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------------------------
# fuse_bn / unfuse_bn on a whole model
# --------------------------------------------------------------------------------------------
def _resnet(seed=0):
    torch.manual_seed(seed)
    m = ResNetCNN(1, 10, width=8, num_blocks=2)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
                bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
                bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    return m.eval()


@pytest.mark.parametrize("strategy", FUSED)
def test_fuse_and_unfuse_a_resnet(strategy):
    fp = _resnet()
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    q = quantize_model(fp, W4A4, keep_bn=True)
    f = fuse_bn(q, strategy)
    static = quantize_model(fold_all_bn(fp), W4A4)
    # the same layers, sites and weight grids as static folding; no BN left in the graph
    assert list(quant_layers(f)) == list(quant_layers(static))
    assert all(isinstance(m, QuantLayerBN) for n, m in quant_layers(f).items() if n != "head")
    assert not any(n.op == "call_module" and isinstance(f.get_submodule(n.target), nn.BatchNorm2d)
                   for n in f.graph.nodes)
    for n, wq in weight_quantizers(f).items():
        assert torch.equal(wq.scale, weight_quantizers(static)[n].scale), n
    assert sum(isinstance(m, nn.BatchNorm2d) for m in q.modules()) == 6    # the input is not modified
    calibrate(f, x)
    calibrate(static, x)
    with torch.no_grad():
        torch.testing.assert_close(f(x), static(x), rtol=1e-5, atol=1e-5)
    # a training step, then unfuse: same eval function, the static structure
    f.train()
    f(x).square().mean().backward()
    with torch.no_grad():
        for p in f.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    freeze(f)
    f.eval()
    u = unfuse_bn(f)
    assert not any(isinstance(m, (QuantLayerBN, nn.BatchNorm2d)) for m in u.modules())
    assert type(u.stem.conv) is QuantConv2d and u.stem.conv.weight_quantizer is not f.stem.conv.weight_quantizer
    fresh = quantize_model(fold_all_bn(fp), W4A4)
    fresh.load_state_dict(u.state_dict())
    with torch.no_grad():
        assert torch.equal(u(x), f(x))
        assert torch.equal(fresh.eval()(x), f(x))
        assert not torch.equal(u(x), static(x))                 # the step changed something
    assert isinstance(f.stem.conv, QuantConvBN2d)               # unfuse_bn copies


# --------------------------------------------------------------------------------------------
# qat_pipeline
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_fp():
    """A briefly trained digits ResNet (4 epochs) and a 512-row training subset."""
    model, data = train_fp32("digits", seed=0, progress=False, epochs=4)
    return model, dataclasses.replace(data, x_train=data.x_train[:512], y_train=data.y_train[:512])


@pytest.mark.parametrize("strategy,reestimate", [("freeze", False), ("naive", False), ("naive", True),
                                                 ("white_paper", True), ("torch", False), ("torch", True)])
def test_qat_pipeline_with_a_fused_strategy(small_fp, strategy, reestimate):
    model, data = small_fp
    q, h = qat_pipeline(model, data, W4A4, epochs=1, seed=0, progress=False, bn=strategy,
                        bn_reestimation=reestimate, lr=1e-3)
    assert not any(isinstance(m, (QuantLayerBN, nn.modules.batchnorm._BatchNorm)) for m in q.modules())
    assert h["bn_merged"] is True and h["merge_clamped"] == 0
    assert ("before_reestimation_acc" in h) == reestimate
    assert evaluate(q, data.x_test, data.y_test) == h["final_acc"] > 50
    fresh = quantize_model(fold_all_bn(model), W4A4)
    fresh.load_state_dict(q.state_dict())
    x = data.x_test[:200]
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), q(x))
    # the PTQ start of a fused model is the statically folded one
    start = quantize_model(fold_all_bn(model), W4A4)
    calibrate(start, data.x_calib)
    set_trainable(start, "lsq")
    assert h["ptq_acc"] == evaluate(start, data.x_test, data.y_test)


def _pipeline_by_hand(model, data, config, bn, lr=3e-3, batch_size=128, seed=0):
    """The white paper's pipeline for bn="static"/"keep", written out step by step as it was
    before the fused strategies existed (one epoch, LSQ, no per-epoch evaluation)."""
    qmodel = quantize_model(fold_all_bn(model), config) if bn == "static" else quantize_model(model, config,
                                                                                              keep_bn=True)
    calibrate(qmodel, data.x_calib)
    qparams = set_trainable(qmodel, "lsq")
    ids = {id(p) for p in qparams}
    opt = torch.optim.Adam([{"params": [p for p in qmodel.parameters() if id(p) not in ids], "lr": lr},
                            {"params": qparams, "lr": lr / 10}], fused=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=math.ceil(len(data.x_train) / batch_size))
    eps = torch.finfo(torch.float32).eps
    quantizers = list(weight_quantizers(qmodel).values()) + list(act_quantizers(qmodel).values())

    def clamp():
        for q in quantizers:
            if isinstance(q.scale, nn.Parameter):
                q.scale.clamp_(min=eps)
    fit(qmodel, data, opt, scheduler=sched, epochs=1, batch_size=batch_size, seed=seed, after_step=clamp,
        progress=False)
    freeze(qmodel)
    qmodel.eval()
    return merge_bn(qmodel) if bn == "keep" else qmodel


@pytest.mark.parametrize("bn", ["static", "keep"])
def test_qat_pipeline_static_and_keep_are_unchanged(small_fp, bn):
    model, data = small_fp
    q, _ = qat_pipeline(model, data, W4A4, epochs=1, seed=0, progress=False, bn=bn, eval_each_epoch=False)
    ref = _pipeline_by_hand(model, data, W4A4, bn)
    sq, sr = q.state_dict(), ref.state_dict()
    assert sq.keys() == sr.keys() and all(torch.equal(sq[k], sr[k]) for k in sq)
    # and a fused strategy is a different run
    f, _ = qat_pipeline(model, data, W4A4, epochs=1, seed=0, progress=False, bn="naive", eval_each_epoch=False)
    assert not all(torch.equal(sq[k], f.state_dict()[k]) for k in sq)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------
def test_bad_strategy_lists_the_names(small_fp):
    q = quantize_model(_pair(), W4, keep_bn=True)
    with pytest.raises(ValueError, match="strategy must be one of 'keep', 'static', 'freeze', 'naive', "
                                         "'white_paper', 'torch'; got 'double'"):
        fuse_bn(q, "double")
    with pytest.raises(ValueError, match="fold_all_bn"):
        fuse_bn(q, "static")
    with pytest.raises(ValueError, match="bn must be one of 'keep', 'static', 'freeze', 'naive'"):
        qat_pipeline(*small_fp, W4A4, epochs=1, progress=False, bn="double")
    with pytest.raises(ValueError, match="bn_reestimation.*freeze"):
        qat_pipeline(*small_fp, W4A4, epochs=1, progress=False, bn="freeze", bn_reestimation=True)
    with pytest.raises(ValueError, match="strategy must be one of 'freeze', 'naive', 'white_paper', 'torch'"):
        fuse_layer_bn(q.get_submodule("0"), q.get_submodule("1"), "keep")


def test_fuse_errors_name_the_layer():
    with pytest.raises(ValueError, match="no BatchNorm"):
        fuse_bn(quantize_model(fold_all_bn(_pair()), W4), "naive")
    # a BN after a ReLU (traced by hand: quantize_model would refuse it)
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.BatchNorm2d(6)))
    with pytest.raises(ValueError, match=r"BatchNorm '2' does not directly follow a quantized layer.*'1'"):
        fuse_bn(gm, "torch")
    # a BN after a float (not quantized) conv
    gm = torch.fx.symbolic_trace(_pair())
    with pytest.raises(ValueError, match=r"BatchNorm '1' .*'0'"):
        fuse_bn(gm, "torch")
    with pytest.raises(TypeError, match="qmodel"):
        fuse_bn(_pair(), "naive")
    with pytest.raises(TypeError, match="qmodel"):
        unfuse_bn("model")
    q = quantize_model(_pair(), W4, keep_bn=True)
    layer, bn = q.get_submodule("0"), q.get_submodule("1")
    with pytest.raises(TypeError, match="layer must be"):
        fuse_layer_bn(nn.Conv2d(3, 6, 3), bn, "naive")
    with pytest.raises(TypeError, match="cannot fold BatchNorm1d into QuantConv2d"):
        fuse_layer_bn(layer, nn.BatchNorm1d(6), "naive")
    with pytest.raises(ValueError, match="num_features=4"):
        fuse_layer_bn(layer, nn.BatchNorm2d(4), "naive")
    with pytest.raises(ValueError, match="running statistics"):
        fuse_layer_bn(layer, nn.BatchNorm2d(6, track_running_stats=False), "naive")

"""Tests for refimpl.qat: the white paper's STE gradients (§4.1) against autograd and finite
differences, and the QAT pipeline (§4.4): determinism, improvement over its PTQ start, state_dict
round trip, argument errors."""

import dataclasses

import pytest
import torch
from torch import nn

from refimpl.fold import fold_all_bn
from refimpl.qat import gradient_check, qat_pipeline, ste_gradients
from refimpl.qmodel import QuantConfig, calibrate, quantize_model, set_kind_options, set_trainable, weight_quantizers
from refimpl.quant import QuantSpec, fake_quant, lsq_fake_quant, ste_fake_quant
from refimpl.train import evaluate, train_fp32

ASYM4 = QuantSpec(4, signed=False, symmetric=False)


def _points(spec, scale, zero_point, n=400, seed=0, margin=0.05):
    """x spread over the grid and half a range beyond it on both sides, kept `margin` steps away
    from rounding thresholds and region boundaries (where derivatives do not exist)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = spec.qmin - zero_point, spec.qmax - zero_point
    span = hi - lo
    u = lo - span / 2 + 2 * span * torch.rand(n, generator=g, dtype=torch.float64)
    v = u + zero_point
    keep = ((v - torch.floor(v) - 0.5).abs() > margin) & ((v - spec.qmin).abs() > margin) \
        & ((v - spec.qmax).abs() > margin)
    return u[keep] * scale


# --------------------------------------------------------------------------------------------
# §4.1: STE gradients
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,scale,zero_point", [
    (ASYM4, 0.1, 3),
    (QuantSpec(8, signed=False, symmetric=False), 0.037, 117),
    (QuantSpec(4, signed=True, symmetric=True), 0.25, 0),
    (QuantSpec(3, signed=True, symmetric=False, narrow_range=True), 1.3, -2),
])
def test_ste_gradients_match_autograd_and_finite_differences(spec, scale, zero_point):
    x = _points(spec, scale, zero_point)
    r = gradient_check(x, scale, zero_point, spec)
    regions = r["region"]
    assert set(regions.tolist()) == {0, 1, 2}          # every region is exercised
    assert bool((r["margin"] > 0.04).all())
    for p in ("x", "scale", "zero_point"):
        paper = r["paper"][p]
        # LSQ computes with a float32 step size: agreement to float32 precision
        torch.testing.assert_close(r["autograd"][p], paper, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["fd_surrogate"][p], paper, rtol=1e-6, atol=1e-6)
    # the true staircase: outside the grid the STE gradients are its exact derivatives ...
    v = x / scale + zero_point
    out = (v < spec.qmin - 0.5) | (v > spec.qmax + 0.5)   # beyond the half-step band: code clipped too
    assert out.sum() > 10
    for p in ("x", "scale", "zero_point"):
        torch.testing.assert_close(r["fd_true"][p][out], r["paper"][p][out], rtol=1e-6, atol=1e-6)
    # ... inside they are not: true d/dx = 0 (STE 1), true d/ds = round(x/s) (STE round(x/s) - x/s)
    ins = regions == 1
    u = x[ins] / scale
    torch.testing.assert_close(r["fd_true"]["x"][ins], torch.zeros_like(u), rtol=0, atol=1e-6)
    torch.testing.assert_close(r["fd_true"]["scale"][ins], torch.round(u), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(r["paper"]["scale"][ins], torch.round(u) - u, rtol=1e-9, atol=1e-9)
    assert bool((r["paper"]["x"][ins] == 1).all()) and bool((r["paper"]["x"][regions != 1] == 0).all())


def test_ste_gradients_closed_form_values():
    # hand-computed: s = 0.5, z = 2, uint4 grid [0, 15]: v = 2x + 2
    s, z = 0.5, 2
    x = torch.tensor([-1.6, 0.7, 7.9], dtype=torch.float64)   # v = -1.2 (below), 3.4 (in), 17.8 (above)
    dx, ds, dz = ste_gradients(x, s, z, ASYM4)
    assert dx.tolist() == [0.0, 1.0, 0.0]
    torch.testing.assert_close(ds, torch.tensor([0 - 2, 1 - 1.4, 15 - 2], dtype=torch.float64))
    assert dz.tolist() == [-0.5, 0.0, -0.5]


def test_ste_x_gradient_agrees_with_fake_quant_mask_away_from_the_band():
    # fake_quant masks on the rounded code; the paper's case split is on v itself: they agree
    # except for v within half a step outside [qmin, qmax]
    spec, s, z = ASYM4, 0.1, 3
    x = torch.linspace(-1.0, 2.0, 3001, dtype=torch.float32, requires_grad=True)
    fake_quant(x, torch.tensor(s), torch.tensor(z), spec).sum().backward()
    dx, _, _ = ste_gradients(x.detach(), s, z, spec)
    v = x.detach() / s + z
    band = ((v > spec.qmax) & (v <= spec.qmax + 0.5)) | ((v < spec.qmin) & (v >= spec.qmin - 0.5))
    assert band.any()
    assert torch.equal(x.grad[~band], dx[~band])
    assert bool((dx[band] == 0).all()) and bool((x.grad[band] == 1).sum() > 0.9 * band.sum())


def test_ste_gradients_per_channel_loss_gradient_matches_lsq():
    # a loss gradient: sum over elements of dL/dx_hat * d x_hat/d param, per channel
    g = torch.Generator().manual_seed(1)
    spec = QuantSpec(4, signed=False, symmetric=False, axis=1)
    x = torch.randn(6, 3, 5, generator=g, dtype=torch.float64) * 2
    s = torch.tensor([0.2, 0.35, 0.5], dtype=torch.float64)
    z = torch.tensor([7.0, 4.0, 9.0], dtype=torch.float64)
    w = torch.randn(6, 3, 5, generator=g, dtype=torch.float64)    # dL/dx_hat
    dx, ds, dz = ste_gradients(x, s, z, spec)
    xa, sa, za = x.clone().requires_grad_(), s.clone().requires_grad_(), z.clone().requires_grad_()
    (lsq_fake_quant(xa, sa, spec, grad_scale=1.0, offset=-sa * za) * w).sum().backward()
    torch.testing.assert_close(xa.grad, w * dx)
    torch.testing.assert_close(sa.grad, (w * ds).sum(dim=(0, 2)))
    torch.testing.assert_close(za.grad, (w * dz).sum(dim=(0, 2)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_ste_gradients_dtypes_follow_input(dtype):
    x = torch.tensor([-3.0, 0.3, 9.0]).to(dtype)
    outs = ste_gradients(x, 0.5, 1, ASYM4)
    assert all(o.dtype == dtype and o.shape == x.shape for o in outs)
    assert outs[0].tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ste_gradients([1.0], 0.1, 0, ASYM4), TypeError, "x"),
    (lambda: ste_gradients(torch.tensor([1, 2]), 0.1, 0, ASYM4), TypeError, "x"),
    (lambda: ste_gradients(torch.ones(3), 0.0, 0, ASYM4), ValueError, "scale"),
    (lambda: ste_gradients(torch.ones(3), 0.1, 2.5, ASYM4), ValueError, "zero_point"),
    (lambda: ste_gradients(torch.ones(3), 0.1, 16, ASYM4), ValueError, "zero_point"),
    (lambda: ste_gradients(torch.ones(3), "0.1", 0, ASYM4), TypeError, "scale"),
    (lambda: ste_gradients(torch.ones(3), 0.1, 0, "uint4"), TypeError, "spec"),
    (lambda: ste_gradients(torch.ones(2, 3), torch.ones(2), 0, ASYM4), ValueError, "per-tensor"),
    (lambda: ste_gradients(torch.ones(2, 3), torch.ones(2), 0, QuantSpec(4, axis=1)), ValueError, "scale"),
    (lambda: gradient_check(torch.ones(2, 2), 0.1, 0, ASYM4), ValueError, "1-d"),
    (lambda: gradient_check(torch.ones(2), 0.1, 0, ASYM4, h=0.5), ValueError, "h"),
])
def test_ste_gradients_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_ste_gradients_match_ste_fake_quant():
    # (a) autograd through the project's trainable quantizer in "ste" mode (refimpl.quant),
    # one (scale, zero_point) per element; away from the half-step band where qmodel masks on
    # the rounded code (as torch) and the paper's case split on the unrounded value
    spec, s, z = ASYM4, 0.1, 3
    x = _points(spec, s, z)
    v = x / s + z
    x = x[(v < spec.qmin - 0.55) | ((v > spec.qmin) & (v < spec.qmax)) | (v > spec.qmax + 0.55)]
    n = x.numel()
    xa = x.clone().requires_grad_()
    sa = torch.full((n,), s, dtype=torch.float64, requires_grad=True)
    za = torch.full((n,), float(z), dtype=torch.float64, requires_grad=True)
    ste_fake_quant(xa, sa, za, spec.per_channel(0)).sum().backward()
    dx, ds, dz = ste_gradients(x, s, z, spec)
    torch.testing.assert_close(xa.grad, dx)
    torch.testing.assert_close(sa.grad, ds)
    torch.testing.assert_close(za.grad, dz)


# --------------------------------------------------------------------------------------------
# §4.4: the QAT pipeline
# --------------------------------------------------------------------------------------------
W4A4 = QuantConfig(weight_bits=4, act_bits=4)


@pytest.fixture(scope="module")
def brief_fp():
    """A briefly trained digits ResNet (4 epochs) and its full data split."""
    return train_fp32("digits", seed=0, progress=False, epochs=4)


@pytest.fixture(scope="module")
def small_fp(brief_fp):
    """The briefly trained digits ResNet and a 512-row training subset (keeps each QAT epoch short)."""
    model, data = brief_fp
    small = dataclasses.replace(data, x_train=data.x_train[:512], y_train=data.y_train[:512])
    return model, small


def _state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_qat_pipeline_is_deterministic(small_fp):
    model, data = small_fp
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a, ha = qat_pipeline(model, data, W4A4, epochs=1, seed=3, progress=False)
    b, hb = qat_pipeline(model, data, W4A4, epochs=1, seed=3, progress=False)
    c, _ = qat_pipeline(model, data, W4A4, epochs=1, seed=4, progress=False)
    assert _state_equal(a, b) and ha["loss"] == hb["loss"] and ha["test_acc"] == hb["test_acc"]
    assert not _state_equal(a, c)
    # skipping the per-epoch evaluations changes nothing else
    d, hd = qat_pipeline(model, data, W4A4, epochs=1, seed=3, progress=False, eval_each_epoch=False)
    assert _state_equal(a, d) and hd["test_acc"] == [] and hd["final_acc"] == ha["final_acc"]
    # the FP32 model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(ha) == {"ptq_acc", "loss", "test_acc", "final_acc", "seconds", "cpu_seconds", "weight_params",
                       "act_params"} and len(ha["loss"]) == 1


@pytest.mark.parametrize("trainable", ["lsq", "ste"])
def test_qat_improves_over_its_ptq_initialisation_at_w2a8(brief_fp, trainable):
    """QAT recovers at least half of the accuracy that PTQ loses, measured against its own PTQ
    start and FP32 model in the same run, in a setting where PTQ loses most of it by construction.

    2-bit per-tensor min-max weights: codes {-2, -1, 0, 1} with step max|w| / 1.5, so every weight
    below max|w| / 3 in magnitude rounds to 0 (about two thirds of them) and the PTQ start is
    far below FP32, whatever the float path (measured 20-51 %; chance is 10 %). The former W4A4
    per-tensor version of this test hinged on one CPU's float path: its PTQ start moves with the
    float path (seed 0: 89.6-92.0 %) and the seed (88-95 %), and with it the room QAT has to
    improve (FP32 - PTQ 1.8-8.0 points), against a fixed "+5 points".
    Measured for this test (FP32 seeds 0-7; seeds 0-2 also with ATen's default kernels, with
    oneDNN, and at AVX-512 without MKL_CBWR): FP32 - PTQ 46-77 points; QAT closes 74-94 % of it
    (mean 86 %, sd 6 %), at least 16 points more than half."""
    model, data = brief_fp
    cfg = QuantConfig(weight_bits=2, act_bits=8, weight_per_channel=False)
    fp = evaluate(model, data.x_test, data.y_test)
    q, h = qat_pipeline(model, data, cfg, trainable=trainable, epochs=3, lr=1e-3, seed=0, progress=False)
    lost = fp - h["ptq_acc"]
    assert lost > 25, (fp, h)                                        # the start leaves room to recover
    # no training (or a broken update) recovers nothing: 0 % of the loss
    assert h["test_acc"][-1] - h["ptq_acc"] >= 0.5 * lost, (fp, h)
    assert evaluate(q, data.x_test, data.y_test) == h["final_acc"]
    # freezing the quantizers keeps the function up to float rounding: at most 4 of 450 test
    # predictions may change (measured: none)
    assert abs(h["final_acc"] - h["test_acc"][-1]) <= 1.0


def test_qat_state_dict_round_trip(small_fp, tmp_path):
    model, data = small_fp
    q, _ = qat_pipeline(model, data, W4A4, trainable="lsq", epochs=1, seed=0, progress=False)
    torch.save(q.state_dict(), tmp_path / "qat.pt")
    fresh = quantize_model(fold_all_bn(model), W4A4)
    fresh.load_state_dict(torch.load(tmp_path / "qat.pt", weights_only=True))
    fresh.eval()
    x = data.x_test[:200]
    with torch.no_grad():
        assert torch.equal(fresh(x), q(x))
    # and it is not just the untrained model: the PTQ start gives different outputs
    start = quantize_model(fold_all_bn(model), W4A4)
    calibrate(start, data.x_calib)
    with torch.no_grad():
        assert not torch.equal(start(x), q(x))


@pytest.mark.parametrize("kind", ["dsq", "pot", "apot"])
def test_qat_pipeline_trains_other_kinds(small_fp, kind):
    """Each trainable kind runs through the pipeline: its own tensors move, the PTQ start is measured
    in that kind, and after training an affine kind is frozen to "fixed", a non-uniform one kept."""
    model, data = small_fp
    cfg = QuantConfig(weight_bits=4, act_bits=4)
    opts = {"rcf": False} if kind != "dsq" else None
    q, h = qat_pipeline(model, data, cfg, trainable=kind, epochs=1, seed=0, progress=False, kind_options=opts)
    start = quantize_model(fold_all_bn(model), cfg)
    calibrate(start, data.x_calib)
    set_trainable(start, kind)
    if opts:
        set_kind_options(start, opts)
    assert h["ptq_acc"] == evaluate(start, data.x_test, data.y_test)
    wqs = weight_quantizers(q)
    if kind == "dsq":
        assert {m.kind for m in wqs.values()} == {"fixed"}
    else:
        assert {m.kind for m in wqs.values()} == {kind} and not any(m.rcf for m in wqs.values())
        # without RCF alpha learns only from clipped values (a min-max weight range clips none at
        # the start), so only some alphas move
        moved = [m.alpha.item() != weight_quantizers(start)[n].alpha.item() for n, m in wqs.items()]
        assert any(moved)
    # the scalar parameters are recorded at the start and after every step (16 steps of 32)
    alphas = h["act_params"]["input"]["alpha"]
    assert len(alphas) == 1 + len(data.x_train) // 128 and len(set(alphas)) > 1
    if kind == "dsq":
        assert set(h["weight_params"]["stem.conv"]) == {"alpha"}     # lower/upper are per channel
        assert alphas[0] == pytest.approx(0.2)
    assert evaluate(q, data.x_test, data.y_test) == h["final_acc"]


def test_qat_pipeline_keep_bn_non_uniform_kind_is_not_merged(small_fp):
    model, data = small_fp
    cfg = QuantConfig(weight_bits=4, act_bits=4, weight_per_channel=False)
    q, h = qat_pipeline(model, data, cfg, trainable="apot", epochs=1, seed=0, progress=False, bn="keep",
                        kind_options={"weight_normalization": True}, eval_each_epoch=False)
    assert h["bn_merged"] is False and h["merge_clamped"] == 0
    assert any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in q.modules())
    assert all(m.weight_normalization for m in weight_quantizers(q).values())
    # an affine kind with per-tensor weights cannot merge either: BN stays in float (academic setting)
    q, h = qat_pipeline(model, data, cfg, trainable="lsq", epochs=1, progress=False, bn="keep",
                        eval_each_epoch=False)
    assert h["bn_merged"] is False and h["merge_clamped"] == 0
    assert any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in q.modules())
    q.eval()
    assert abs(h["final_acc"] - evaluate(q, data.x_test, data.y_test)) == 0


@pytest.mark.parametrize("kw,exc,match", [
    (dict(fp_model="net"), TypeError, "fp_model"),
    (dict(trainable="pwlq"), ValueError, "trainable must be one of.*dsq"),
    (dict(kind_options=[("rcf", True)]), TypeError, "kind_options"),
    (dict(kind_options={"apot_k": 3}), ValueError, "apot_k"),
    (dict(data=(1, 2)), TypeError, "data"),
    (dict(config=dict(weight_bits=4)), TypeError, "config"),
    (dict(trainable="none"), ValueError, "trainable"),
    (dict(epochs=0), ValueError, "epochs"),
    (dict(epochs=1.5), TypeError, "epochs"),
    (dict(lr=0.0), ValueError, "lr"),
    (dict(lr="1e-3"), TypeError, "lr"),
    (dict(quant_lr=-1.0), ValueError, "quant_lr"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(progress="no"), TypeError, "progress"),
    (dict(eval_each_epoch=1), TypeError, "eval_each_epoch"),
])
def test_qat_pipeline_bad_input(small_fp, kw, exc, match):
    model, data = small_fp
    args = dict(fp_model=model, data=data, config=W4A4)
    args.update(kw)
    with pytest.raises(exc, match=match):
        qat_pipeline(args.pop("fp_model"), args.pop("data"), args.pop("config"), **args)


def test_qat_keep_bn_merges_and_reestimates(small_fp):
    """bn="keep": BN trains with batch statistics and is merged into per-channel scales at the end;
    bn_reestimation recomputes its statistics first. The returned model is BN-free, its state_dict
    loads into the statically folded qmodel, and it equals the unmerged model it came from."""
    model, data = small_fp
    q, h = qat_pipeline(model, data, W4A4, epochs=1, seed=0, progress=False, bn="keep", bn_reestimation=True)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in q.modules())
    assert {"before_reestimation_acc", "merge_clamped"} <= set(h)
    assert evaluate(q, data.x_test, data.y_test) == h["final_acc"]
    fresh = quantize_model(fold_all_bn(model), W4A4)
    fresh.load_state_dict(q.state_dict())
    x = data.x_test[:200]
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), q(x))
    # without re-estimation the run is the same up to the end of training: the keep-BN model
    # before re-estimation scores what the no-re-estimation run scores after merging (same
    # function up to activation codes that a float rounding flips)
    _, h2 = qat_pipeline(model, data, W4A4, epochs=1, seed=0, progress=False, bn="keep")
    assert h2["test_acc"] == h["test_acc"] and "before_reestimation_acc" not in h2
    assert abs(h2["final_acc"] - h["before_reestimation_acc"]) <= 0.3


@pytest.mark.parametrize("kw,exc,match", [
    (dict(bn="double"), ValueError, "bn"),
    (dict(bn_reestimation=True), ValueError, "bn_reestimation"),
    (dict(bn_reestimation=1), TypeError, "bn_reestimation"),
])
def test_qat_pipeline_bad_bn_options(small_fp, kw, exc, match):
    model, data = small_fp
    cfg = kw.pop("config", W4A4)
    with pytest.raises(exc, match=match):
        qat_pipeline(model, data, cfg, epochs=1, progress=False, **kw)

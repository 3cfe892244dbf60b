"""Tests for refimpl.train: accuracy on digits, determinism, evaluate() semantics, argument errors."""

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

from refimpl.data import load_digits_split, load_mnist1d_split
from refimpl.models import make_model
from refimpl._checks import check_positive
from refimpl.train import evaluate, fit, train, train_fp32


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(seed=0)


@pytest.fixture(scope="module")
def trained_digits():
    """The chapters' default digits model: (model, data)."""
    return train_fp32("digits", seed=0, progress=False)


def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_digits_reaches_target_accuracy(trained_digits):
    model, data = trained_digits
    acc = evaluate(model, data.x_test, data.y_test)
    assert isinstance(acc, float)
    assert acc >= 95.0, f"digits test accuracy {acc:.2f} % < 95 %"
    assert not model.training


def test_train_fp32_is_deterministic():
    a, _ = train_fp32("digits", seed=1, progress=False, epochs=2)
    b, _ = train_fp32("digits", seed=1, progress=False, epochs=2)
    c, _ = train_fp32("digits", seed=2, progress=False, epochs=2)
    assert _state_equal(a, b)  # every weight and BN running statistic, bit for bit
    assert not _state_equal(a, c)


def test_train_same_init_same_seed_identical(digits):
    torch.manual_seed(0)
    init = make_model("digits", width=8)
    a, b, c = copy.deepcopy(init), copy.deepcopy(init), copy.deepcopy(init)
    _, ha = train(a, digits, epochs=2, seed=7, progress=False)
    _, hb = train(b, digits, epochs=2, seed=7, progress=False)
    assert ha == hb and _state_equal(a, b)
    # Same initial weights, another seed: only the batch order differs, and that shows.
    train(c, digits, epochs=2, seed=8, progress=False)
    assert not _state_equal(a, c)


def test_history_and_in_place(digits):
    torch.manual_seed(0)
    model = make_model("digits", width=8)
    before = [p.detach().clone() for p in model.parameters()]
    returned, history = train(model, digits, epochs=3, progress=False)
    assert returned is model and model.training
    assert len(history["loss"]) == 3
    assert all(isinstance(v, float) and math.isfinite(v) for v in history["loss"])
    assert history["loss"][-1] < history["loss"][0]
    assert any(not torch.equal(p, q) for p, q in zip(before, model.parameters()))


def test_train_fp32_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    train_fp32("digits", seed=0, progress=False, epochs=1, data_kw=dict(calib_size=8), model_kw=dict(width=4))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_mnist1d_end_to_end_small():
    data = load_mnist1d_split(num_samples=300, calib_size=16)
    torch.manual_seed(0)
    model = make_model("mnist1d", width=8)
    _, history = train(model, data, epochs=3, batch_size=32, progress=False)
    assert history["loss"][-1] < history["loss"][0]
    assert 0.0 <= evaluate(model, data.x_test, data.y_test) <= 100.0


def test_progress_bar_goes_to_stderr_only_when_asked(digits, capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)     # make sets it for every check
    model = make_model("digits", width=4)
    train(model, digits, epochs=1, progress=False)
    assert capsys.readouterr().err == ""
    train(model, digits, epochs=1, progress=True)
    assert "train" in capsys.readouterr().err
    monkeypatch.setenv("TQDM_DISABLE", "1")
    train(model, digits, epochs=1, progress=True)
    assert capsys.readouterr().err == ""


def _reference_loop(model, data, opt, sched, epochs, batch_size, seed):
    """The training loop written out, independently of fit: the same RNG use and operation order."""
    x, y = data.x_train, data.y_train
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        total = torch.zeros(())
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += loss.detach() * len(idx)
        losses.append(total.item() / len(x))
    return {"loss": losses}


@pytest.mark.parametrize("with_scheduler", [True, False])
def test_fit_equals_the_loop_written_out(digits, with_scheduler):
    torch.manual_seed(0)
    init = make_model("digits", width=4)
    runs = []
    for loop in (fit, _reference_loop):
        model = copy.deepcopy(init)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3, fused=True)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40) if with_scheduler else None
        if loop is fit:
            history = fit(model, digits, opt, scheduler=sched, epochs=2, batch_size=100, seed=5, progress=False)
        else:
            history = loop(model, digits, opt, sched, 2, 100, 5)
        runs.append((model, history))
    (a, ha), (b, hb) = runs
    assert ha == hb and _state_equal(a, b) and a.training


def test_train_is_fit_with_adamw_and_cosine_decay(digits):
    torch.manual_seed(0)
    init = make_model("digits", width=4)
    a, b = copy.deepcopy(init), copy.deepcopy(init)
    _, ha = train(a, digits, epochs=2, lr=4e-3, batch_size=64, seed=2, weight_decay=1e-3, progress=False)
    opt = torch.optim.AdamW(b.parameters(), lr=4e-3, weight_decay=1e-3, fused=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2 * math.ceil(len(digits.x_train) / 64))
    hb = fit(b, digits, opt, scheduler=sched, epochs=2, batch_size=64, seed=2, progress=False)
    assert ha == hb and _state_equal(a, b)


def test_fit_callbacks(digits, capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)     # make sets it for every check
    model = make_model("digits", width=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    steps, epochs = [], []

    def after_step():
        steps.append(torch.is_grad_enabled())

    def after_epoch(epoch, loss):
        epochs.append((epoch, loss))
        return {"acc": "12.34"}

    history = fit(model, digits, opt, epochs=2, batch_size=256, seed=0, after_step=after_step,
                  after_epoch=after_epoch, progress=True, desc="custom")
    assert steps == [False] * (2 * math.ceil(len(digits.x_train) / 256))   # once per step, under no_grad
    assert epochs == list(enumerate(history["loss"]))
    err = capsys.readouterr().err
    assert "custom" in err and "acc=12.34" in err


def test_fit_bad_arguments(digits):
    model = make_model("digits", width=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    kw = dict(epochs=1, batch_size=64, seed=0, progress=False)
    with pytest.raises(TypeError, match="optimizer"):
        fit(model, digits, "adam", **kw)
    with pytest.raises(TypeError, match="scheduler"):
        fit(model, digits, opt, scheduler="cosine", **kw)
    with pytest.raises(TypeError, match="after_step"):
        fit(model, digits, opt, after_step=1, **kw)
    with pytest.raises(TypeError, match="after_epoch"):
        fit(model, digits, opt, after_epoch="print", **kw)
    with pytest.raises(TypeError, match="progress"):
        fit(model, digits, opt, **{**kw, "progress": "yes"})
    with pytest.raises(TypeError, match="epochs"):
        fit(model, digits, opt, batch_size=64, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        fit(model, digits, opt, **{**kw, "batch_size": 0})
    with pytest.raises(TypeError, match="model"):
        fit("net", digits, opt, **kw)
    with pytest.raises(TypeError, match="data"):
        fit(model, (digits.x_train, digits.y_train), opt, **kw)
    short = dataclasses.replace(digits, y_train=digits.y_train[:-1])
    with pytest.raises(ValueError, match="rows"):
        fit(model, short, opt, **kw)


@pytest.mark.parametrize("value,allow_zero,exc", [
    (0.0, False, ValueError), (-1, True, ValueError), (float("inf"), False, ValueError),
    (float("nan"), True, ValueError), ("1", False, TypeError), (True, False, TypeError), (None, False, TypeError),
])
def test_check_positive_rejects(value, allow_zero, exc):
    with pytest.raises(exc, match="lr"):
        check_positive(value, "lr", allow_zero=allow_zero)


def test_check_positive_accepts():
    assert check_positive(3, "lr") == 3.0 and isinstance(check_positive(3, "lr"), float)
    assert check_positive(0, "weight_decay", allow_zero=True) == 0.0


def test_evaluate_known_accuracy():
    # A "model" that always predicts class 0: accuracy is the share of zeros in y.
    model = nn.Linear(3, 4)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    x = torch.randn(10, 3)
    y = torch.tensor([0, 0, 0, 1, 2, 3, 1, 2, 3, 0])
    assert evaluate(model, x, y) == 40.0
    assert evaluate(model, x, y, batch_size=3) == 40.0


def test_evaluate_batch_size_invariant(trained_digits):
    model, data = trained_digits
    assert evaluate(model, data.x_test, data.y_test, batch_size=7) == evaluate(model, data.x_test, data.y_test)


def test_evaluate_restores_modes_and_leaves_no_grad(digits):
    model = make_model("digits", width=4)
    model.train()
    model.blocks[0].bn1.eval()  # a mixed state must survive too
    modes = {n: m.training for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate(model, digits.x_test, digits.y_test)
    assert {n: m.training for n, m in model.named_modules()} == modes
    # Eval mode: BN running statistics were not updated.
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    evaluate(model, digits.x_test, digits.y_test)
    assert not model.training


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(epochs=0), ValueError, "epochs"),
        (dict(epochs=1.5), TypeError, "epochs"),
        (dict(lr=0.0), ValueError, "lr"),
        (dict(lr=-1e-3), ValueError, "lr"),
        (dict(lr=float("nan")), ValueError, "lr"),
        (dict(lr="1e-3"), TypeError, "lr"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(weight_decay=-1.0), ValueError, "weight_decay"),
        (dict(seed=-1), ValueError, "seed"),
    ],
)
def test_train_bad_arguments(digits, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        train(make_model("digits", width=4), digits, progress=False, **kwargs)


def test_train_bad_model_or_data(digits):
    with pytest.raises(TypeError, match="model"):
        train("not a model", digits)
    with pytest.raises(TypeError, match="data"):
        train(make_model("digits", width=4), (digits.x_train, digits.y_train))


def test_evaluate_bad_arguments(digits):
    model = make_model("digits", width=4)
    with pytest.raises(ValueError, match="y"):
        evaluate(model, digits.x_test, digits.y_test[:-1])
    with pytest.raises(TypeError, match="x"):
        evaluate(model, digits.x_test.numpy(), digits.y_test)
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, digits.x_test[:0], digits.y_test[:0])
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, digits.x_test, digits.y_test, batch_size=0)


def test_train_fp32_unknown_dataset():
    with pytest.raises(ValueError, match="'digits'.*'mnist1d'"):
        train_fp32("cifar10")


# ------------------------------------------------------------------------------------------
# arch="mobilenetv2" and the resnet default
# ------------------------------------------------------------------------------------------
from refimpl.models import MobileNetV2CNN, ResNetCNN  # noqa: E402
from refimpl.train import TRAIN_DEFAULTS  # noqa: E402

_SMALL = dict(data_kw=dict(calib_size=8), model_kw=dict(width=4), epochs=1, batch_size=64)


@pytest.mark.parametrize("dataset", ["digits", "mnist1d"])
def test_train_fp32_mobilenet_deterministic(dataset):
    kw = dict(_SMALL, data_kw=dict(calib_size=8, **({"num_samples": 300} if dataset == "mnist1d" else {})))
    a, data = train_fp32(dataset, seed=1, progress=False, arch="mobilenetv2", **kw)
    b, _ = train_fp32(dataset, seed=1, progress=False, arch="mobilenetv2", **kw)
    c, _ = train_fp32(dataset, seed=2, progress=False, arch="mobilenetv2", **kw)
    assert type(a) is MobileNetV2CNN and a.dims == (2 if dataset == "digits" else 1) and not a.training
    assert _state_equal(a, b)
    assert not _state_equal(a, c)
    # It trained: the weights moved away from the seed's initialisation.
    torch.manual_seed(1)
    init = make_model(dataset, "mobilenetv2", width=4)
    assert not _state_equal(a, init)
    assert 0.0 <= evaluate(a, data.x_test, data.y_test) <= 100.0


def test_train_fp32_default_arch_is_resnet():
    # The default path builds the same ResNet as arch="resnet", bit for bit after training.
    a, _ = train_fp32("digits", seed=0, progress=False, **_SMALL)
    b, _ = train_fp32("digits", seed=0, progress=False, arch="resnet", **_SMALL)
    assert type(a) is ResNetCNN and _state_equal(a, b)
    # The resnet defaults the chapters were measured with.
    assert TRAIN_DEFAULTS[("digits", "resnet")] == dict(model=dict(width=16, num_blocks=2),
                                                        train=dict(epochs=10, lr=5e-3, batch_size=128))
    assert TRAIN_DEFAULTS[("mnist1d", "resnet")] == dict(model=dict(width=16, num_blocks=2),
                                                         train=dict(epochs=15, lr=5e-3, batch_size=128))
    assert {k for k in TRAIN_DEFAULTS} == {(d, a) for d in ("digits", "mnist1d") for a in ("resnet", "mobilenetv2")}


def test_train_fp32_unknown_arch():
    with pytest.raises(ValueError, match="arch.*'resnet'.*'mobilenetv2'"):
        train_fp32("digits", arch="vgg")

"""Tests for refimpl.data: shapes, splits, standardisation, determinism and argument errors."""

import random

import numpy as np
import pytest
import torch

from refimpl.data import DataSplit, load_dataset, load_digits_split, load_mnist1d_split

# Small MNIST-1D so the whole file runs in a few seconds (5000 samples take several).
MNIST1D_KW = dict(num_samples=500, calib_size=64)


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(seed=0)


@pytest.fixture(scope="module")
def mnist1d():
    return load_mnist1d_split(seed=0, **MNIST1D_KW)


def _rows_in(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bool (len(a),): whether each row of a equals some row of b exactly."""
    return (a.flatten(1)[:, None, :] == b.flatten(1)[None, :, :]).all(-1).any(1)


def _check_split(d: DataSplit, input_shape, n_train, n_test, n_calib):
    assert isinstance(d, DataSplit)
    assert d.input_shape == input_shape and d.num_classes == 10
    for x, n in ((d.x_train, n_train), (d.x_test, n_test), (d.x_calib, n_calib)):
        assert x.dtype == torch.float32 and x.shape == (n, *input_shape)
        assert torch.isfinite(x).all()
    for y, n in ((d.y_train, n_train), (d.y_test, n_test)):
        assert y.dtype == torch.int64 and y.shape == (n,)
        assert set(y.tolist()) == set(range(10))


def test_digits_shapes_and_dtypes(digits):
    assert digits.name == "digits"
    # 1797 images, 25 % test.
    _check_split(digits, (1, 8, 8), 1347, 450, 256)


def test_mnist1d_shapes_and_dtypes(mnist1d):
    assert mnist1d.name == "mnist1d"
    _check_split(mnist1d, (1, 40), 400, 100, 64)


@pytest.mark.parametrize("which", ["digits", "mnist1d"])
def test_standardised_with_train_statistics(which, request):
    d = request.getfixturevalue(which)
    assert abs(d.x_train.mean().item()) < 1e-4
    assert abs(d.x_train.double().std(unbiased=False).item() - 1) < 1e-4
    # The test set is mapped with the same train statistics, so it is only roughly standard.
    assert abs(d.x_test.mean().item()) < 0.2
    assert d.std > 0


def test_digits_raw_scale_recoverable(digits):
    # Undoing the standardisation gives the original pixels / 16: multiples of 1/16 in [0, 1].
    raw = digits.x_test.double() * digits.std + digits.mean
    assert raw.min() > -1e-5 and raw.max() < 1 + 1e-5
    assert torch.allclose(raw * 16, (raw * 16).round(), atol=1e-4)


@pytest.mark.parametrize("which", ["digits", "mnist1d"])
def test_no_overlap_and_calib_from_train(which, request):
    d = request.getfixturevalue(which)
    assert not _rows_in(d.x_test, d.x_train).any()
    assert _rows_in(d.x_calib, d.x_train).all()
    # Drawn without replacement.
    assert len(torch.unique(d.x_calib.flatten(1), dim=0)) == len(d.x_calib)


def test_digits_split_is_stratified(digits):
    train_frac = torch.bincount(digits.y_train, minlength=10) / len(digits.y_train)
    test_frac = torch.bincount(digits.y_test, minlength=10) / len(digits.y_test)
    assert (train_frac - test_frac).abs().max() < 0.01


@pytest.mark.parametrize(
    "load", [load_digits_split, lambda seed, **kw: load_mnist1d_split(seed=seed, **MNIST1D_KW, **kw)]
)
def test_determinism_by_seed(load):
    a, b, c = load(seed=3), load(seed=3), load(seed=4)
    for field in ("x_train", "y_train", "x_test", "y_test", "x_calib"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.x_train, c.x_train)


def test_calib_size_does_not_change_split():
    a, b = load_digits_split(seed=1, calib_size=16), load_digits_split(seed=1, calib_size=300)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.x_test, b.x_test)
    assert a.x_calib.shape[0] == 16 and b.x_calib.shape[0] == 300


def test_test_fraction():
    d = load_digits_split(test_fraction=0.5, calib_size=10)
    assert len(d.x_test) in (898, 899) and len(d.x_train) + len(d.x_test) == 1797
    m = load_mnist1d_split(num_samples=200, test_fraction=0.25, calib_size=10)
    assert (len(m.x_train), len(m.x_test)) == (150, 50)


def test_mnist1d_leaves_global_rngs_alone():
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    load_mnist1d_split(num_samples=20, calib_size=4)
    assert np.random.rand() == expected_np
    assert random.random() == expected_py


def test_load_dataset_dispatch():
    a = load_dataset("digits", seed=2, calib_size=8)
    b = load_digits_split(seed=2, calib_size=8)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.x_calib, b.x_calib)
    m = load_dataset("mnist1d", seed=2, num_samples=50, calib_size=4)
    assert m.name == "mnist1d" and m.input_shape == (1, 40)


def test_repr_is_short(digits):
    assert len(repr(digits)) < 200 and "digits" in repr(digits)


def test_frozen(digits):
    with pytest.raises(Exception):
        digits.name = "other"


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(test_fraction=0.0), ValueError, "test_fraction"),
        (dict(test_fraction=1.0), ValueError, "test_fraction"),
        (dict(test_fraction=-0.1), ValueError, "test_fraction"),
        (dict(test_fraction="0.2"), TypeError, "test_fraction"),
        (dict(calib_size=0), ValueError, "calib_size"),
        (dict(calib_size=-5), ValueError, "calib_size"),
        (dict(calib_size=2.5), TypeError, "calib_size"),
        (dict(calib_size=1348), ValueError, "calib_size"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=1.0), TypeError, "seed"),
    ],
)
def test_digits_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        load_digits_split(**kwargs)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(num_samples=5), ValueError, "num_samples"),
        (dict(num_samples=100.0), TypeError, "num_samples"),
        (dict(num_samples=100, calib_size=81), ValueError, "calib_size"),
        (dict(num_samples=100, calib_size=0), ValueError, "calib_size"),
        (dict(num_samples=100, test_fraction=1.5), ValueError, "test_fraction"),
        (dict(num_samples=10, test_fraction=0.95, calib_size=1), ValueError, "empty"),
    ],
)
def test_mnist1d_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        load_mnist1d_split(**kwargs)


def test_load_dataset_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="name.*'digits'.*'mnist1d'"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="name"):
        load_dataset(["digits"])

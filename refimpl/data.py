"""Small classification datasets for the book, built locally (no downloads at run time).

Two datasets, both returned as a :class:`DataSplit` of CPU tensors:

* ``"digits"``  -- scikit-learn's bundled 8x8 handwritten digits (1797 images), inputs (N, 1, 8, 8).
* ``"mnist1d"`` -- MNIST-1D (Greydanus, 2020), generated procedurally by the ``mnist1d`` package,
  inputs (N, 1, 40).

Inputs are standardised with a single mean/std computed on the training set only, so the
test set never leaks into preprocessing. A scalar (rather than per-feature) statistic keeps
constant pixels (the digits' borders are always 0) well defined and the data's shape intact.
"""

from __future__ import annotations

import numbers
import random
from dataclasses import dataclass

import numpy as np
import torch

from refimpl._checks import check_choice, check_int

__all__ = ["DataSplit", "DATASETS", "load_digits_split", "load_mnist1d_split", "load_dataset"]


# eq=False: field-wise == on tensors is ambiguous; two splits are equal only if identical.
@dataclass(frozen=True, eq=False)
class DataSplit:
    """A train/test/calibration split of one dataset, as tensors on the CPU.

    ::

        x_train: float32 (N_train, *input_shape);  y_train: int64 (N_train,) in [0, num_classes)
        x_test:  float32 (N_test, *input_shape);   y_test:  int64 (N_test,)
        x_calib: float32 (calib_size, *input_shape), rows drawn from x_train without replacement,
                 for post-training calibration of quantizers.
        mean, std: the scalar training-set statistics used to standardise every x.

    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_calib: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    mean: float
    std: float

    def __repr__(self) -> str:
        # The default repr would print every tensor.
        return (
            f"DataSplit(name={self.name!r}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, train={len(self.x_train)}, "
            f"test={len(self.x_test)}, calib={len(self.x_calib)})"
        )


def _check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in the open interval (0, 1), got {value}")
    return float(value)


def _make_split(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    calib_size: int,
    seed: int,
) -> DataSplit:
    """Standardise with train statistics, draw the calibration subset and wrap as tensors."""
    if calib_size > len(x_train):
        raise ValueError(
            f"calib_size must be <= the number of training samples ({len(x_train)}), got {calib_size}"
        )
    # Statistics in float64 so they do not depend on summation order in float32.
    mean = float(x_train.mean(dtype=np.float64))
    std = float(x_train.std(dtype=np.float64))

    def standardise(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((x - mean) / std).astype(np.float32))

    xt, xs = standardise(x_train), standardise(x_test)
    # A separate stream from the split's, so changing calib_size never changes the split.
    rng = np.random.default_rng([seed, 1])
    calib_idx = np.sort(rng.choice(len(xt), size=calib_size, replace=False))
    return DataSplit(
        name=name,
        x_train=xt,
        y_train=torch.from_numpy(y_train.astype(np.int64)),
        x_test=xs,
        y_test=torch.from_numpy(y_test.astype(np.int64)),
        x_calib=xt[torch.from_numpy(calib_idx)].clone(),
        num_classes=num_classes,
        input_shape=tuple(xt.shape[1:]),
        mean=mean,
        std=std,
    )


def load_digits_split(seed: int = 0, test_fraction: float = 0.25, calib_size: int = 256) -> DataSplit:
    """Scikit-learn's 8x8 digits as a seeded, stratified train/test split.

    Returns a DataSplit with x float32 (N, 1, 8, 8), standardised with train statistics after
    scaling pixels from [0, 16] to [0, 1]; y int64 (N,), 10 classes. With the defaults there are
    1347 training and 450 test images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    seed = check_int(seed, "seed", low=0)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    calib_size = check_int(calib_size, "calib_size", low=1)

    bunch = load_digits()
    x = (bunch.images / 16.0).reshape(-1, 1, 8, 8)
    y = bunch.target
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return _make_split("digits", x_train, y_train, x_test, y_test, 10, calib_size, seed)


def load_mnist1d_split(
    seed: int = 0, num_samples: int = 5000, calib_size: int = 256, test_fraction: float = 0.2
) -> DataSplit:
    """MNIST-1D generated locally from ``seed`` (never downloaded): 1-D signals of length 40.

    Returns a DataSplit with x float32 (N, 1, 40) standardised with train statistics; y int64
    (N,), 10 classes. ``num_samples`` is split into train and test by ``test_fraction``
    (the package's default 80/20 split gives 4000/1000 with the defaults).
    Generation is pure Python and slowish: about 7 s for 5000 samples on one CPU core.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    seed = check_int(seed, "seed", low=0)
    # make_dataset draws num_samples // 10 signals per class.
    num_samples = check_int(num_samples, "num_samples", low=10)
    calib_size = check_int(calib_size, "calib_size", low=1)
    test_fraction = _check_fraction("test_fraction", test_fraction)

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    args.train_split = 1.0 - test_fraction
    # make_dataset reseeds the global NumPy and Python RNGs; restore them so that loading
    # data has no side effects on the caller's randomness.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        raw = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    # make_dataset standardises with statistics of all samples, test included; that affine map
    # is undone by re-standardising with train statistics in _make_split, so nothing leaks.
    x_train, x_test = raw["x"], raw["x_test"]
    if len(x_train) == 0 or len(x_test) == 0:
        raise ValueError(
            f"num_samples={num_samples} with test_fraction={test_fraction} leaves an empty split"
        )
    return _make_split(
        "mnist1d",
        x_train.reshape(len(x_train), 1, -1),
        raw["y"],
        x_test.reshape(len(x_test), 1, -1),
        raw["y_test"],
        10,
        calib_size,
        seed,
    )


DATASETS = {"digits": load_digits_split, "mnist1d": load_mnist1d_split}


def load_dataset(name: str, seed: int = 0, **kwargs) -> DataSplit:
    """Load a dataset by name ("digits" or "mnist1d"); kwargs go to its loader."""
    check_choice(name, "name", tuple(DATASETS))
    return DATASETS[name](seed=seed, **kwargs)

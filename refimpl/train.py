"""A short, deterministic full-precision training loop and an accuracy metric.

Determinism: the model's initial weights come from ``seed`` (in :func:`train_fp32`), and the
mini-batch order from a ``torch.Generator`` seeded with ``seed``; there is no dropout. So the
same seed gives bit-identical weights on the same machine, device and thread count.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from refimpl._checks import check_choice, check_int, check_positive
from refimpl._progress import progress_bar
from refimpl.data import DataSplit, load_dataset
from refimpl.graph import device_of
from refimpl.models import make_model

__all__ = ["TRAIN_DEFAULTS", "fit", "train", "evaluate", "train_fp32"]

# Per-(dataset, arch) defaults of train_fp32, tuned to train in seconds on one CPU thread.
# ResNet, measured with torch.set_num_threads(1) on a 2-core CPU: digits 99.1 % test accuracy
# after ~5.5 s of training, mnist1d 98.4 % after ~14 s (plus ~7 s to generate the data).
# MobileNetV2 (one thread, on the same 2-core CPU while other jobs held 2-5 cores' worth of
# load, so the times are upper bounds), seeds 0/1/2: digits 97.8/98.4/98.4 % after 12.0/9.9/9.0 s
# (31.9k parameters); mnist1d 97.3/98.2/97.1 % after 53/29/33 s (13.3k parameters). For mnist1d
# the first block already halves the length (40 -> 20 -> 10): the full-resolution expanded
# activations (4x the width at length 40) made a step ~2x slower (width 16, default blocks,
# seed 0: 98.9 % after 87 s under the same load).
TRAIN_DEFAULTS = {
    ("digits", "resnet"): dict(model=dict(width=16, num_blocks=2), train=dict(epochs=10, lr=5e-3, batch_size=128)),
    ("mnist1d", "resnet"): dict(model=dict(width=16, num_blocks=2), train=dict(epochs=15, lr=5e-3, batch_size=128)),
    ("digits", "mobilenetv2"): dict(model=dict(width=16), train=dict(epochs=10, lr=5e-3, batch_size=128)),
    ("mnist1d", "mobilenetv2"): dict(
        model=dict(width=12, blocks=((4, 1, 2), (4, 1, 1), (4, 1.5, 2), (4, 1.5, 1), (4, 2, 1))),
        train=dict(epochs=15, lr=5e-3, batch_size=128)),
}


def fit(model: nn.Module, data, optimizer: torch.optim.Optimizer, *, scheduler=None, epochs: int,
        batch_size: int, seed: int, after_step=None, after_epoch=None, progress: bool = True,
        desc: str = "train") -> dict:
    """Mini-batch training with cross-entropy: the loop of :func:`train` and ``refimpl.qat.qat_pipeline``.

    No paper of its own (plain mini-batch training); the white paper's QAT (§4.4) runs through
    it too. Each epoch draws a permutation of the training rows from a ``torch.Generator``
    seeded with ``seed`` on the data's device (the global RNG is not used) and walks it in
    batches of ``batch_size`` (the last one may be smaller), moved to the model's device. Per batch:
    cross-entropy (mean over the batch), ``optimizer.zero_grad(set_to_none=True)``, backward,
    ``optimizer.step()``, ``scheduler.step()`` (per step, when given), then ``after_step()``
    under ``torch.no_grad()`` (e.g. to project parameters back onto their domain). After each
    epoch its mean loss is appended to the history, then ``after_epoch(epoch, loss)`` runs and
    may return a dict of extra progress-bar fields.

    model: nn.Module mapping a batch of ``data.x_train`` rows (B, ...) to logits (B, classes),
    put in train mode (and left so). data: any object with ``x_train`` (N, ...) float and
    ``y_train`` (N,) int64 (e.g. ``refimpl.data.DataSplit``). optimizer: over the parameters to
    train; scheduler: an LR scheduler stepped once per batch, or None.
    Returns history = {"loss": list of ``epochs`` Python floats, the mean training loss per epoch}.
    """
    epochs, batch_size, seed = _check_fit_args(model, data, optimizer, scheduler, epochs, batch_size, seed,
                                               after_step, after_epoch, progress)
    x, y = data.x_train, data.y_train
    device = device_of(model, default=torch.device("cpu"))
    n = len(x)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    history = {"loss": []}
    model.train()
    bar = progress_bar(range(epochs), progress, desc=desc, unit="epoch")
    for epoch in bar:
        perm = torch.randperm(n, generator=gen, device=x.device)
        total = torch.zeros((), device=device)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            xb, yb = x[idx].to(device), y[idx].to(device)
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if after_step is not None:
                with torch.no_grad():
                    after_step()
            # Accumulate on device: .item() per step would force a sync on accelerators.
            total += loss.detach() * len(idx)
        history["loss"].append(total.item() / n)
        extra = after_epoch(epoch, history["loss"][-1]) if after_epoch is not None else None
        bar.set_postfix(loss=f"{history['loss'][-1]:.4f}", **(extra or {}))
    return history


def _check_fit_args(model, data, optimizer, scheduler, epochs, batch_size, seed, after_step, after_epoch,
                    progress) -> tuple[int, int, int]:
    """Validate fit's arguments; return (epochs, batch_size, seed) as ints."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not all(hasattr(data, a) for a in ("x_train", "y_train")):
        raise TypeError(f"data must be a DataSplit (with x_train and y_train), got {type(data).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if scheduler is not None and not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        raise TypeError(f"scheduler must be a torch.optim.lr_scheduler.LRScheduler or None, got "
                        f"{type(scheduler).__name__}")
    for name, fn in (("after_step", after_step), ("after_epoch", after_epoch)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {progress!r}")
    if len(data.x_train) != len(data.y_train):
        raise ValueError(f"data.x_train has {len(data.x_train)} rows but data.y_train has {len(data.y_train)}")
    return (check_int(epochs, "epochs", low=1), check_int(batch_size, "batch_size", low=1),
            check_int(seed, "seed", low=0))


def train(
    model: nn.Module,
    data: DataSplit,
    epochs: int = 10,
    lr: float = 5e-3,
    batch_size: int = 128,
    seed: int = 0,
    weight_decay: float = 1e-4,
    progress: bool = True,
) -> tuple[nn.Module, dict]:
    """Train ``model`` in place on ``data.x_train``/``data.y_train`` with cross-entropy.

    AdamW (Loshchilov & Hutter 2019) with a per-step cosine learning-rate decay from ``lr`` to 0
    (SGDR's schedule without restarts, Loshchilov & Hutter 2017), run by :func:`fit`: batches
    are drawn without replacement from a permutation seeded by ``seed`` on the data's device,
    then moved to the model's device.

    model: nn.Module mapping (B, ...) inputs to (B, classes) logits; data: ``x_train`` (N, ...)
    float, ``y_train`` (N,) int64. Returns ``(model, history)`` with ``history["loss"]`` the
    mean training loss of each epoch (list of ``epochs`` Python floats). The model is left in
    train mode.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not all(hasattr(data, a) for a in ("x_train", "y_train")):
        raise TypeError(f"data must be a DataSplit (with x_train and y_train), got {type(data).__name__}")
    epochs = check_int(epochs, "epochs", low=1)
    lr = check_positive(lr, "lr")
    batch_size = check_int(batch_size, "batch_size", low=1)
    weight_decay = check_positive(weight_decay, "weight_decay", allow_zero=True)

    # fused: its square root is the exact vector instruction, the same on every CPU (refimpl.numerics)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    steps = epochs * math.ceil(len(data.x_train) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    history = fit(model, data, opt, scheduler=sched, epochs=epochs, batch_size=batch_size, seed=seed,
                  progress=progress, desc="train")
    return model, history


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy in percent (Python float) of ``model`` on inputs x (N, ...) and int labels y (N,).

    Runs in eval mode without autograd, then restores every submodule's train/eval flag.

    Used in :ref:`ch1-sec-the-network-used-throughout`, :ref:`ch2-sec-rounding`,
    :ref:`ch3-sec-ranges-on-a-trained-network`, :ref:`ch5-sec-white-paper-post-training`,
    :ref:`ch6-sec-white-paper-quantization-aware`, :ref:`ch8-sec-pwlq`, :ref:`ch7-sec-easyquant`,
    :ref:`ch9-sec-dsq`, :ref:`ch10-sec-log-pot-apot`, :ref:`ch11-sec-mqbench`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"y must have shape (N,) matching x's first dimension; got x {tuple(x.shape)}, "
                         f"y {tuple(y.shape)}")
    if len(y) == 0:
        raise ValueError("x and y are empty; accuracy is undefined")
    batch_size = check_int(batch_size, "batch_size", low=1)

    # Per-module flags, not just model.training: a caller may have frozen some BN layers.
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        device = device_of(model, default=torch.device("cpu"))
        correct = torch.zeros((), dtype=torch.int64, device=device)
        for i in range(0, len(x), batch_size):
            pred = model(x[i : i + batch_size].to(device)).argmax(dim=1)
            correct += (pred == y[i : i + batch_size].to(device)).sum()
    finally:
        for m, mode in modes.items():
            m.training = mode
    return 100.0 * correct.item() / len(y)


def train_fp32(dataset_name: str, seed: int = 0, progress: bool = True, data_kw=None, model_kw=None,
               arch: str = "resnet", **train_kw):
    """Load ``dataset_name``, build its ``arch`` model from ``seed`` and train it: returns ``(model, data)``.

    ``arch``: "resnet" (ResNetCNN) or "mobilenetv2" (MobileNetV2CNN). ``data_kw`` go to
    :func:`refimpl.data.load_dataset`, ``model_kw`` to :func:`refimpl.models.make_model` and
    the remaining keywords to :func:`train`, each overriding ``TRAIN_DEFAULTS[(dataset_name,
    arch)]``. The model is returned in eval mode, on the CPU.

    Used in :ref:`ch1-sec-the-network-used-throughout`, :ref:`ch2-sec-rounding`,
    :ref:`ch3-sec-ranges-on-a-trained-network`, :ref:`ch4-sec-a-real-layer-through-a-kernel`.
    """
    check_choice(dataset_name, "dataset_name", tuple(dict.fromkeys(d for d, _ in TRAIN_DEFAULTS)))
    check_choice(arch, "arch", tuple(dict.fromkeys(a for _, a in TRAIN_DEFAULTS)))
    data = load_dataset(dataset_name, seed=seed, **(data_kw or {}))
    defaults = TRAIN_DEFAULTS[(dataset_name, arch)]
    # Seed weight init in a forked RNG so building the model leaves the caller's global RNG alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model(dataset_name, arch, **{**defaults["model"], **(model_kw or {})})
    train(model, data, seed=seed, progress=progress, **{**defaults["train"], **train_kw})
    return model.eval(), data

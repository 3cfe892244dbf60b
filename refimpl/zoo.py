"""Trained FP32 models of the book, memoized on disk so that chapters share one training run.

:func:`pretrained` returns exactly what :func:`refimpl.train.train_fp32` returns for the same
arguments — training is deterministic (seeded weights and batch order, one thread) — and stores
the result under a key that covers everything the result depends on: the arguments, the training
defaults, the PyTorch version, :func:`refimpl.numerics.signature` (one value on every x86-64 CPU
under the book's numerics configuration; else the platform, the dispatch level and what of the
configuration is off), and the source code of ``refimpl.models``, ``refimpl.train``,
``refimpl.data`` and ``refimpl.numerics``. Change any of them and the model is trained afresh. The
cache lives in ``$REFIMPL_CACHE`` if set, else ``.cache/refimpl`` at the repository root; delete it
at will. Files are loaded with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch

from . import data as _data
from . import models as _models
from . import numerics as _numerics
from . import train as _train
from ._checks import check_choice, check_int

__all__ = ["pretrained", "cache_dir", "cache_key"]

_ROOT = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    """The directory of cached models: ``$REFIMPL_CACHE`` or ``<repository>/.cache/refimpl``."""
    return Path(os.environ.get("REFIMPL_CACHE") or _ROOT / ".cache" / "refimpl")


def cache_key(dataset_name: str, arch: str, seed: int) -> str:
    """Hex digest of everything a trained model depends on (see the module docstring)."""
    h = hashlib.sha256()
    entry = _train.TRAIN_DEFAULTS.get((dataset_name, arch))
    # kernels, threads and libraries' code paths change float results (refimpl.numerics)
    h.update(json.dumps([dataset_name, arch, seed, repr(entry), torch.__version__,
                         _numerics.signature()]).encode())
    for mod in (_models, _train, _data, _numerics):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:24]


def pretrained(dataset_name: str, arch: str = "resnet", seed: int = 0, progress: bool = True):
    """``(model, data)`` as ``train_fp32(dataset_name, seed, arch=arch)`` gives, from the cache
    when present (``progress``: show the training when it runs). model: eval mode, CPU; data:
    :class:`refimpl.data.DataSplit`.

    Used in :ref:`ch5-sec-white-paper-post-training`,
    :ref:`ch6-sec-white-paper-quantization-aware`, :ref:`ch8-sec-pwlq`, :ref:`ch7-sec-easyquant`,
    :ref:`ch9-sec-dsq`, :ref:`ch10-sec-log-pot-apot`, :ref:`ch11-sec-mqbench`, :ref:`ch12-sec-deployment`.
    """
    check_choice(dataset_name, "dataset_name", tuple(_data.DATASETS))
    check_choice(arch, "arch", tuple(dict.fromkeys(a for _, a in _train.TRAIN_DEFAULTS)))
    seed = check_int(seed, "seed", low=0)
    path = cache_dir() / f"{dataset_name}-{arch}-{seed}-{cache_key(dataset_name, arch, seed)}.pt"
    if path.exists():
        try:
            saved = torch.load(path, weights_only=True)
            model = _models.make_model(dataset_name, arch,
                                       **_train.TRAIN_DEFAULTS[(dataset_name, arch)]["model"])
            model.load_state_dict(saved["model"])
            return model.eval(), _data.DataSplit(**saved["data"])
        except Exception:  # a truncated or foreign file: train afresh and overwrite it
            pass
    model, split = _train.train_fp32(dataset_name, seed=seed, progress=progress, arch=arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")   # per process: two may train the same model at once
    torch.save({"model": model.state_dict(), "data": dataclasses.asdict(split)}, tmp)
    tmp.replace(path)   # atomic: a concurrent reader never sees half a file
    return model, split


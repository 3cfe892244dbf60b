"""Capture what flows through a model's modules: forward hooks over batched inputs, in one place.

Every tool that looks inside a model uses this module: the chapters' activation histograms,
bias correction's per-channel output means (DFQ §4.2), AdaRound's per-layer inputs and outputs
(Nagel et al. 2020 §4), and the hook-based activation fake quantization of a float model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from ._checks import check_choice, check_int
from .graph import device_of

__all__ = ["forward_hooks", "run_batches", "capture_activations"]

WHERE = ("output", "input")


class _Stop(Exception):
    """Raised by an input hook to end the forward pass early (nothing after it is needed)."""


def _check_model(model):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


@contextmanager
def forward_hooks(model: nn.Module, hooks: Mapping[str, Callable], where: str = "output", stop: bool = False):
    """Context manager: ``hooks[name]`` called on every forward of submodule ``name``, removed on exit.

    where="output": ``fn(module, inputs, output)``; a return value other than None replaces the
    output (torch's forward-hook rule). where="input": ``fn(module, inputs)`` before the module
    runs; with ``stop=True`` the forward pass then ends there (:func:`run_batches` expects it),
    which saves computing the rest of the model. Raises ValueError naming unknown modules.
    """
    _check_model(model)
    check_choice(where, "where", WHERE)
    modules = dict(model.named_modules())
    missing = [n for n in hooks if n not in modules]
    if missing:
        raise ValueError(f"modules not found in the model: {missing}; available: {[n for n in modules if n]}")

    def pre(fn):
        def call(module, inputs):
            fn(module, inputs)
            if stop:
                raise _Stop
        return call

    if where == "output":
        handles = [modules[n].register_forward_hook(fn) for n, fn in hooks.items()]
    else:
        handles = [modules[n].register_forward_pre_hook(pre(fn)) for n, fn in hooks.items()]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def run_batches(model: nn.Module, x: torch.Tensor, batch_size: int = 512, eval_mode: bool = True,
                after_batch: Callable[[], None] | None = None) -> None:
    """Run ``model`` over x (N, ...) in batches of ``batch_size``, without autograd, for its hooks.

    Each batch is moved to the model's device. eval_mode: run in eval mode and restore the
    model's mode afterwards (else leave the mode as it is). A forward ended by a stopping input
    hook (:func:`forward_hooks` with ``stop=True``) is not an error. ``after_batch()`` is called
    after each batch.
    """
    _check_model(model)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    batch_size = check_int(batch_size, "batch_size", 1)
    device = device_of(model)
    was_training = model.training
    if eval_mode:
        model.eval()
    try:
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size]
            try:
                model(xb if device is None else xb.to(device))
            except _Stop:
                pass
            if after_batch is not None:
                after_batch()
    finally:
        model.train(was_training)


def capture_activations(model: nn.Module, x: torch.Tensor, names: Iterable[str] | None = None,
                        module_types: tuple[type, ...] = (nn.ReLU, nn.ReLU6, nn.Linear),
                        batch_size: int = 512, where: str = "output", stop: bool = False) -> dict[str, torch.Tensor]:
    """Outputs (or inputs) of the named submodules, or of every module of ``module_types``, on x.

    Runs ``model`` in eval mode (restoring its mode afterwards) over x (N, ...) in batches and
    returns {module name: tensor concatenated over the batch dimension}, in the order of
    ``names`` (module order when names is None), detached, in the model's dtype. where="input":
    each module's first input; ``stop=True`` ends each forward at the (single) named module.
    A module called several times in one forward (a shared ReLU) would be ambiguous: ValueError.

    Used in :ref:`ch1-sec-symmetric-and-asymmetric-grids`, :ref:`ch2-sec-clipping`,
    :ref:`ch3-sec-activations`, :ref:`ch4-sec-a-real-layer-through-a-kernel`,
    :ref:`ch8-sec-what-pwlq-costs-at-inference`, :ref:`ch10-sec-logquant`.
    """
    _check_model(model)
    modules = dict(model.named_modules())
    if names is None:
        wanted = [n for n, m in modules.items() if n and isinstance(m, module_types)]
    else:
        wanted = [names] if isinstance(names, str) else list(names)
    if not wanted:
        raise ValueError("no module to capture: give names or module_types present in the model")
    if stop and len(wanted) != 1:
        raise ValueError(f"stop=True ends the forward at one module: give one name, got {wanted}")
    outputs: dict[str, list[torch.Tensor]] = {n: [] for n in wanted}
    calls: dict[str, int] = {}

    def record(name):
        def fn(_module, inputs, output=None):
            calls[name] = calls.get(name, 0) + 1
            outputs[name].append((inputs[0] if where == "input" else output).detach())
        return fn

    def check_reuse():
        reused = [n for n, c in calls.items() if c > 1]
        calls.clear()
        if reused:
            raise ValueError(f"modules called more than once per forward (ambiguous): {reused}")

    with forward_hooks(model, {n: record(n) for n in wanted}, where=where, stop=stop):
        run_batches(model, x, batch_size, after_batch=check_reuse)
    return {n: torch.cat(v) for n, v in outputs.items() if v}

"""Model-level inspection: capture the tensors flowing through a model's modules."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


@torch.no_grad()
def capture_activations(model: nn.Module, x: torch.Tensor, names: Iterable[str] | None = None,
                        module_types: tuple[type, ...] = (nn.ReLU, nn.ReLU6, nn.Linear),
                        batch_size: int = 512) -> dict[str, torch.Tensor]:
    """Outputs of the named submodules (or of every module of ``module_types``) on inputs ``x``.

    Runs ``model`` in eval mode (restoring its mode afterwards) over ``x`` in batches and returns
    {module name: output tensor concatenated over the batch dimension}, in module order.
    A module used several times in one forward (a shared ReLU) would be ambiguous: it raises.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    modules = dict(model.named_modules())
    if names is None:
        wanted = [n for n, m in modules.items() if n and isinstance(m, module_types)]
    else:
        wanted = list(names)
        missing = [n for n in wanted if n not in modules]
        if missing:
            raise ValueError(f"names not found in the model: {missing}; available: {[n for n in modules if n]}")
    if not wanted:
        raise ValueError("no module to capture: give names or module_types present in the model")
    outputs: dict[str, list[torch.Tensor]] = {n: [] for n in wanted}
    calls: dict[str, int] = {}

    def hook(name):
        def fn(_module, _inp, out):
            calls[name] = calls.get(name, 0) + 1
            outputs[name].append(out.detach())
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in wanted]
    was_training = model.training
    model.eval()
    try:
        for i in range(0, x.shape[0], batch_size):
            calls.clear()
            model(x[i:i + batch_size])
            reused = [n for n, c in calls.items() if c > 1]
            if reused:
                raise ValueError(f"modules called more than once per forward (ambiguous): {reused}")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: torch.cat(v) for n, v in outputs.items() if v}

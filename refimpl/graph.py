"""The model graph: tracing with torch.fx, the kinds of layers and activations, and the patterns
(layer pairs, chains) that BN folding, cross-layer equalization, quantizer insertion and
AdaRound look for.

One place for the rules, so that every transform agrees on what a "layer" or a "ReLU" is.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["device_of"]


def device_of(module: nn.Module, default: torch.device | None = None) -> torch.device | None:
    """The device of ``module``'s first parameter, else of its first buffer, else ``default``."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    t = next(module.parameters(), None)
    if t is None:
        t = next(module.buffers(), None)
    return t.device if t is not None else default

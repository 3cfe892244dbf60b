"""Per-channel geometry of a layer's weight: ranges, rescaling, and the bias edits of DFQ.

Cross-layer equalization rescales a layer's output channels and the next layer's input
channels (DFQ, Nagel et al. 2019, §4.1; white paper eqs. 20-22); high-bias absorption and
bias correction add per-channel vectors to biases (DFQ §4.1-§4.2; white paper eqs. 23-28).
Grouped and depthwise convolutions are handled through :func:`input_index`.
"""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_choice
from ..graph import in_channels, is_weight_layer

__all__ = ["input_index", "weight_ranges", "scale_output_channels", "scale_input_channels", "add_bias",
           "response_to_constant_input"]


def input_index(layer: nn.Module) -> torch.Tensor:
    """(C_out, C_in / groups) long tensor: the global input channel that weight[o, i] multiplies.

    For groups g, output channel o belongs to group o // (C_out / g) and its local input i is the
    global channel group * (C_in / g) + i (Linear: g = 1).
    """
    w = layer.weight
    groups = getattr(layer, "groups", 1)
    c_out, c_in_g = w.shape[0], w.shape[1]
    group = torch.arange(c_out, device=w.device) // (c_out // groups)
    return group[:, None] * c_in_g + torch.arange(c_in_g, device=w.device)[None, :]


def weight_ranges(layer: nn.Module, side: str = "out", weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel weight range ``r_i = max |W|`` over the entries of channel i (DFQ §4.1).

    side="out": per output channel (C_out,); side="in": per input channel (C_in,) — for a
    grouped/depthwise conv, the entries of all output channels that read input channel i.
    weight: use this tensor (the layer's weight shape) instead of ``layer.weight``.
    Returns a detached tensor in the weight's dtype. (Positive per-channel scaling scales
    max|W| and max-min alike, so CLE equalizes either definition.)

    Used in :ref:`ch5-sec-per-tensor-weights-and-the`.
    """
    if not is_weight_layer(layer):
        raise TypeError(f"layer must be a Conv1d/Conv2d/Conv3d/Linear, got {type(layer).__name__}")
    check_choice(side, "side", ("out", "in"))
    w = (layer.weight if weight is None else weight).detach()
    a = w.abs().reshape(w.shape[0], w.shape[1], -1).amax(-1)  # (C_out, C_in/groups)
    if side == "out":
        return a.amax(1)
    r = torch.zeros(in_channels(layer), dtype=a.dtype, device=a.device)
    return r.scatter_reduce(0, input_index(layer).reshape(-1), a.reshape(-1), reduce="amax")


def scale_output_channels(layer: nn.Module, s: torch.Tensor) -> None:
    """In place: W <- S^-1 W, b <- S^-1 b, S = diag(s) over output channels (white paper eq. 21)."""
    w = layer.weight
    shape = (-1,) + (1,) * (w.dim() - 1)
    w.data.div_(s.to(w.dtype).reshape(shape))
    if layer.bias is not None:
        layer.bias.data.div_(s.to(w.dtype))


def scale_input_channels(layer: nn.Module, s: torch.Tensor) -> None:
    """In place: W <- W S over input channels, through the group structure (white paper eq. 21)."""
    w = layer.weight
    idx = input_index(layer)
    w.data.mul_(s.to(w.dtype)[idx].reshape(idx.shape + (1,) * (w.dim() - 2)))


def add_bias(layer: nn.Module, delta: torch.Tensor) -> None:
    """In place: b <- b + delta (C_out,), creating a zero bias first when the layer has none."""
    w = layer.weight
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                  requires_grad=w.requires_grad)
    layer.bias.data.add_(delta.to(w.dtype))


def response_to_constant_input(layer: nn.Module, v: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """(C_out,) sum_{i,k} W[o, i, k] v[input channel of i]: the layer's response (without bias) to
    an input that is v_c on every position of channel c (white paper eq. 24, 28; zero padding
    ignored). weight: use this tensor instead of ``layer.weight`` (e.g. the error W~ - W)."""
    w = (layer.weight if weight is None else weight).detach()
    ws = w.reshape(w.shape[0], w.shape[1], -1).sum(-1)  # (C_out, C_in/groups)
    return (ws * v.to(ws.dtype)[input_index(layer)]).sum(1)

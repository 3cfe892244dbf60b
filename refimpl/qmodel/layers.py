"""Quantized layers: subclasses of the float layers with the same parameters, whose weight is
fake-quantized in forward (white paper §2.3, Fig. 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["QuantLayer", "QuantConv1d", "QuantConv2d", "QuantConv3d", "QuantLinear", "QUANT_CLASSES"]


class QuantLayer:
    """Mixin: ``weight_quantizer`` fake-quantizes ``weight`` in forward.

    A subclass says only how the float layer computes with a given weight
    (``forward_with_weight``); the quantized forward is that with :meth:`quantized_weight`.
    """

    def quantized_weight(self) -> torch.Tensor:
        """The weight used in forward: fake-quantized (or as is when the quantizer is disabled)."""
        return self.weight_quantizer(self.weight)

    def forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer's forward with a given weight (AdaRound's soft-quantized weight)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_weight(x, self.quantized_weight())


class _QuantConv(QuantLayer):
    def forward_with_weight(self, x, weight):
        return self._conv_forward(x, weight, self.bias)


class QuantConv1d(_QuantConv, nn.Conv1d):
    """nn.Conv1d with a fake-quantized weight (white paper §2.3)."""


class QuantConv2d(_QuantConv, nn.Conv2d):
    """nn.Conv2d with a fake-quantized weight (white paper §2.3)."""


class QuantConv3d(_QuantConv, nn.Conv3d):
    """nn.Conv3d with a fake-quantized weight (white paper §2.3)."""


class QuantLinear(QuantLayer, nn.Linear):
    """nn.Linear with a fake-quantized weight (white paper §2.3)."""

    def forward_with_weight(self, x, weight):
        return F.linear(x, weight, self.bias)


# the float layer -> its quantized subclass (quantize_model swaps the instance's class)
QUANT_CLASSES = {nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Conv3d: QuantConv3d, nn.Linear: QuantLinear}

"""A small ResNet-style CNN with BatchNorm, for 2-D (digits) or 1-D (MNIST-1D) inputs.

Every layer is its own named submodule (``stem.conv``, ``blocks.0.bn1``, ``head``, ...) and
``forward`` has no data-dependent control flow, so ``torch.fx.symbolic_trace`` gives a graph
in which later chapters can fold BatchNorm into convolutions and insert quantizers.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from refimpl._checks import check_choice, check_int

__all__ = ["BasicBlock", "ResNetCNN", "make_model", "MODEL_DEFAULTS"]

_LAYERS = {
    1: (nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d),
    2: (nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d),
}


def _conv_bn(dims: int, c_in: int, c_out: int, kernel_size: int, stride: int) -> tuple[nn.Module, nn.Module]:
    conv_cls, bn_cls, _ = _LAYERS[dims]
    # No conv bias: the BatchNorm that follows would cancel it (folding BN creates the bias later).
    conv = conv_cls(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
    return conv, bn_cls(c_out)


class BasicBlock(nn.Module):
    """Residual block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    Input (N, c_in, *spatial) float; output (N, c_out, *spatial / stride). The shortcut is
    nn.Identity when the shape is unchanged, else a 1x1 conv + BN projection ``shortcut.conv``,
    ``shortcut.bn``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, dims: int = 2):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(dims, c_in, c_out, 3, stride)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = _conv_bn(dims, c_out, c_out, 3, 1)
        if stride == 1 and c_in == c_out:
            self.shortcut = nn.Identity()
        else:
            conv, bn = _conv_bn(dims, c_in, c_out, 1, stride)
            self.shortcut = nn.Sequential(OrderedDict(conv=conv, bn=bn))
        # A separate ReLU module per site, so each activation is its own node for quantizers.
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCNN(nn.Module):
    """Small ResNet: stem conv-BN-ReLU, ``num_blocks`` BasicBlocks, global average pool, Linear.

    Block 0 keeps the stem's width and resolution; every odd-indexed block (block 1, 3, ...)
    halves the resolution (stride 2) and doubles the width, ResNet-style.
    Input float (N, in_channels, H, W) for dims=2 or (N, in_channels, L) for dims=1;
    output float logits (N, num_classes).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 16,
        num_blocks: int = 2,
        dims: int = 2,
    ):
        super().__init__()
        in_channels = check_int(in_channels, "in_channels", low=1)
        num_classes = check_int(num_classes, "num_classes", low=2)
        width = check_int(width, "width", low=1)
        num_blocks = check_int(num_blocks, "num_blocks", low=0)
        dims = check_int(dims, "dims", low=1, high=2)
        self.dims = dims

        conv, bn = _conv_bn(dims, in_channels, width, 3, 1)
        self.stem = nn.Sequential(OrderedDict(conv=conv, bn=bn, relu=nn.ReLU()))
        blocks, c = [], width
        for i in range(num_blocks):
            stride, c_out = (2, 2 * c) if i % 2 == 1 else (1, c)
            blocks.append(BasicBlock(c, c_out, stride, dims))
            c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = _LAYERS[dims][2](1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.pool(self.blocks(self.stem(x)))))


MODEL_DEFAULTS = {
    "digits": dict(in_channels=1, num_classes=10, dims=2),
    "mnist1d": dict(in_channels=1, num_classes=10, dims=1),
}


def make_model(dataset_name: str, **kw) -> ResNetCNN:
    """A ResNetCNN shaped for ``dataset_name`` ("digits" or "mnist1d"); kw override any argument."""
    check_choice(dataset_name, "dataset_name", tuple(MODEL_DEFAULTS))
    return ResNetCNN(**{**MODEL_DEFAULTS[dataset_name], **kw})

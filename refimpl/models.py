"""Small CNNs with BatchNorm, for 2-D (digits) or 1-D (MNIST-1D) inputs.

* ``ResNetCNN``: ResNet-style, Conv-BN-ReLU with residual adds (the book's default model).
* ``MobileNetV2CNN``: MobileNetV2-style inverted residual blocks with depthwise convolutions and
  ReLU6 (Sandler et al. 2018) -- the white paper's hard case for per-tensor weight quantization
  (Nagel et al. 2021, §2.4 and §3.2: depthwise kernels can have widely spread per-channel ranges).

Every layer is its own named submodule (``stem.conv``, ``blocks.0.bn1``, ``head``, ...) and
``forward`` has no data-dependent control flow, so ``torch.fx.symbolic_trace`` gives a graph
in which later chapters can fold BatchNorm into convolutions and insert quantizers.
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict

import torch
from torch import nn

from refimpl._checks import check_choice, check_int

__all__ = ["BasicBlock", "ResNetCNN", "InvertedResidual", "MobileNetV2CNN", "make_model", "MODEL_DEFAULTS",
           "ARCHITECTURES", "MOBILENET_BLOCKS"]

_LAYERS = {
    1: (nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d),
    2: (nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d),
}


def _conv_bn(dims: int, c_in: int, c_out: int, kernel_size: int, stride: int,
             groups: int = 1) -> tuple[nn.Module, nn.Module]:
    conv_cls, bn_cls, _ = _LAYERS[dims]
    # No conv bias: the BatchNorm that follows would cancel it (folding BN creates the bias later).
    conv = conv_cls(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=False)
    return conv, bn_cls(c_out)


class BasicBlock(nn.Module):
    """Residual block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    Input ``(N, c_in, *spatial)`` float; output ``(N, c_out, *spatial / stride)``. The shortcut is
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


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted residual block (Sandler et al. 2018, Table 1).

    expand (1x1 Conv-BN-ReLU6, c_in -> c_in * expansion), depthwise (k x k Conv-BN-ReLU6,
    groups = channels, stride ``stride``), project (1x1 Conv-BN, linear: no activation), plus
    the input when ``stride == 1 and c_in == c_out`` (``self.residual``). Layers are named
    ``expand_conv``, ``expand_bn``, ``expand_relu``, ``dw_conv``, ``dw_bn``, ``dw_relu``,
    ``project_conv``, ``project_bn``. Input ``(N, c_in, *spatial)`` float; output
    ``(N, c_out, *ceil(spatial / stride))``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, expansion: int = 4, kernel_size: int = 3,
                 dims: int = 2):
        super().__init__()
        hidden = c_in * expansion
        self.expand_conv, self.expand_bn = _conv_bn(dims, c_in, hidden, 1, 1)
        self.expand_relu = nn.ReLU6()
        # groups = channels: one k x k filter per channel, the layer whose per-channel weight
        # ranges spread widely (white paper §2.4) -- keep it depthwise.
        self.dw_conv, self.dw_bn = _conv_bn(dims, hidden, hidden, kernel_size, stride, groups=hidden)
        self.dw_relu = nn.ReLU6()
        self.project_conv, self.project_bn = _conv_bn(dims, hidden, c_out, 1, 1)
        # A Python bool fixed at construction, so torch.fx traces the add (or its absence) statically.
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand_relu(self.expand_bn(self.expand_conv(x)))
        out = self.dw_relu(self.dw_bn(self.dw_conv(out)))
        out = self.project_bn(self.project_conv(out))
        if self.residual:
            out = out + x
        return out


# (expansion, c_out as a multiple of width, stride) per block: stride-1 blocks that keep the
# width get a residual add; two stride-2 blocks take 8x8 -> 2x2 and 40 -> 10.
MOBILENET_BLOCKS = ((4, 1, 1), (4, 1.5, 2), (4, 1.5, 1), (4, 2, 2), (4, 2, 1))


class MobileNetV2CNN(nn.Module):
    """Small MobileNetV2: stem Conv-BN-ReLU6, InvertedResidual blocks, 1x1 Conv-BN-ReLU6, pool, Linear.

    ``blocks``: one (expansion, width multiple, stride) per block; block i outputs
    ``round(width * multiple)`` channels (default :data:`MOBILENET_BLOCKS`). ``last_channels``:
    width of the final 1x1 conv ``last.conv`` (default 4 * width). ``kernel_size``: odd size of
    the stem and depthwise kernels. Submodules: ``stem.conv/bn/relu``, ``blocks.<i>.*`` (see
    :class:`InvertedResidual`), ``last.conv/bn/relu``, ``pool``, ``flatten``, ``head``; every
    ReLU6 is its own module. Input float (N, in_channels, H, W) for dims=2 or
    (N, in_channels, L) for dims=1; output float logits (N, num_classes).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 16,
        blocks=MOBILENET_BLOCKS,
        last_channels: int | None = None,
        kernel_size: int = 3,
        dims: int = 2,
    ):
        super().__init__()
        in_channels = check_int(in_channels, "in_channels", low=1)
        num_classes = check_int(num_classes, "num_classes", low=2)
        width = check_int(width, "width", low=1)
        last_channels = check_int(4 * width if last_channels is None else last_channels, "last_channels", low=1)
        kernel_size = check_int(kernel_size, "kernel_size", low=1)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding), got {kernel_size}")
        dims = check_int(dims, "dims", low=1, high=2)
        self.dims = dims

        conv, bn = _conv_bn(dims, in_channels, width, kernel_size, 1)
        self.stem = nn.Sequential(OrderedDict(conv=conv, bn=bn, relu=nn.ReLU6()))
        layers, c = [], width
        for expansion, multiple, stride in _check_blocks(blocks):
            c_out = max(1, round(width * multiple))
            layers.append(InvertedResidual(c, c_out, stride, expansion, kernel_size, dims))
            c = c_out
        self.blocks = nn.Sequential(*layers)
        conv, bn = _conv_bn(dims, c, last_channels, 1, 1)
        self.last = nn.Sequential(OrderedDict(conv=conv, bn=bn, relu=nn.ReLU6()))
        self.pool = _LAYERS[dims][2](1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(last_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.pool(self.last(self.blocks(self.stem(x))))))


def _check_blocks(blocks) -> list[tuple[int, float, int]]:
    """Validate MobileNetV2CNN's ``blocks``: a sequence of (expansion >= 1, multiple > 0, stride 1|2)."""
    if isinstance(blocks, (str, bytes)) or not hasattr(blocks, "__iter__"):
        raise TypeError(f"blocks must be a sequence of (expansion, width multiple, stride), got {blocks!r}")
    out = []
    for i, cfg in enumerate(blocks):
        if not isinstance(cfg, (tuple, list)) or len(cfg) != 3:
            raise TypeError(f"blocks[{i}] must be a tuple (expansion, width multiple, stride), got {cfg!r}")
        expansion = check_int(cfg[0], f"blocks[{i}] expansion", low=1)
        multiple = cfg[1]
        if isinstance(multiple, bool) or not isinstance(multiple, numbers.Real):
            raise TypeError(f"blocks[{i}] width multiple must be a number, got {multiple!r}")
        if not (math.isfinite(multiple) and multiple > 0):
            raise ValueError(f"blocks[{i}] width multiple must be finite and > 0, got {multiple}")
        stride = check_int(cfg[2], f"blocks[{i}] stride", low=1, high=2)
        out.append((expansion, float(multiple), stride))
    return out


MODEL_DEFAULTS = {
    "digits": dict(in_channels=1, num_classes=10, dims=2),
    "mnist1d": dict(in_channels=1, num_classes=10, dims=1),
}


ARCHITECTURES = {"resnet": ResNetCNN, "mobilenetv2": MobileNetV2CNN}


def make_model(dataset_name: str, arch: str = "resnet", **kw) -> nn.Module:
    """A model of ``arch`` ("resnet": ResNetCNN, "mobilenetv2": MobileNetV2CNN) shaped for
    ``dataset_name`` ("digits" or "mnist1d"); kw override any constructor argument."""
    check_choice(dataset_name, "dataset_name", tuple(MODEL_DEFAULTS))
    check_choice(arch, "arch", tuple(ARCHITECTURES))
    return ARCHITECTURES[arch](**{**MODEL_DEFAULTS[dataset_name], **kw})

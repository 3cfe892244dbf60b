"""Data-free ranges from BatchNorm parameters (white paper, Nagel et al. 2021, §3.1, "Batch
normalization based"; book chapter 3, "Range setting").

* ``bn_based`` — the range of one batch-normalised pre-activation from its (beta, gamma).
* ``batchnorm_beta_gamma`` — (beta, gamma) of a BatchNorm module.
* ``bn_relu_ranges`` — those ranges for every ReLU output of a ``refimpl.models.ResNetCNN``.
"""

from __future__ import annotations

import torch
from torch import nn

from .._api import renamed
from .._checks import check_float_tensor
from ..quant import QuantSpec
from .common import check_real, check_spec, float32_ranges

__all__ = ["bn_based", "batchnorm_beta_gamma", "bn_relu_ranges"]

_BATCHNORM = nn.modules.batchnorm._NormBase


def batchnorm_beta_gamma(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(beta, gamma) of a ``torch.nn`` BatchNorm module: its bias and weight, detached (beta = 0,
    gamma = 1 without affine parameters), in the order of ``refimpl.fold.bn_statistics``.

    Returns two 1-d tensors (C,) on the module's device.
    """
    if not isinstance(bn, _BATCHNORM):
        raise TypeError(f"bn must be a torch.nn BatchNorm module, got {type(bn).__name__}")
    if bn.weight is None:
        device = bn.running_mean.device if bn.running_mean is not None else None
        return torch.zeros(bn.num_features, device=device), torch.ones(bn.num_features, device=device)
    return bn.bias.detach(), bn.weight.detach()


@renamed(bn_weight="gamma", bn_bias="beta")
def bn_based(beta: torch.Tensor, gamma: torch.Tensor, spec: QuantSpec, alpha: float = 6.0):
    """The range of a batch-normalised pre-activation from the BN parameters alone, without data
    (white paper §3.1, "Batch normalization based"; the pre-activation is modelled as Gaussian
    with mean beta and standard deviation gamma, as in Nagel et al. 2019's data-free methods)::

        xmin = min(beta - alpha * |gamma|),   xmax = max(beta + alpha * |gamma|)

    i.e. alpha standard deviations around each channel's mean (the paper writes gamma; a negative
    gamma gives the same spread, hence ``|gamma|``). Per tensor (spec.axis None): min/max over the
    channels; per channel (spec.axis set, the channel axis of the activation): the channels' own
    values.

    beta, gamma: 1-d floating tensors (C,), in the order ``refimpl.fold.bn_statistics`` returns
    them (for a BatchNorm module: ``batchnorm_beta_gamma(bn)``).  alpha: > 0.
    Returns (xmin, xmax) float32, 0-d or 1-d (C,).
    """
    check_spec(spec)
    alpha = check_real(alpha, "alpha", 0.0, low_open=True)
    if isinstance(beta, _BATCHNORM) or isinstance(gamma, _BATCHNORM):
        raise TypeError("beta and gamma must be tensors; for a BatchNorm module pass "
                        "*batchnorm_beta_gamma(bn)")
    check_float_tensor(beta, "beta")
    check_float_tensor(gamma, "gamma")
    if gamma.ndim != 1 or beta.shape != gamma.shape:
        raise ValueError(f"beta and gamma must be 1-d of the same length, got shapes "
                         f"{tuple(beta.shape)} and {tuple(gamma.shape)}")
    gamma = gamma.detach().to(torch.float64)
    beta = beta.detach().to(device=gamma.device, dtype=torch.float64)
    lo = beta - alpha * gamma.abs()
    hi = beta + alpha * gamma.abs()
    if spec.axis is None:
        lo, hi = lo.min(), hi.max()
    return float32_ranges(lo, hi, spec)


def bn_relu_ranges(model: nn.Module, spec: QuantSpec, alpha: float = 6.0) -> dict[str, tuple]:
    """Data-free ranges of every ReLU output of a ``refimpl.models.ResNetCNN`` from its BatchNorm
    parameters (white paper §3.1, "Batch normalization based"; ``bn_based``; book chapter 3).

    ``stem.relu`` and ``blocks.i.relu1`` follow one BatchNorm: ``[beta - alpha |gamma|, beta +
    alpha |gamma|]`` (min/max over channels for a per-tensor spec), then clipped below at 0 by the
    ReLU. ``blocks.i.relu2`` follows a sum, bn2 plus the shortcut (its BatchNorm, or the block's
    input: the previous ReLU's range); the sum of the two intervals bounds it, then the ReLU clips.

    spec: only its axis is used (None: per tensor; 1: per channel of the activations).
    Returns {ReLU name: (xmin, xmax)} float32, 0-d or 1-d, in forward order.

    Used in :ref:`ch3-sec-activations`.
    """
    if not all(hasattr(model, a) for a in ("stem", "blocks")):
        raise TypeError(f"model must be a refimpl.models.ResNetCNN, got {type(model).__name__}")

    def relu(lo, hi):
        return lo.clamp(min=0.0), hi.clamp(min=0.0)

    def of(bn):
        return bn_based(*batchnorm_beta_gamma(bn), spec, alpha)

    ranges = {"stem.relu": relu(*of(model.stem.bn))}
    previous = ranges["stem.relu"]
    for i, block in enumerate(model.blocks):
        ranges[f"blocks.{i}.relu1"] = relu(*of(block.bn1))
        lo, hi = of(block.bn2)
        if isinstance(block.shortcut, nn.Identity):
            s_lo, s_hi = previous
        else:
            s_lo, s_hi = of(block.shortcut.bn)
        previous = relu(lo + s_lo, hi + s_hi)
        ranges[f"blocks.{i}.relu2"] = previous
    return ranges

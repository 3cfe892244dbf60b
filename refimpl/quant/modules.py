"""Quantizers as ``nn.Module`` s: the state (learned step size, offset) on top of the pure math."""

from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import normalize_axis
from .functional import lsq_fake_quant, lsq_grad_scale
from .spec import QuantSpec

__all__ = ["LSQQuantizer"]


class LSQQuantizer(nn.Module):
    """Fake quantizer with a learned step size (LSQ, Esser et al. 2020) and, with
    ``learn_offset=True``, a learned offset (LSQ+, Bhalgat et al. 2020).

    The step size is initialised on the first forward from that batch: 2 mean|x| / sqrt(Q_P)
    (LSQ §2.1); the offset, when learned, to min(x) - step_size * qmin so that the grid starts at
    the batch's minimum (the min-max initialisation LSQ+ compares against, §3.2).
    ``grad_scale`` defaults to LSQ's 1 / sqrt(N * Q_P) with N the number of elements per
    step size in that first batch, excluding the batch dimension when ``has_batch_dim``.

    Input: floating tensor, any shape (per-channel along ``spec.axis``). Output: same shape/dtype.
    """

    def __init__(self, spec: QuantSpec, learn_offset: bool = False, grad_scale: float | None = None,
                 has_batch_dim: bool = False):
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
        self.spec = spec
        self.learn_offset = bool(learn_offset)
        self.grad_scale = grad_scale
        self.has_batch_dim = bool(has_batch_dim)
        self.step_size = nn.UninitializedParameter()
        self.offset = nn.UninitializedParameter() if self.learn_offset else None
        self.register_buffer("initialized", torch.tensor(False))

    def _reduce_dims(self, x):
        if self.spec.axis is None:
            return list(range(x.ndim))
        axis = normalize_axis(self.spec.axis, x.ndim, "spec.axis")
        return [d for d in range(x.ndim) if d != axis]

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        dims = self._reduce_dims(x)
        xf = x.detach().float()
        q_p = max(self.spec.qmax, 1)
        if self.learn_offset:
            lo, hi = xf.amin(dims), xf.amax(dims)
            step = torch.clamp((hi - lo) / (self.spec.qmax - self.spec.qmin), min=torch.finfo(torch.float32).eps)
            self.offset.materialize(lo.shape, device=x.device, dtype=torch.float32)
            self.offset.copy_(lo - step * self.spec.qmin)
        else:
            step = torch.clamp(2 * xf.abs().mean(dims) / math.sqrt(q_p), min=torch.finfo(torch.float32).eps)
        self.step_size.materialize(step.shape, device=x.device, dtype=torch.float32)
        self.step_size.copy_(step)
        if self.grad_scale is None:
            per_step = x.numel() // max(1, step.numel())
            if self.has_batch_dim:
                per_step //= max(1, x.shape[0])
            self.grad_scale = lsq_grad_scale(max(1, per_step), self.spec)
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.step_size, nn.UninitializedParameter):
            self._initialize(x)
        return lsq_fake_quant(x, self.step_size, self.spec, grad_scale=self.grad_scale, offset=self.offset)

    def extra_repr(self) -> str:
        return f"spec={self.spec}, learn_offset={self.learn_offset}"

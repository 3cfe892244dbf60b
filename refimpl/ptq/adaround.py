"""AdaRound: learned rounding of the weights, layer by layer (Nagel et al. 2020, arXiv 2004.10568;
white paper Nagel et al. 2021 §3.4 "AdaRound").

Rounding to nearest is not optimal for the task loss; AdaRound learns, per weight, whether to
round down or up, by minimising a layer's local output reconstruction error (AdaRound eqs. 25-26)::

    argmin_V  || f_a(W x) - f_a(W_soft(V) x_hat) ||^2  +  lambda * f_reg(V)

    W_soft(V) = scale * (clamp(floor(W / scale) + h(V) + zero_point, qmin, qmax) - zero_point)  (eq. 22)
    h(V)      = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),  zeta = 1.1, gamma = -0.1     (eq. 23)
    f_reg(V)  = sum_ij 1 - |2 h(V_ij) - 1|^beta                                                 (eq. 24)

Choices made here:

* x_hat, the layer's input, comes from the already-quantized model: earlier layers with their
  learned (hard) rounding and the activation quantizers in their current state (calibrate
  first); W x comes from the FP32 model on the same calibration images (the paper's asymmetric
  reconstruction, eqs. 25-26: the quantized input, the float target).
* f_a is the ReLU/ReLU6 fused into the layer (the one between the layer and its activation
  quantizer in ``refimpl.qmodel``), applied to both sides; identity for a layer without one.
* The reconstruction error is the mean squared error over the batch's output elements;
  lambda (``reg_weight``) multiplies the sum of f_reg over the weights.
* beta: ``beta[0]`` for the first ``warmup`` fraction of iterations, where the regulariser is
  off (the error alone moves h), then annealed linearly to ``beta[1]``.
* V is initialised so that h(V) = w / scale - floor(w / scale) (the soft weight is the float
  weight, before clipping); Adam (lr ``lr``) on V only; scale and zero point are fixed.
* Defaults: the paper's lambda = 0.01, beta 20 -> 2 and 20 % warm-up, but 300 iterations per
  layer (Adam, lr 1e-2) where the paper runs 10k: the small models of the book
  need far fewer. 100 iterations proved too few (chapter 5: on the digits MobileNetV2-style model,
  W4 per-channel AdaRound fell below round-to-nearest over three seeds; with 300 it does not).
* At the end the rounding is hard: h >= 0.5 rounds up. Activation ranges are left as they
  were calibrated; calling ``refimpl.qmodel.calibrate`` again afterwards is optional.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_float_tensor, check_int
from .._progress import progress_bar
from ..capture import capture_activations
from ..graph import fused_relu, nodes_of
from ..qmodel import quant_layers
from ..quant.adaround import GAMMA, ZETA, init_v, rectified_sigmoid, rounding_regularizer, soft_rounded_weight

__all__ = ["adaround", "rectified_sigmoid", "rounding_regularizer", "init_v", "ZETA", "GAMMA"]


class _Adam:
    """torch.optim.Adam(fused=True) (default betas and eps, no weight decay) on one tensor,
    without the optimizer's per-step bookkeeping: the same fused kernel, so the same values
    (checked in tests/test_adaround.py), at a fraction of the overhead — AdaRound takes thousands
    of steps on small tensors. Fused, because its square root is the same on every CPU
    (refimpl.numerics)."""

    def __init__(self, param: torch.Tensor, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.exp_avg = torch.zeros_like(param, memory_format=torch.preserve_format)
        self.exp_avg_sq = torch.zeros_like(param, memory_format=torch.preserve_format)
        # torch's fused Adam keeps the step count as a float32 tensor beside the parameter
        self.step_count = torch.zeros((), dtype=torch.float32, device=param.device)

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        self.step_count += 1
        torch._fused_adam_([self.param], [grad], [self.exp_avg], [self.exp_avg_sq], [],
                           [self.step_count], lr=self.lr, beta1=self.betas[0], beta2=self.betas[1],
                           weight_decay=0.0, eps=self.eps, amsgrad=False, maximize=False)


def _activation_after(qmodel, name: str):
    """The ReLU/ReLU6 fused into layer ``name`` (its only user in the graph, ``refimpl.graph.fused_relu``:
    the same rule as the quantizer placement), as a callable, else None."""
    modules = dict(qmodel.named_modules())
    for node in qmodel.graph.nodes:
        if node.op == "call_module" and node.target == name:
            u = fused_relu(node, modules)
            if u is None:
                return None
            if u.op == "call_module":
                return modules[u.target]
            if u.op == "call_function":
                return u.target
            return torch.relu
    return None


def _layers_in_graph_order(qmodel) -> list[str]:
    if getattr(qmodel, "graph", None) is None:
        raise TypeError("qmodel must be a torch.fx.GraphModule from refimpl.qmodel.quantize_model")
    return nodes_of(qmodel, quant_layers(qmodel))


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean())


def _check_arguments(qmodel, fp_model, x_calib, iterations, batch_size, reg_weight, beta, warmup, lr, seed):
    """ValueError/TypeError for bad arguments; the layers to round, in graph order."""
    if not isinstance(fp_model, nn.Module):
        raise TypeError(f"fp_model must be an nn.Module, got {type(fp_model).__name__}")
    check_float_tensor(x_calib, "x_calib")
    check_int(iterations, "iterations", 1)
    check_int(batch_size, "batch_size", 1)
    check_int(seed, "seed", 0)
    if not (isinstance(reg_weight, (int, float)) and reg_weight >= 0 and math.isfinite(reg_weight)):
        raise ValueError(f"reg_weight must be a finite number >= 0, got {reg_weight!r}")
    if not (isinstance(warmup, (int, float)) and 0.0 <= warmup < 1.0):
        raise ValueError(f"warmup must be in [0, 1), got {warmup!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if len(beta) != 2 or not all(b > 0 for b in beta):
        raise ValueError(f"beta must be (start, end) with both > 0, got {beta!r}")
    names = _layers_in_graph_order(qmodel)
    fp_modules = dict(fp_model.named_modules())
    layers = quant_layers(qmodel)
    for name in names:
        w = layers[name].weight
        if name not in fp_modules or getattr(fp_modules[name], "weight", None) is None \
                or fp_modules[name].weight.shape != w.shape:
            raise ValueError(f"fp_model has no layer {name!r} with weight shape {tuple(w.shape)}: pass the "
                             "FP32 (BN-folded) model that qmodel was quantized from")
    for name in names:
        if layers[name].weight_quantizer.kind != "fixed":
            raise ValueError(f"layer {name!r}'s weight quantizer is of kind "
                             f"{layers[name].weight_quantizer.kind!r}: set_trainable(qmodel, 'fixed') first")
    return names


def _learn_rounding(layer, f_a, x_in, target, gen, iterations, batch_size, reg_weight, beta, warmup, lr):
    """V after ``iterations`` Adam steps on eqs. 25-26 for one layer (x_in, target: (N, ...))."""
    wq = layer.weight_quantizer
    w = layer.weight.detach().float()
    floor, frac = wq.floor_codes(w)
    # eq. 22 with the constant parts hoisted out of the loop: the same function as
    # WeightQuantizer.quantize_with_rounding(w, h), so the same soft weight
    scale, zp = wq.qparams_like(w)
    v = init_v(frac).requires_grad_(True)
    adam = _Adam(v, lr)
    n = x_in.shape[0]
    start = int(warmup * iterations)
    for it in range(iterations):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen).to(x_in.device)
        h = rectified_sigmoid(v)
        w_soft = soft_rounded_weight(floor, h, scale, zp, wq.spec)
        out = f_a(layer.forward_with_weight(x_in[idx], w_soft))
        loss = F.mse_loss(out, target[idx])
        if it >= start and reg_weight > 0:
            rel = (it - start) / max(1, iterations - start)
            b = beta[1] + (beta[0] - beta[1]) * (1.0 - rel)
            loss = loss + reg_weight * rounding_regularizer(v, b)
        grad, = torch.autograd.grad(loss, v)
        adam.step(grad)
    return v.detach()


@torch.no_grad()
def _reconstruction_errors(layer, f_a, x_in, target, hard, batch_size) -> dict:
    """{"mse_nearest", "mse_adaround"}: the layer's output error with each rounding, same inputs."""
    wq = layer.weight_quantizer
    w = layer.weight.detach().float()
    errs = {}
    # nearest: the quantizer's own round-to-nearest (rounding still None here)
    for key, wqq in (("mse_nearest", layer.quantized_weight()),
                     ("mse_adaround", wq.quantize_with_rounding(w, hard).to(layer.weight.dtype))):
        outs = [f_a(layer.forward_with_weight(x_in[i:i + batch_size].to(layer.weight.dtype), wqq)).float()
                for i in range(0, x_in.shape[0], batch_size)]
        errs[key] = _mse(torch.cat(outs), target)
    return errs


def adaround(qmodel: nn.Module, fp_model: nn.Module, x_calib: torch.Tensor, iterations: int = 300,
             batch_size: int = 64, reg_weight: float = 0.01, beta: tuple = (20.0, 2.0), warmup: float = 0.2,
             lr: float = 1e-2, seed: int = 0, progress: bool = True) -> list[dict]:
    """Learn the rounding of every quantized layer's weights (AdaRound, Nagel et al. 2020), in place.

    qmodel: from ``refimpl.qmodel.quantize_model`` (activations calibrated, or switched off);
    fp_model: the FP32 model it was made from (same layer names, e.g. the BN-folded model);
    x_calib: calibration inputs (N, ...). Layers are processed in graph (topological) order;
    each gets ``iterations`` Adam steps on random batches of ``batch_size`` rows. The learned
    rounding is set with ``WeightQuantizer.set_rounding`` (hard, h in {0, 1}).

    Returns one dict per layer: {"layer", "mse_nearest", "mse_adaround", "seconds"}: the mean
    squared reconstruction error f_a(W x) vs f_a(W_q x_hat) over all of x_calib with
    round-to-nearest and with the learned rounding, on the same inputs x_hat.
    """
    names = _check_arguments(qmodel, fp_model, x_calib, iterations, batch_size, reg_weight, beta, warmup, lr, seed)
    layers = quant_layers(qmodel)
    was = (qmodel.training, fp_model.training)
    qmodel.eval()
    fp_model.eval()
    x_calib = x_calib.to(next(qmodel.parameters()).device)
    cap_bs = 256
    gen = torch.Generator(device="cpu").manual_seed(seed)
    report = []
    try:
        # the FP32 model never changes: every layer's output in one pass
        fp_outputs = capture_activations(fp_model, x_calib, names, batch_size=cap_bs)
        bar = progress_bar(names, progress, desc="adaround", unit="layer")
        for name in bar:
            t0 = time.perf_counter()
            layer = layers[name]
            act = _activation_after(qmodel, name)
            f_a = (lambda t: t) if act is None else act
            layer.weight_quantizer.set_rounding(None)
            x_in = capture_activations(qmodel, x_calib, [name], batch_size=cap_bs, where="input",
                                       stop=True)[name].float()
            with torch.no_grad():
                target = f_a(fp_outputs.pop(name).float())
            v = _learn_rounding(layer, f_a, x_in, target, gen, iterations, batch_size, reg_weight, beta, warmup, lr)
            hard = (rectified_sigmoid(v) >= 0.5).float()
            errs = _reconstruction_errors(layer, f_a, x_in, target, hard, cap_bs)
            layer.weight_quantizer.set_rounding(hard)
            report.append({"layer": name, **errs, "seconds": time.perf_counter() - t0})
            bar.set_postfix(layer=name, nearest=f"{errs['mse_nearest']:.3g}", ada=f"{errs['mse_adaround']:.3g}")
    finally:
        qmodel.train(was[0])
        fp_model.train(was[1])
    return report

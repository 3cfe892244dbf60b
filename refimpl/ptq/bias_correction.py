"""Bias correction: biases that cancel the mean output error of weight quantization (DFQ, Nagel
et al. 2019, §4.2 and appendices B-D; white paper, Nagel et al. 2021, §3.3 "Bias correction",
eqs. 25-28). The formulas are restated in each docstring.

* ``bias_correction_analytic`` — the expected error from BN statistics (data-free).
* ``bias_correction_empirical`` — the error measured on calibration data.
* ``relu_mean`` / ``relu6_mean`` — E[ReLU(z)], E[ReLU6(z)] for a normal z (DFQ appendix C).

Every function returns a new model; none modifies its inputs. Book: chapter 5, "Bias correction".
"""

from __future__ import annotations

import copy
import math

import torch
import torch.fx
from torch import nn

from .._api import renamed
from .._checks import check_choice, check_int
from .._progress import progress_bar
from ..capture import forward_hooks, run_batches
from ..graph import activation_kind, in_channels, is_weight_layer, nodes_of, trace
from ..qmodel import ActQuantizer
from .channels import add_bias, response_to_constant_input
from .cle import check_bn_stats

__all__ = ["bias_correction_analytic", "bias_correction_empirical", "relu_mean", "relu6_mean"]


def _std_normal_pdf(x):
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _std_normal_cdf(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def relu_mean(beta: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """E[ReLU(z)] for z ~ N(beta, gamma^2): gamma phi(beta/gamma) + beta Phi(beta/gamma) (DFQ appendix C,
    clipped normal distribution).

    gamma = 0 gives ReLU(beta). Elementwise; float tensors of broadcastable shapes.
    """
    g = gamma.abs()
    safe = torch.where(g > 0, g, torch.ones_like(g))
    t = beta / safe
    m = g * _std_normal_pdf(t) + beta * _std_normal_cdf(t)
    return torch.where(g > 0, m, torch.clamp(beta, min=0))


def relu6_mean(beta: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """E[ReLU6(z)] = E[clip(z, 0, 6)] for z ~ N(beta, gamma^2).

    clip(z, 0, 6) = ReLU(z) - ReLU(z - 6), so E = relu_mean(beta, gamma) - relu_mean(beta - 6, gamma).
    """
    return relu_mean(beta, gamma) - relu_mean(beta - 6, gamma)


def _quantized_layers(qmodel) -> dict[str, nn.Module]:
    """{name: layer} of the weight layers with a ``quantized_weight()`` method: ``refimpl.qmodel``'s
    quantized layers, or any other implementation of that protocol."""
    return {n: m for n, m in qmodel.named_modules()
            if n and is_weight_layer(m) and callable(getattr(m, "quantized_weight", None))}


def _is_passthrough(m) -> bool:
    """Modules that leave a tensor's mean (approximately) unchanged: activation quantizers, Identity, Dropout."""
    return isinstance(m, (ActQuantizer, nn.Identity, nn.Dropout))


class _QuantLeafTracer(torch.fx.Tracer):
    """Keeps quantized layers (``.quantized_weight()``) and activation quantizers as single nodes."""

    def is_leaf_module(self, m, qualname):
        return (callable(getattr(m, "quantized_weight", None)) or _is_passthrough(m)
                or super().is_leaf_module(m, qualname))


def _source_of_input(node, modules):
    """(layer name, activation kind) feeding ``node``'s input through one optional ReLU/ReLU6 and
    any pass-through modules (activation quantizers); None if the input is anything else."""
    cur = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    kind = None
    while cur is not None:
        if cur.op == "call_module" and is_weight_layer(modules[cur.target]):
            return cur.target, kind or "none"
        k = activation_kind(cur, modules)
        if k is not None:
            if kind is not None:
                return None
            kind = k
        elif not (cur.op == "call_module" and _is_passthrough(modules[cur.target])):
            return None
        cur = cur.args[0] if cur.args and isinstance(cur.args[0], torch.fx.Node) else None
    return None


@renamed(return_corrections="return_report")
def bias_correction_analytic(qmodel: nn.Module, bn_stats: dict, return_report: bool = False):
    """A copy of ``qmodel`` whose biases cancel the expected weight-quantization error (DFQ §4.2).

    For each quantized layer (a module with ``.quantized_weight()``, as ``refimpl.qmodel``
    makes) whose input comes from a layer P with BN statistics (beta, gamma) through ReLU,
    ReLU6 or no activation (activation quantizers in between are ignored), the expected input
    is E[x_c] = E[act(z_c)], z_c ~ N(beta_c, gamma_c^2): ``relu_mean`` (DFQ appendix C),
    ``relu6_mean``, or beta. The expected output error is E[y~ - y] = (W~ - W) E[x]
    (DFQ §4.2; for convs summed over kernel taps as in appendix B; zero padding is ignored),
    and the bias becomes b - (W~ - W) E[x]. Layers without such a predecessor (the first layer, layers after a
    residual add or a pooling) are left unchanged. bn_stats: ``refimpl.fold.bn_statistics``
    of the unfolded model, rescaled after CLE/absorption.

    Activation-quantizer ranges are copied as they are: recalibrate
    (``refimpl.qmodel.calibrate``) if the corrected outputs should set them.
    Returns a new model (deep copy; ``qmodel`` is not modified), or (model, {layer: correction
    subtracted}) when ``return_report``.
    """
    check_bn_stats(bn_stats)
    out = copy.deepcopy(qmodel)
    gm = trace(out, _QuantLeafTracer())
    modules = dict(gm.named_modules())
    qlayers = _quantized_layers(out)
    if not qlayers:
        raise ValueError("qmodel has no quantized layer (a Conv/Linear with .quantized_weight()); "
                         "build it with refimpl.qmodel.quantize_model")
    corrections = {}
    with torch.no_grad():
        for n in gm.graph.nodes:
            if n.op != "call_module" or n.target not in qlayers:
                continue
            src = _source_of_input(n, modules)
            if src is None or src[0] not in bn_stats:
                continue
            layer = qlayers[n.target]
            beta, gamma = (t.detach().to(layer.weight.device, torch.float64) for t in bn_stats[src[0]])
            if beta.shape != (in_channels(layer),):
                raise ValueError(f"bn_stats[{src[0]!r}] has {tuple(beta.shape)} channels, layer "
                                 f"{n.target!r} reads {in_channels(layer)}")
            ex = {"relu": relu_mean, "relu6": relu6_mean}.get(src[1], lambda b, g: b)(beta, gamma)
            dw = layer.quantized_weight().detach().double() - layer.weight.detach().double()
            corr = response_to_constant_input(layer, ex, weight=dw)
            add_bias(layer, -corr)
            corrections[n.target] = corr.to(layer.weight.dtype)
    return (out, corrections) if return_report else out


def _channel_sum(layer, t):
    """(per-channel sum of t, values per channel): channels on dim 1 for a conv, last dim for Linear."""
    cdim = t.dim() - 1 if isinstance(layer, nn.Linear) else 1
    red = [d for d in range(t.dim()) if d != cdim]
    return t.sum(red), t.numel() // t.shape[cdim]


def _output_means(model, names, x, batch_size, fp_layers=None):
    """{name: per-channel mean over x of the named layers' outputs}, float64; with ``fp_layers``
    ({name: FP32 layer}) the mean of layer_q(x_q) - layer_fp(x_q) instead, x_q the layer's input."""
    sums = {n: None for n in names}
    count = {n: 0 for n in names}

    def record(name):
        def fn(m, inp, outp):
            t = outp.detach() if fp_layers is None else outp.detach() - fp_layers[name](inp[0].detach())
            s, k = _channel_sum(m, t.double())
            sums[name] = s if sums[name] is None else sums[name] + s
            count[name] += k
        return fn

    with forward_hooks(model, {n: record(n) for n in names}):
        run_batches(model, x, batch_size)
    return {n: sums[n] / count[n] for n in names}


@renamed(return_corrections="return_report")
def bias_correction_empirical(qmodel: nn.Module, fp_model: nn.Module, x: torch.Tensor,
                              batch_size: int = 256, reference: str = "fp_model",
                              progress: bool = True, return_report: bool = False):
    """A copy of ``qmodel`` whose layer biases cancel the mean output error measured on ``x``
    (empirical bias correction, DFQ §4.2 and appendix D).

    Layers are corrected one at a time in graph order, each measured with all earlier
    corrections in place (so later layers see corrected inputs). For quantized layer L (a
    module with ``.quantized_weight()`` in ``qmodel``), over all samples of x and all spatial
    positions, per output channel:

    * reference="fp_model" (default): error = E[L_q(x_q)] - E[L_fp(x_fp)], where x_q is L's
      input in the quantized model run on x (with its activation quantizers) and L_fp(x_fp) is
      the output of the layer of the same name in ``fp_model`` run on x. This removes the
      whole mean shift of L's output, including the shift inherited from earlier layers and
      from activation quantization ("compare the activations of the quantized and full
      precision model").
    * reference="same_input": error = E[L_q(x_q) - L_fp(x_q)] = (W~ - W) E[x_q], the FP32
      weights of L applied to the same input x_q: only the weight-quantization error of L
      (DFQ §4.2, with E[x] measured instead of derived from BN statistics).

    The bias becomes b - error (a zero bias is created if the layer had none). Layer outputs
    are taken before any following activation/quantizer. fp_model: the FP32 model ``qmodel``
    was made from (BN folded, same layer names). x: calibration inputs, batched by
    ``batch_size``. Returns a new model (deep copy; qmodel and fp_model are not modified),
    or (model, {layer: error subtracted}) when ``return_report``.
    """
    check_choice(reference, "reference", ("fp_model", "same_input"))
    batch_size = check_int(batch_size, "batch_size", low=1)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(fp_model, nn.Module):
        raise TypeError(f"fp_model must be an nn.Module, got {type(fp_model).__name__}")
    out = copy.deepcopy(qmodel)
    qlayers = _quantized_layers(out)
    if not qlayers:
        raise ValueError("qmodel has no quantized layer (a Conv/Linear with .quantized_weight()); "
                         "build it with refimpl.qmodel.quantize_model")
    fp_modules = dict(fp_model.named_modules())
    missing = [n for n in qlayers if n not in fp_modules or not is_weight_layer(fp_modules[n])]
    if missing:
        raise ValueError(f"fp_model has no Conv/Linear layer named {missing}: give the FP32 model "
                         "qmodel was quantized from (after fold_all_bn)")
    order = nodes_of(trace(out, _QuantLeafTracer()), qlayers)
    was = out.training
    out.eval()
    if reference == "fp_model":
        fp_was = fp_model.training
        try:
            fp_means = _output_means(fp_model, order, x, batch_size)
        finally:
            fp_model.train(fp_was)
    corrections = {}
    with torch.no_grad():
        for name in progress_bar(order, progress, desc="bias correction", unit="layer"):
            layer = qlayers[name]
            if reference == "fp_model":
                err = _output_means(out, [name], x, batch_size)[name] - fp_means[name]
            else:
                fp_layer = copy.deepcopy(fp_modules[name]).eval()
                err = _output_means(out, [name], x, batch_size, {name: fp_layer})[name]
            err = err.to(layer.weight.device)
            add_bias(layer, -err)
            corrections[name] = err.to(layer.weight.dtype)
    out.train(was)
    return (out, corrections) if return_report else out

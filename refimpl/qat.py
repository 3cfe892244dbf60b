"""Quantization-aware training (QAT): the straight-through gradients and the white paper's QAT pipeline.

White paper: Nagel et al. 2021, "A White Paper on Neural Network Quantization" (arXiv 2106.08295),
§4 "Quantization-aware training": §4.1 "Simulating quantization for backward path" (the
straight-through estimator, STE), §4.2 "Batch normalization folding and QAT", §4.3
"Initialization for QAT", §4.4 "Standard QAT pipeline" (Fig. 11 there, the flowchart).

* :func:`ste_gradients` -- the closed-form local derivatives of the asymmetric fake quantizer
  x_hat = s * (clamp(round(x/s) + z, qmin, qmax) - z) (white paper eq. 7) w.r.t. x, the scale s
  and the zero point z, under the STE d round(y)/dy := 1, in the three regions (inside the grid,
  clipped below, clipped above); :func:`gradient_check` compares them with autograd and finite
  differences (the chapter's table).
* :func:`qat_pipeline` -- fold BN, quantize, PTQ-initialise the ranges, learn weights and
  quantization parameters with Adam.
"""

from __future__ import annotations

import math
import numbers
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from refimpl._checks import check_choice, check_float_tensor, check_int, normalize_axis
from refimpl.fold import fold_all_bn, reestimate_bn
from refimpl.qmodel import (QuantConfig, act_quantizers, calibrate, merge_bn, quantize_model, set_trainable,
                            weight_quantizers)
from refimpl.quant import QuantSpec, lsq_fake_quant
from refimpl.train import evaluate

__all__ = ["ste_gradients", "gradient_check", "qat_pipeline", "BN_MODES"]

REGIONS = ("below", "inside", "above")


# --------------------------------------------------------------------------------------------
# §4.1: the STE gradients of the fake quantizer
# --------------------------------------------------------------------------------------------
def _qparams_like(x: torch.Tensor, scale, zero_point, spec: QuantSpec, cdt: torch.dtype):
    """scale, zero_point validated and shaped to broadcast over x (per-tensor or along spec.axis)."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    vals = []
    for name, v in (("scale", scale), ("zero_point", zero_point)):
        if isinstance(v, bool) or not isinstance(v, (int, float, torch.Tensor)):
            raise TypeError(f"{name} must be a number or a torch.Tensor, got {type(v).__name__}")
        t = v.detach() if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=cdt)
        if t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must be real, got dtype {t.dtype}")
        t = t.to(device=x.device, dtype=cdt)
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf")
        vals.append(t)
    s, z = vals
    if not bool((s > 0).all()):
        raise ValueError("scale must be > 0 everywhere")
    if not bool((z == torch.round(z)).all()):
        raise ValueError("zero_point must hold integer values (the white paper's z is an integer, §2.2)")
    if not bool(((z >= spec.qmin) & (z <= spec.qmax)).all()):
        raise ValueError(f"zero_point must lie on the grid [{spec.qmin}, {spec.qmax}]")
    if spec.axis is None:
        if s.numel() != 1 or z.numel() != 1:
            raise ValueError("spec.axis=None (per-tensor) needs one scale and one zero_point, got "
                             f"{s.numel()} and {z.numel()} values")
        return s.reshape(()), z.reshape(())
    axis = normalize_axis(spec.axis, x.ndim, "spec.axis")
    c = x.shape[axis]
    shape = [1] * x.ndim
    shape[axis] = c
    out = []
    for name, t in (("scale", s), ("zero_point", z)):
        if t.numel() == 1:
            t = t.reshape(1).expand(c)
        if t.ndim != 1 or t.numel() != c:
            raise ValueError(f"{name} must be 1-d with {c} values (one per channel along spec.axis={spec.axis}), "
                             f"got shape {tuple(t.shape)}")
        out.append(t.reshape(shape))
    return out[0], out[1]


def ste_gradients(x: torch.Tensor, scale, zero_point, spec: QuantSpec
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local derivatives of x_hat = s * (clamp(round(x/s) + z, qmin, qmax) - z) under the STE.

    White paper §4.1: the straight-through estimator sets d round(y)/dy := 1; with it the
    derivative of the fake quantizer (eq. 7) w.r.t. its input is 1 on the grid and 0 where
    clipped (the section's gradient equation). Differentiating eq. 7 the same way w.r.t. the quantization parameters gives
    the scale and zero-point gradients used when they are learned (the paper's §4.1 points to
    LSQ, Esser et al. 2020, eq. 3, for s; LSQ+, Bhalgat et al. 2020, for the offset). With
    v = x/s + z, the regions are the paper's case split on the *unrounded* value:

        region               d x_hat/dx   d x_hat/ds               d x_hat/dz
        inside  qmin<=v<=qmax     1       round(x/s) - x/s              0
        below   v < qmin          0       qmin - z                     -s
        above   v > qmax          0       qmax - z                     -s

    (inside: x_hat = s*round(x/s), so d/ds = round(x/s) + s*(-x/s^2)*1 with the STE, and z
    cancels; outside: x_hat = s*(qmin - z) or s*(qmax - z), a smooth function of s and z).
    The zero point is treated as a real variable (it is rounded to an integer in the forward
    pass, and the STE passes that rounding too). These are elementwise: the gradient of a loss
    w.r.t. a per-tensor s is sum_i dL/dx_hat_i * d_scale_i (per channel: summed per channel).

    Note: ``refimpl.quant.fake_quant`` (like torch's fake-quant) masks the x gradient with the
    *rounded* code; the two differ only for v within half a step outside [qmin, qmax].

    x: floating tensor, any shape. scale: > 0, zero_point: integer-valued on the grid; numbers
    or 0-d tensors (spec.axis None) or 1-d tensors with one value per channel along spec.axis.
    Returns (d_x, d_scale, d_zero_point), each of x's shape and dtype, on x's device.
    """
    check_float_tensor(x, "x")
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    s, z = _qparams_like(x, scale, zero_point, spec, cdt)
    xs = x.detach().to(cdt)
    # x * (1/s), as fake_quant does: the same codes as the forward pass, bit for bit
    u = xs * torch.reciprocal(s)
    v = u + z
    below, above = v < spec.qmin, v > spec.qmax
    inside = ~(below | above)
    d_x = inside.to(cdt)
    d_scale = torch.where(inside, torch.round(u) - u, torch.where(below, spec.qmin - z, spec.qmax - z))
    d_zero_point = torch.where(inside, torch.zeros_like(v), (-s).expand_as(v))
    return d_x.to(x.dtype), d_scale.to(x.dtype), d_zero_point.to(x.dtype)


def _region(v: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """0 below the grid, 1 inside, 2 above (int64, v's shape)."""
    return (v >= spec.qmin).long() + (v > spec.qmax).long()


def _true_quantizer(x, s, z, spec):
    """Eq. 7 with a real-valued z outside the rounding: the staircase actually computed."""
    return s * (torch.clamp(torch.round(x / s) + z, spec.qmin, spec.qmax) - z)


def _surrogate(x, s, z, spec, residual, region):
    """The smooth function whose exact derivatives are the STE gradients at the evaluation point.

    The STE d round(y)/dy := 1 is the same as writing round(y) = y + r with the rounding
    residual r = round(y0) - y0 frozen at the evaluation point y0; the region (which branch of
    the clamp is active) is frozen too, as the paper's case split assumes. So inside the grid
    x_hat ~ s*(x/s + r) = x + s*r, and outside x_hat = s*(qmin - z) or s*(qmax - z).
    """
    inside = x + s * residual
    lo = torch.full_like(inside, s * (spec.qmin - z))
    hi = torch.full_like(inside, s * (spec.qmax - z))
    return torch.where(region == 1, inside, torch.where(region == 0, lo, hi))


def gradient_check(x: torch.Tensor, scale: float, zero_point: int, spec: QuantSpec, h: float = 1e-6) -> dict:
    """The paper's STE derivatives next to autograd and finite differences, per element of x.

    What each column checks (all in float64, per-tensor s and z, elementwise):

    * ``paper``: :func:`ste_gradients`, the closed form (white paper §4.1's STE gradient, and
      the same differentiation for s and z).
    * ``autograd``: torch autograd through ``refimpl.quant.lsq_fake_quant`` with a learned offset
      (LSQ+, Bhalgat et al. 2020) -- an independently written quantizer with hand-written
      backward -- re-parametrised to the paper's (s, z) by beta = -s*z (then
      round((x - beta)/s) = round(x/s) + z for integer z, the same forward values), one step
      size and offset per element so that autograd returns the elementwise derivatives, and
      grad_scale = 1. autograd does the chain rule d/ds|_z = d/ds|_beta - z d/dbeta and
      d/dz = -s d/dbeta. Agreement checks the closed form against LSQ/LSQ+'s gradients.
    * ``fd_surrogate``: central finite differences (step h, relative for s) of the smooth
      surrogate the STE differentiates: eq. 7 with round(y) replaced by y + r, r = round(y0) - y0
      frozen at the point, and the clamp's active branch frozen. Agreement checks that the
      closed form is the derivative of that function (the algebra, including d/ds inside the
      grid = r = round(x/s) - x/s).
    * ``fd_true``: central finite differences of the actual staircase eq. 7 (z real). Where the
      STE is an approximation this differs: inside the grid the true d/dx is 0 (STE: 1) and the
      true d/ds is round(x/s) (STE: round(x/s) - x/s); outside the grid the quantizer is smooth
      and all three derivatives agree with the STE -- except within half a step outside
      [qmin, qmax], where v is outside but round(x/s) + z is not yet clipped, so the staircase
      still behaves as inside.

    Finite differences are meaningful only away from the rounding thresholds (v = k + 1/2) and
    the region boundaries; the caller picks such x (``margin`` in the result tells how far each
    point is, in units of the step, from the nearest of them).

    x: 1-d floating tensor. Returns a dict of float64 tensors of x's shape: "x", "region"
    (int64, 0 below / 1 inside / 2 above), "margin", and for each of "paper", "autograd",
    "fd_surrogate", "fd_true" a dict {"x": ..., "scale": ..., "zero_point": ...}.
    """
    check_float_tensor(x, "x")
    if x.ndim != 1:
        raise ValueError(f"x must be 1-d, got shape {tuple(x.shape)}")
    if spec.axis is not None:
        raise ValueError("gradient_check takes a per-tensor spec (spec.axis=None)")
    if not isinstance(h, float) or not 0 < h < 1e-2:
        raise ValueError(f"h must be a float in (0, 0.01), got {h!r}")
    xd = x.detach().to(torch.float64)
    s0 = float(scale)
    z0 = float(zero_point)
    out = {"x": xd.clone()}

    dx, ds, dz = ste_gradients(xd, s0, int(zero_point), spec)
    out["paper"] = {"x": dx, "scale": ds, "zero_point": dz}

    # autograd through LSQ+ with beta = -s*z, one (s, beta) per element
    n = xd.numel()
    xa = xd.clone().requires_grad_(True)
    sa = torch.full((n,), s0, dtype=torch.float64, device=xd.device, requires_grad=True)
    za = torch.full((n,), z0, dtype=torch.float64, device=xd.device, requires_grad=True)
    y = lsq_fake_quant(xa, sa, spec.per_channel(0), grad_scale=1.0, offset=-sa * za)
    y.sum().backward()
    out["autograd"] = {"x": xa.grad, "scale": sa.grad, "zero_point": za.grad}

    v = xd / s0 + z0
    region = _region(v, spec)
    residual = torch.round(xd / s0) - xd / s0
    out["region"] = region
    # distance (in steps) to the nearest rounding threshold and to the region boundaries
    frac = (v - torch.floor(v) - 0.5).abs()
    edge = torch.minimum((v - spec.qmin).abs(), (v - spec.qmax).abs())
    out["margin"] = torch.minimum(frac, edge)

    def fd(fn):
        hs = h * s0
        hx = h * s0
        return {
            "x": (fn(xd + hx, s0, z0) - fn(xd - hx, s0, z0)) / (2 * hx),
            "scale": (fn(xd, s0 + hs, z0) - fn(xd, s0 - hs, z0)) / (2 * hs),
            "zero_point": (fn(xd, s0, z0 + h) - fn(xd, s0, z0 - h)) / (2 * h),
        }

    out["fd_surrogate"] = fd(lambda a, s, z: _surrogate(a, s, z, spec, residual, region))
    out["fd_true"] = fd(lambda a, s, z: _true_quantizer(a, s, z, spec))
    return out


# --------------------------------------------------------------------------------------------
# §4.4: the standard QAT pipeline
# --------------------------------------------------------------------------------------------
def _check_positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


BN_MODES = ("static", "keep")


def qat_pipeline(fp_model: nn.Module, data, config: QuantConfig, *, trainable: str = "lsq", epochs: int = 8,
                 lr: float = 3e-3, quant_lr: float | None = None, batch_size: int = 128, seed: int = 0,
                 bn: str = "static", bn_reestimation: bool = False, eval_each_epoch: bool = True,
                 progress: bool = True) -> tuple[torch.fx.GraphModule, dict]:
    """Quantization-aware training of a trained FP32 model: the white paper's pipeline (§4.4, Fig. 11).

    Steps, each as the paper recommends:

    1. BatchNorm (§4.2, Table 7 there). ``bn="static"`` (the paper's recommendation): static
       folding with the running statistics before QAT (``refimpl.fold.fold_all_bn``; no BN
       during QAT). ``bn="keep"`` ("keep original BN (per-channel)"): each BN stays in float
       after its quantized layer and trains with batch statistics; after training it is merged
       into the per-channel weight scales (``refimpl.qmodel.merge_bn``; needs per-channel
       symmetric weights). With ``bn_reestimation=True`` the BN statistics are first recomputed
       on ``data.x_train`` with the final quantized weights (``refimpl.fold.reestimate_bn``,
       Nagel et al. 2022). The paper's optional cross-layer equalization step (for
       depthwise-separable models) is not part of this function: apply it to ``fp_model`` first.
    2. Add quantizers (§2.3): ``refimpl.qmodel.quantize_model(folded, config)``.
    3. Range estimation (§4.3, §4.4 step 3): weight ranges as ``config.weight_range``,
       activation ranges calibrated on ``data.x_calib`` with ``config.act_range``. The paper
       recommends the MSE criterion for both (min-max can be better for per-channel weights):
       pass ``QuantConfig(weight_range="mse", act_range="mse", ...)`` to follow it.
    4. Learnable quantization parameters (§4.1, §4.4 step 4): ``set_trainable(qmodel, trainable)``
       -- "lsq" (LSQ step size, Esser et al. 2020) or "ste" (scale and zero point with the STE
       gradients of :func:`ste_gradients`). Trained jointly with the weights and biases by Adam
       (the paper: adaptive optimizers avoid retuning the quantizer learning rate), cosine decay
       from ``lr`` to 0 over all steps. Adam's step is ~lr in parameter units whatever the
       gradient's scale, and quantizer scales are ~1e-2, so their learning rate is
       ``quant_lr`` (default lr / 10).

    The defaults (8 epochs, lr 3e-3, batch 128) keep a run on digits or MNIST-1D ResNets under
    ~15 s of CPU time on one thread (MobileNetV2 ~20-40 s).

    Not implemented: the double-forward BN folding of Jacob et al. 2018 / Krishnamoorthi 2018
    (the paper's Table 7 finds it no better than static folding).

    Determinism: mini-batch order from a ``torch.Generator`` seeded with ``seed``; the global
    RNG is not used (no dropout, no random init), so a seed gives bit-identical weights on the
    same machine, device and thread count. The qmodel trains in its own mode; ``fp_model`` and
    ``data`` are not modified.

    fp_model: trained float model (BN allowed; fx-traceable). data: a ``refimpl.data.DataSplit``
    (x_train, y_train, x_calib, x_test, y_test). Returns ``(qmodel, history)``: the trained
    ``GraphModule`` in eval mode with its quantizers frozen (``set_trainable(qmodel, "none")``:
    the learned scales and rounded zero points become fixed buffers), so its state_dict loads
    into ``quantize_model(fold_all_bn(fp_model), config)``; and history = {"ptq_acc": test
    accuracy (%) of the PTQ initialisation, "loss": mean training loss per epoch, "test_acc":
    test accuracy (%) after each epoch (trainable quantizers; empty with ``eval_each_epoch=False``,
    which saves those evaluations), "final_acc": test accuracy of the
    returned, frozen model (BN merged for ``bn="keep"``), and for ``bn="keep"``
    "before_reestimation_acc" (with ``bn_reestimation``) and "merge_clamped" (weight codes
    clamped by the merge, see ``merge_bn``), "seconds": wall time of the whole pipeline, "cpu_seconds": its
    process CPU time (all threads; equals the wall time on an idle machine with one thread)}.
    """
    if not isinstance(fp_model, nn.Module):
        raise TypeError(f"fp_model must be a torch.nn.Module, got {type(fp_model).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a refimpl.qmodel.QuantConfig, got {type(config).__name__}")
    missing = [a for a in ("x_train", "y_train", "x_calib", "x_test", "y_test") if not hasattr(data, a)]
    if missing:
        raise TypeError(f"data must be a DataSplit; {type(data).__name__} lacks {missing}")
    check_choice(trainable, "trainable", ("lsq", "ste"))
    check_choice(bn, "bn", BN_MODES)
    if not isinstance(bn_reestimation, bool):
        raise TypeError(f"bn_reestimation must be a bool, got {bn_reestimation!r}")
    if bn_reestimation and bn != "keep":
        raise ValueError('bn_reestimation=True needs bn="keep" (after static folding there are no BN statistics)')
    if bn == "keep" and not (config.weight_per_channel and config.weight_symmetric):
        raise ValueError('bn="keep" merges BN into per-channel weight scales after training: it needs '
                         "QuantConfig(weight_per_channel=True, weight_symmetric=True)")
    epochs = check_int(epochs, "epochs", low=1)
    lr = _check_positive(lr, "lr")
    quant_lr = lr / 10 if quant_lr is None else _check_positive(quant_lr, "quant_lr")
    batch_size = check_int(batch_size, "batch_size", low=1)
    seed = check_int(seed, "seed", low=0)
    for name, flag in (("eval_each_epoch", eval_each_epoch), ("progress", progress)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    x, y = data.x_train, data.y_train
    if len(x) != len(y):
        raise ValueError(f"data.x_train has {len(x)} rows but data.y_train has {len(y)}")

    t0, c0 = time.perf_counter(), time.process_time()
    if bn == "static":
        qmodel = quantize_model(fold_all_bn(fp_model), config)           # steps 1-2
    else:
        qmodel = quantize_model(fp_model, config, keep_bn=True)
    calibrate(qmodel, data.x_calib)                                      # step 3
    history = {"ptq_acc": evaluate(qmodel, data.x_test, data.y_test), "loss": [], "test_acc": []}
    quant_params = set_trainable(qmodel, trainable)                      # step 4
    qids = {id(p) for p in quant_params}
    weights = [p for p in qmodel.parameters() if id(p) not in qids]
    # fused: its square root is the exact vector instruction, the same on every CPU (refimpl.numerics)
    opt = torch.optim.Adam([{"params": weights, "lr": lr}, {"params": quant_params, "lr": quant_lr}],
                           fused=True)
    n = len(x)
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    device = next(qmodel.parameters()).device

    qmodel.train()
    bar = tqdm(range(epochs), desc=f"QAT {trainable}", unit="epoch", disable=not progress)
    for _ in bar:
        perm = torch.randperm(n, generator=gen, device=x.device)
        total = torch.zeros((), device=device)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            xb, yb = x[idx].to(device), y[idx].to(device)
            loss = F.cross_entropy(qmodel(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                # a learned scale must stay > 0 (Adam moves it by ~quant_lr per step)
                _clamp_scales(qmodel)
            total += loss.detach() * len(idx)
        history["loss"].append(total.item() / n)
        if eval_each_epoch:
            history["test_acc"].append(evaluate(qmodel, data.x_test, data.y_test))
            bar.set_postfix(loss=f"{history['loss'][-1]:.4f}", acc=f"{history['test_acc'][-1]:.2f}")
        else:
            bar.set_postfix(loss=f"{history['loss'][-1]:.4f}")
    # freeze: fixed (scale, integer zero point) buffers, as deployed; the state_dict then loads
    # into a plain quantize_model(...) of the same folded model and config
    set_trainable(qmodel, "none")
    qmodel.eval()
    if bn == "keep":
        if bn_reestimation:
            history["before_reestimation_acc"] = evaluate(qmodel, data.x_test, data.y_test)
            reestimate_bn(qmodel, x.to(device), batch_size=max(2, batch_size))
        qmodel, clamped = merge_bn(qmodel, return_report=True)
        history["merge_clamped"] = sum(clamped.values())
    history["final_acc"] = evaluate(qmodel, data.x_test, data.y_test)
    history["seconds"] = time.perf_counter() - t0
    history["cpu_seconds"] = time.process_time() - c0
    return qmodel, history


def _clamp_scales(qmodel: nn.Module) -> None:
    """Keep every learned scale >= float32 eps (fake quantizers reject scale <= 0)."""
    eps = torch.finfo(torch.float32).eps
    for q in list(weight_quantizers(qmodel).values()) + list(act_quantizers(qmodel).values()):
        if isinstance(q.scale, nn.Parameter):
            q.scale.clamp_(min=eps)

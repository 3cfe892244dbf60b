"""The white paper's standard QAT pipeline (§4.4, Fig. 11): fold BN, quantize, PTQ-initialise the
ranges, learn weights and quantization parameters with Adam.

White paper: Nagel et al. 2021, "A White Paper on Neural Network Quantization" (arXiv 2106.08295),
§4.2 "Batch normalization folding and QAT", §4.3 "Initialization for QAT", §4.4 "Standard QAT
pipeline".
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from .._checks import check_choice, check_int, check_positive
from ..fold import fold_all_bn, reestimate_bn
from ..graph import device_of
from ..qmodel import (BN_FOLDS, QuantConfig, act_quantizers, calibrate, freeze, fuse_bn, get_kind, merge_bn,
                      quantize_model, quantizer_kinds, set_kind_options, set_trainable, unfuse_bn, weight_quantizers)
from ..train import evaluate, fit

__all__ = ["qat_pipeline", "BN_MODES", "qat_kinds"]

BN_MODES = tuple(BN_FOLDS)
"""The ``bn`` strategies of :func:`qat_pipeline`: the names of MQBench's BN folds
(``refimpl.qmodel.BN_FOLDS``: "keep", "static", "freeze", "naive", "white_paper", "torch")."""


def qat_kinds() -> tuple[str, ...]:
    """The registered quantizer kinds that QAT can learn (``QuantizerKind.trainable``): "ste",
    "lsq", "dsq", "pot", "apot", "pact", "dorefa", "qil" and any kind registered later with
    ``trainable = True``."""
    return tuple(k for k in quantizer_kinds() if get_kind(k).trainable)


def qat_pipeline(fp_model: nn.Module, data, config: QuantConfig, *, trainable: str = "lsq", epochs: int = 8,
                 lr: float = 3e-3, quant_lr: float | None = None, batch_size: int = 128, seed: int = 0,
                 bn: str = "static", bn_reestimation: bool = False, eval_each_epoch: bool = True,
                 progress: bool = True, kind_options: dict | None = None) -> tuple[torch.fx.GraphModule, dict]:
    """Quantization-aware training of a trained FP32 model: the white paper's pipeline (§4.4, Fig. 11).

    Steps, each as the paper recommends:

    1. BatchNorm (§4.2, Table 7 there; MQBench's strategies, ``refimpl.qmodel.BN_FOLDS``, its
       code numbers in brackets). ``bn="static"`` (0, the paper's recommendation): static
       folding with the running statistics before QAT (``refimpl.fold.fold_all_bn``; no BN
       during QAT). ``bn="keep"`` (-1, "keep original BN (per-channel)"): each BN stays in float
       after its quantized layer and trains with batch statistics; after training it is merged
       into the per-channel weight scales (``refimpl.qmodel.merge_bn``; needs per-channel
       symmetric weights). ``bn="freeze"`` (1), ``"naive"`` (2, Jacob et al. 2018),
       ``"white_paper"`` (3, Krishnamoorthi 2018) and ``"torch"`` (4, PyTorch's ConvBn2d): each
       quantized layer and its BN are fused (``refimpl.qmodel.fuse_bn`` after
       ``quantize_model(fp_model, config, keep_bn=True)``), the weight quantizer sees the folded
       weight during QAT, and after training each becomes a plain quantized layer with the
       folded weight and the same quantizer (``refimpl.qmodel.unfuse_bn``; any weight grid).
       With ``bn_reestimation=True`` (keep, naive, white_paper, torch) the BN statistics are
       first recomputed on ``data.x_train`` with the final quantized weights
       (``refimpl.fold.reestimate_bn``, Nagel et al. 2022); "freeze" refuses it: its statistics
       are by definition the fixed ones its folded weights were trained with. The paper's
       optional cross-layer equalization step (for depthwise-separable models) is not part of
       this function: apply it to ``fp_model`` first.
    2. Add quantizers (§2.3): ``refimpl.qmodel.quantize_model(folded, config)``.
    3. Range estimation (§4.3, §4.4 step 3): weight ranges as ``config.weight_range_method``,
       activation ranges calibrated on ``data.x_calib`` with ``config.act_range_method``. The paper
       recommends the MSE criterion for both (min-max can be better for per-channel weights):
       pass ``QuantConfig(weight_range_method="mse", act_range_method="mse", ...)`` to follow it.
    4. Learnable quantization parameters (§4.1, §4.4 step 4): ``set_trainable(qmodel, trainable)``
       -- "lsq" (LSQ step size, Esser et al. 2020), "ste" (scale and zero point with the STE
       gradients of ``refimpl.qat.ste_gradients``) or any other kind of ``qat_kinds()`` ("dsq",
       "pot", "apot", ...), initialised from the calibrated ranges, with ``kind_options``
       ({name: value}, e.g. ``{"rcf": False}``) set on every quantizer whose kind has them
       (``refimpl.qmodel.set_kind_options``). Trained jointly with the weights and biases by Adam
       (the paper: adaptive optimizers avoid retuning the quantizer learning rate), cosine decay
       from ``lr`` to 0 over all steps. Adam's step is ~lr in parameter units whatever the
       gradient's scale, and quantizer scales are ~1e-2, so their learning rate is
       ``quant_lr`` (default lr / 10).

    The defaults (8 epochs, lr 3e-3, batch 128) keep a run on digits or MNIST-1D ResNets under
    ~15 s of CPU time on one thread (MobileNetV2 ~20-40 s).

    Quantizers of a kind with a non-uniform grid (``QuantizerKind.affine`` False: PoT, APoT) keep
    their kind after training instead of being frozen to a uniform grid; with ``bn="keep"`` their
    BN is then not merged (no per-channel scale to merge it into): it stays in float, in eval mode
    with its running statistics, and ``history["bn_merged"]`` says which happened. The same holds
    for per-tensor or asymmetric weights with ``bn="keep"``: BN stays in float (MQBench's academic
    setting, "Fold BN: No"); integer hardware needs one of the folding strategies instead.

    Determinism: mini-batch order from a ``torch.Generator`` seeded with ``seed``; the global
    RNG is not used (no dropout, no random init), so a seed gives bit-identical weights on the
    same machine, device and thread count. The qmodel trains in its own mode; ``fp_model`` and
    ``data`` are not modified.

    fp_model: trained float model (BN allowed; fx-traceable). data: a ``refimpl.data.DataSplit``
    (x_train, y_train, x_calib, x_test, y_test). Returns ``(qmodel, history)``: the trained
    ``GraphModule`` in eval mode with its quantizers frozen (``set_trainable(qmodel, "fixed")``:
    the learned scales and rounded zero points become fixed buffers), so its state_dict loads
    into ``quantize_model(fold_all_bn(fp_model), config)``; and history = {"ptq_acc": test
    accuracy (%) of the PTQ initialisation, "loss": mean training loss per epoch, "test_acc":
    test accuracy (%) after each epoch (trainable quantizers; empty with ``eval_each_epoch=False``,
    which saves those evaluations), "final_acc": test accuracy of the
    returned, frozen model (BN merged for ``bn="keep"``), and for every ``bn`` but "static"
    "bn_merged" (False only for "keep" with a non-uniform kind), "before_reestimation_acc" (with
    ``bn_reestimation``) and "merge_clamped" (weight codes clamped by ``merge_bn``; 0 when not
    merged and for the fused strategies, whose unfusing clamps nothing), "weight_params" {layer: {name:
    values}} and "act_params" {site: {name: values}}: every 0-d learned quantizer parameter (DSQ's
    and APoT's ``alpha``, a per-tensor LSQ ``scale``, ...) at the start and after each step,
    "seconds": wall time of the whole pipeline, "cpu_seconds": its process CPU time (all threads;
    equals the wall time on an idle machine with one thread)}.

    Used in :ref:`ch6-sec-the-qat-pipeline`, :ref:`ch9-sec-training-with-dsq`,
    :ref:`ch10-sec-training-with-the-grids`.
    """
    epochs, lr, quant_lr, batch_size, seed = _check_args(
        fp_model, data, config, trainable, epochs, lr, quant_lr, batch_size, seed, bn, bn_reestimation,
        eval_each_epoch, progress, kind_options)

    t0, c0 = time.perf_counter(), time.process_time()
    if bn == "static":
        qmodel = quantize_model(fold_all_bn(fp_model), config)           # steps 1-2
    else:
        qmodel = fuse_bn(quantize_model(fp_model, config, keep_bn=True), bn)   # "keep": as it is
    calibrate(qmodel, data.x_calib)                                      # step 3
    quant_params = set_trainable(qmodel, trainable)                      # step 4
    if kind_options:
        set_kind_options(qmodel, kind_options)
        # an option may add a learned tensor (LSQ's learn_zero_point): collect them afresh
        quant_params = [p for q in (*weight_quantizers(qmodel).values(), *act_quantizers(qmodel).values())
                        for p in q.parameters(recurse=False)]
    history = {"ptq_acc": evaluate(qmodel, data.x_test, data.y_test), "loss": [], "test_acc": []}
    record = _scalar_recorder(qmodel, history)

    def after_step():
        """Keep learned scales positive; record the quantizers' scalar parameters."""
        _clamp_scales(qmodel)
        record()
    qids = {id(p) for p in quant_params}
    weights = [p for p in qmodel.parameters() if id(p) not in qids]
    # fused: its square root is the exact vector instruction, the same on every CPU (refimpl.numerics)
    opt = torch.optim.Adam([{"params": weights, "lr": lr}, {"params": quant_params, "lr": quant_lr}],
                           fused=True)
    steps = epochs * math.ceil(len(data.x_train) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)

    def after_epoch(epoch, loss):
        """Test accuracy after each epoch (trainable quantizers), shown on the progress bar."""
        history["test_acc"].append(evaluate(qmodel, data.x_test, data.y_test))
        return {"acc": f"{history['test_acc'][-1]:.2f}"}

    # a learned scale must stay > 0 (Adam moves it by ~quant_lr per step): clamped after each step
    history["loss"] = fit(qmodel, data, opt, scheduler=sched, epochs=epochs, batch_size=batch_size, seed=seed,
                          after_step=after_step,
                          after_epoch=after_epoch if eval_each_epoch else None,
                          progress=progress, desc=f"QAT {trainable}")["loss"]
    # freeze: fixed (scale, integer zero point) buffers, as deployed; the state_dict then loads
    # into a plain quantize_model(...) of the same folded model and config
    freeze(qmodel)
    qmodel.eval()
    if bn != "static":
        mergeable = get_kind(trainable).affine and config.weight_per_channel and config.weight_symmetric
        qmodel = _finish_bn(qmodel, bn, bn_reestimation, mergeable, data, batch_size, history)
    history["final_acc"] = evaluate(qmodel, data.x_test, data.y_test)
    history["seconds"] = time.perf_counter() - t0
    history["cpu_seconds"] = time.process_time() - c0
    return qmodel, history


def _check_args(fp_model, data, config, trainable, epochs, lr, quant_lr, batch_size, seed, bn, bn_reestimation,
                eval_each_epoch, progress, kind_options):
    """Validate qat_pipeline's arguments; return (epochs, lr, quant_lr, batch_size, seed) normalised."""
    if not isinstance(fp_model, nn.Module):
        raise TypeError(f"fp_model must be a torch.nn.Module, got {type(fp_model).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a refimpl.qmodel.QuantConfig, got {type(config).__name__}")
    missing = [a for a in ("x_train", "y_train", "x_calib", "x_test", "y_test") if not hasattr(data, a)]
    if missing:
        raise TypeError(f"data must be a DataSplit; {type(data).__name__} lacks {missing}")
    check_choice(trainable, "trainable", qat_kinds())
    if kind_options is not None and not isinstance(kind_options, dict):
        raise TypeError(f"kind_options must be a dict {{name: value}} or None, got {type(kind_options).__name__}")
    check_choice(bn, "bn", BN_MODES)
    if not isinstance(bn_reestimation, bool):
        raise TypeError(f"bn_reestimation must be a bool, got {bn_reestimation!r}")
    if bn_reestimation and bn in ("static", "freeze"):
        raise ValueError('bn_reestimation=True needs bn="keep", "naive", "white_paper" or "torch" (after static '
                         'folding there are no BN statistics; "freeze" keeps the ones its weights were folded with)')
    epochs = check_int(epochs, "epochs", low=1)
    lr = check_positive(lr, "lr")
    quant_lr = lr / 10 if quant_lr is None else check_positive(quant_lr, "quant_lr")
    batch_size = check_int(batch_size, "batch_size", low=1)
    seed = check_int(seed, "seed", low=0)
    for name, flag in (("eval_each_epoch", eval_each_epoch), ("progress", progress)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if len(data.x_train) != len(data.y_train):
        raise ValueError(f"data.x_train has {len(data.x_train)} rows but data.y_train has {len(data.y_train)}")
    return epochs, lr, quant_lr, batch_size, seed


def _finish_bn(qmodel, bn, bn_reestimation, mergeable, data, batch_size, history):
    """After QAT with BN kept or fused: re-estimate the BN statistics if asked, then merge ("keep",
    affine kinds on per-channel symmetric weights) or unfuse (fused strategies) the BN; return the
    BN-free (or kept-BN) model."""
    if bn_reestimation:
        history["before_reestimation_acc"] = evaluate(qmodel, data.x_test, data.y_test)
        device = device_of(qmodel, default=torch.device("cpu"))
        reestimate_bn(qmodel, data.x_train.to(device), batch_size=max(2, batch_size))
    history["merge_clamped"] = 0
    if bn != "keep":
        history["bn_merged"] = True
        return unfuse_bn(qmodel)
    history["bn_merged"] = mergeable
    if mergeable:
        qmodel, clamped = merge_bn(qmodel, return_report=True)
        history["merge_clamped"] = sum(clamped.values())
    return qmodel


def _scalar_recorder(qmodel: nn.Module, history: dict):
    """Start history["weight_params"] {layer: {name: [value]}} and history["act_params"] {site: ...}
    with every 0-d learned quantizer parameter; return a function appending their current values."""
    def scalars(q):
        return {n: p for n, p in q.named_parameters(recurse=False) if p.ndim == 0}
    groups = {"weight_params": {n: d for n, q in weight_quantizers(qmodel).items() if (d := scalars(q))},
              "act_params": {n: d for n, q in act_quantizers(qmodel).items() if (d := scalars(q))}}
    for key, group in groups.items():
        history[key] = {n: {p: [float(t.detach())] for p, t in d.items()} for n, d in group.items()}

    def record():
        for key, group in groups.items():
            for n, d in group.items():
                for p, t in d.items():
                    history[key][n][p].append(float(t.detach()))
    return record


def _clamp_scales(qmodel: nn.Module) -> None:
    """Clamp every learned scale of qmodel's quantizers to >= float32 eps, in place (call under no_grad).

    A scale <= 0 has no grid (white paper §2.2: s > 0); fake quantizers reject it.
    """
    eps = torch.finfo(torch.float32).eps
    for q in list(weight_quantizers(qmodel).values()) + list(act_quantizers(qmodel).values()):
        if isinstance(q.scale, nn.Parameter):
            q.scale.clamp_(min=eps)

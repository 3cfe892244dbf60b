"""MQBench's benchmark in miniature: one QAT algorithm, on one hardware backend, under one regime.

MQBench (Li et al. 2021, "MQBench: Towards Reproducible and Deployable Model Quantization
Benchmark", arXiv 2111.03759) trains every QAT algorithm with the same recipe, from the same
FP32 checkpoint, and under the rules of each deployment backend
(``refimpl.qmodel.BACKENDS``). :func:`mqbench_qat` is that experiment's unit: it builds the
backend's ``QuantConfig``, refuses an algorithm the backend cannot run, and trains with
``refimpl.qat.qat_pipeline``. The algorithms (:data:`MQBENCH_ALGORITHMS`) are quantizer kinds
with the settings MQBench's documentation gives for them (``docs/.../algorithm/index.rst`` of
the authors' paper-era code, ``ModelTC/mqbench-paper``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .._checks import check_choice
from ..fold import fold_all_bn
from ..qmodel import first_last_bits, get_backend
from .pipeline import qat_pipeline

__all__ = ["Algorithm", "MQBENCH_ALGORITHMS", "mqbench_qat"]


@dataclass(frozen=True)
class Algorithm:
    """A QAT algorithm as MQBench runs it: a quantizer kind and its options.

    ::

        kind:     the quantizer kind (``refimpl.qmodel.quantizer_kinds()``) of weights and activations.
        options:  kind options set on every quantizer that has them (``set_kind_options``).
        paper:    the method's reference.
        settings: what MQBench's documentation says about its setting, and where this differs.
    """

    kind: str
    options: dict = field(default_factory=dict)
    paper: str = ""
    settings: str = ""


MQBENCH_ALGORITHMS = {
    "lsq": Algorithm(
        "lsq", {"learn_zero_point": True},
        "Esser et al. 2020 (LSQ); Bhalgat et al. 2020 (LSQ+) on asymmetric grids",
        "gradient scale 1/sqrt(N Q_P), per channel for per-channel weights; the zero point learned "
        "on asymmetric backends (LSQ+). MQBench initialises s = 2|w|_1/sqrt(N Q_P); here every "
        "algorithm starts from the same calibrated ranges."),
    "pact": Algorithm(
        "pact", {},
        "Choi et al. 2018 (PACT)",
        "clip alpha initialised at 6, (-alpha, alpha) on symmetric backends, (beta, alpha) with beta "
        "initialised at -6 on asymmetric ones; weights as DoReFa."),
    "dorefa": Algorithm(
        "dorefa", {},
        "Zhou et al. 2016 (DoReFa-Net)",
        "weights tanh(w)/max|tanh(w)| on the backend's grid; activations clipped to [0, 1] (unsigned "
        "sites) or [-1, 1] (signed sites, the hardware setting)."),
    "qil": Algorithm(
        "qil", {},
        "Jung et al. 2019 (QIL)",
        "interval centre and distance learned with LSQ's gradient scale (replacing QIL's 0.01); the "
        "transformer exponent gamma fixed at 1 (MQBench: learning it does not converge)."),
    "dsq": Algorithm(
        "dsq", {"hard_forward": True},
        "Gong et al. 2019 (DSQ)",
        "MQBench's released variant: hard forward pass, the soft quantizer's gradient. MQBench "
        "starts alpha at 0.4 and clips weights at mu +- 2.6 sigma; here alpha starts at 0.2 and the "
        "range is the calibrated one."),
    "apot": Algorithm(
        "apot", {},
        "Li, Dong, Wang 2020 (APoT)",
        "academic backend only (a non-uniform grid); reparameterised clipping gradient, no weight "
        "normalisation."),
}
"""The QAT algorithms of MQBench's academic track as run here: {name: :class:`Algorithm`}.

Used in :ref:`ch11-sec-one-regime`."""


def mqbench_qat(fp_model: nn.Module, data, backend: str = "academic", algorithm: str = "lsq",
                weight_bits: int = 4, act_bits: int = 4, *, bn: str = "torch", first_last: int | None = 8,
                weight_range_method: str = "mse", act_range_method: str = "mse", config_options: dict | None = None,
                **regime):
    """QAT of ``fp_model`` by one algorithm under one backend's rules (MQBench, Li et al. 2021).

    backend: a name of ``refimpl.qmodel.backend_names()`` (or a ``Backend``); algorithm: a key of
    :data:`MQBENCH_ALGORITHMS`. ValueError, listing the valid names, for an unknown one, and for
    an algorithm the backend cannot express (APoT's grid on integer hardware). The backend fixes
    symmetry, granularity, power-of-two scales, the insertion pattern and the activation sign;
    the regime fixes the rest, the same for every cell: ``bn`` the BatchNorm-folding strategy
    (MQBench's experiments all use its strategy 4, PyTorch's fold, "torch"), ``first_last`` the
    bit-width of the first and last layers (None: ``weight_bits``/``act_bits`` everywhere), the
    range methods that initialise the quantizers, ``config_options`` further ``QuantConfig``
    fields the backend leaves free (e.g. ``{"act_samples": 1024}``), and ``regime``:
    ``qat_pipeline``'s epochs, lr, quant_lr, batch_size, seed, eval_each_epoch, progress.

    Returns ``qat_pipeline``'s (qmodel, history), with history["backend"], ["algorithm"].

    Used in :ref:`ch11-sec-one-regime`.
    """
    b = get_backend(backend)
    check_choice(algorithm, "algorithm", tuple(MQBENCH_ALGORITHMS))
    algo = MQBENCH_ALGORITHMS[algorithm]
    b.check_kind(algo.kind)
    if config_options is not None and not isinstance(config_options, dict):
        raise TypeError(f"config_options must be a dict of QuantConfig fields or None, got {config_options!r}")
    config = b.config(weight_bits, act_bits, weight_range_method=weight_range_method,
                      act_range_method=act_range_method, **(config_options or {}))
    if first_last is not None:
        # the sites of the first and last layers' inputs, found on the BN-free model
        config = first_last_bits(fold_all_bn(fp_model), config, first_last)
    qmodel, history = qat_pipeline(fp_model, data, config, trainable=algo.kind, bn=bn,
                                   kind_options=dict(algo.options) or None, **regime)
    history["backend"], history["algorithm"] = b.name, algorithm
    return qmodel, history

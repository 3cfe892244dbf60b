"""How a model is quantized: :class:`QuantConfig` (white paper §2.2 grids, §3.1 range setting)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .._api import check_renamed
from .._checks import check_choice, check_int
from ..quant import QuantSpec
from .observers import KEPT_SAMPLES
from .quantizers import quantizer_kinds

__all__ = ["QuantConfig", "WEIGHT_RANGES", "ACT_RANGES", "INSERTION_PATTERNS"]

# the range methods offered for weights (set from the weight tensor itself) and activations
WEIGHT_RANGES = ("minmax", "mse")
ACT_RANGES = tuple(KEPT_SAMPLES)
# the "Graph" column of MQBench's backend table (Li et al. 2021)
INSERTION_PATTERNS = {
    1: "inputs of quantized Conv/Linear layers (academic)",
    2: "also inputs of residual additions and pooling (TensorRT)",
    3: "every tensor that leaves an operator (whole graph in integers)",
}
"""MQBench's quantizer-insertion patterns, {number: what is quantized} (``QuantConfig.insertion``).

Used in :ref:`ch11-sec-where-the-quantizers-sit`."""


@dataclass(frozen=True)
class QuantConfig:
    """How a model is quantized (white paper §2.2 grids, §3.1 range setting, §3 PTQ).

    ::

        weight_bits:        1..16.
        act_bits:           1..16, or None for no activation quantizers (weight-only).
        weight_per_channel: one scale per output channel (axis 0 of Conv/Linear weights), white
                            paper §2.2.2; else one per tensor.
        weight_symmetric:   symmetric signed weight grid (zero_point 0); else asymmetric.
        weight_narrow_range: drop the most negative weight code ([-127, 127] at 8 bits).
        act_symmetric:      symmetric activation grid for signed sites; unsigned sites (ReLU outputs)
                            always use [0, 2^b - 1] with zero_point 0, which is what both choices give
                            for a non-negative tensor.
        weight_range_method: "minmax" | "mse": the range method on the weight tensor (refimpl.calib).
        act_range_method:   "minmax" | "mse" | "percentile" | "kl_tensorrt": on the calibration activations.
        act_percentile:     q for "percentile" (in [50, 100]).
        act_samples:        values per site kept for "mse" (randomly subsampled: calib.mse costs
                            ~10-20 us per value) and 100x that for "percentile".
        keep_fp:            names of Conv/Linear layers whose weights and outputs stay in float.
        layer_weight_bits:  {layer name: bits} overriding ``weight_bits`` for those layers (mixed
                            precision; e.g. the common convention of 8-bit first and last layers, see
                            refimpl.qmodel.first_last_bits). Accepts a dict; stored as sorted pairs.
        site_act_bits:      {activation site name: bits} overriding ``act_bits`` at those sites
                            (site names as listed by ``act_quantizers``: "input", a layer's name, ...).
        seed:               seed of the activation subsampling.
        pot_scale:          every scale is a power of two (weights and activations; TVM's rule in
                            MQBench's backend table, ``refimpl.quant.pot_scale``).
        act_adaptive_sign:  True: a site whose tensor is non-negative by construction (a ReLU
                            output) gets the unsigned grid [0, 2^b - 1] (MQBench's "adaptive
                            signness", academic setting only); False: every site is signed, as the
                            hardware backends of MQBench's table quantize (a symmetric signed grid
                            then spends half its codes on negative values a ReLU never produces).
        insertion:          where activation quantizers sit, MQBench's three patterns
                            (``INSERTION_PATTERNS``): 1 = the inputs of quantized Conv/Linear layers
                            only (academic); 2 = also the inputs of residual additions and pooling
                            (TensorRT); 3 = every tensor an operator produces that leaves the grid
                            (the white paper's Fig. 4: layer outputs after a fused ReLU, additions,
                            average pooling, the model input), so the whole graph runs in integers.
        weight_quantizer, act_quantizer: the quantizer kind of the weights and of the activations,
                            a name in ``refimpl.qmodel.quantizer_kinds()`` ("fixed": the grid set by the
                            range method; "ste", "lsq": learned during QAT, see ``set_trainable``;
                            "pwlq": piecewise linear weights, post-training, weights only).

    Used in :ref:`ch5-sec-where-the-quantizers-go`, :ref:`ch6-sec-the-qat-pipeline`,
    :ref:`ch8-sec-post-training-quantization-with`, :ref:`ch9-sec-training-with-dsq`,
    :ref:`ch10-sec-training-with-the-grids`, :ref:`ch11-sec-where-the-quantizers-sit`,
    :ref:`ch12-sec-deployment`.
    """

    weight_bits: int = 8
    act_bits: int | None = 8
    weight_per_channel: bool = True
    weight_symmetric: bool = True
    weight_narrow_range: bool = False
    act_symmetric: bool = False
    weight_range_method: str = "minmax"
    act_range_method: str = "minmax"
    act_percentile: float = 99.99
    act_samples: int = 4096
    keep_fp: tuple = ()
    layer_weight_bits: tuple = ()
    site_act_bits: tuple = ()
    seed: int = 0
    weight_quantizer: str = "fixed"
    act_quantizer: str = "fixed"
    pot_scale: bool = False
    act_adaptive_sign: bool = True
    insertion: int = 3

    def __post_init__(self):
        check_int(self.weight_bits, "weight_bits", 1, 16)
        if self.act_bits is not None:
            check_int(self.act_bits, "act_bits", 1, 16)
        for name in ("weight_per_channel", "weight_symmetric", "weight_narrow_range", "act_symmetric", "pot_scale",
                     "act_adaptive_sign"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        check_choice(self.weight_range_method, "weight_range_method", WEIGHT_RANGES)
        check_choice(self.act_range_method, "act_range_method", ACT_RANGES)
        if not 50.0 <= float(self.act_percentile) <= 100.0:
            raise ValueError(f"act_percentile must be in [50, 100], got {self.act_percentile}")
        check_int(self.act_samples, "act_samples", 16)
        check_int(self.seed, "seed", 0)
        if isinstance(self.keep_fp, str) or not all(isinstance(n, str) for n in self.keep_fp):
            raise TypeError(f"keep_fp must be a tuple of layer names (str), got {self.keep_fp!r}")
        object.__setattr__(self, "keep_fp", tuple(self.keep_fp))
        for field in ("layer_weight_bits", "site_act_bits"):
            object.__setattr__(self, field, _bits_pairs(getattr(self, field), field))
        if self.site_act_bits and self.act_bits is None:
            raise ValueError("site_act_bits needs activation quantizers: act_bits is None")
        check_choice(self.weight_quantizer, "weight_quantizer", quantizer_kinds())
        check_choice(self.act_quantizer, "act_quantizer", quantizer_kinds())
        if isinstance(self.insertion, bool) or self.insertion not in INSERTION_PATTERNS:
            raise ValueError(f"insertion must be one of MQBench's patterns {tuple(INSERTION_PATTERNS)} "
                             f"({'; '.join(f'{k}: {v}' for k, v in INSERTION_PATTERNS.items())}), got {self.insertion!r}")

    def weight_spec(self, layer: str | None = None) -> QuantSpec:
        """The weight grid of ``layer`` (axis 0 = output channel when per-channel)."""
        bits = dict(self.layer_weight_bits).get(layer, self.weight_bits)
        return QuantSpec(bits, signed=True, symmetric=self.weight_symmetric,
                         narrow_range=self.weight_narrow_range, axis=0 if self.weight_per_channel else None,
                         pot_scale=self.pot_scale)

    def act_spec(self, signed: bool, site: str | None = None) -> QuantSpec:
        """The activation grid of a site: signed sites (and every site without
        ``act_adaptive_sign``) follow act_symmetric; unsigned are affine [0, 2^b - 1] (zero_point 0
        for a non-negative tensor)."""
        bits = dict(self.site_act_bits).get(site, self.act_bits)
        if signed or not self.act_adaptive_sign:
            return QuantSpec(bits, signed=True, symmetric=self.act_symmetric, pot_scale=self.pot_scale)
        return QuantSpec(bits, signed=False, symmetric=False, pot_scale=self.pot_scale)


def _bits_pairs(value, name: str) -> tuple:
    """A {name: bits} mapping (or pairs) as a sorted tuple of (str, int) pairs, validated."""
    if isinstance(value, dict):
        value = tuple(value.items())
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        raise TypeError(f"{name} must be a dict {{name: bits}}, got {value!r}")
    pairs = []
    for item in value:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(f"{name} must map names (str) to bit-widths (int), got item {item!r}")
        pairs.append((item[0], check_int(item[1], f"{name}[{item[0]!r}]", 1, 16)))
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"{name} names a layer or site twice: {names}")
    return tuple(sorted(pairs))


_RENAMED = {"weight_range": "weight_range_method", "act_range": "act_range_method"}
_dataclass_init = QuantConfig.__init__


@functools.wraps(_dataclass_init)
def _init(self, *args, **kwargs):
    check_renamed(kwargs, _RENAMED, "QuantConfig")
    _dataclass_init(self, *args, **kwargs)


QuantConfig.__init__ = _init

"""Hardware backends as data: the quantization rules a deployment target imposes (MQBench).

MQBench (Li et al. 2021, "MQBench: Towards Reproducible and Deployable Model Quantization
Benchmark", NeurIPS Datasets and Benchmarks, arXiv 2111.03759) argues that a QAT result means
something only under the rules of the hardware that will run it: whether weights and activations
are symmetric, per-tensor or per-channel, whether scales must be powers of two, where activation
quantizers sit, and whether BatchNorm must be folded. Its backend table (in the authors'
paper-era code, ``ModelTC/mqbench-paper``, ``docs/.../hardware/index.rst``, "Overview") lists six;
:data:`BACKENDS` holds them, one :class:`Backend` each, with the source of every rule. A new
backend is one more entry (:func:`register_backend`); its insertion pattern is one of
``refimpl.qmodel.INSERTION_PATTERNS``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._checks import check_choice
from .config import INSERTION_PATTERNS, QuantConfig
from .quantizers import get_kind

__all__ = ["Backend", "BACKENDS", "register_backend", "get_backend", "backend_names"]

_TABLE = "MQBench's backend table (mqbench-paper docs, hardware/index.rst, Overview)"
_SOLVER = "the paper-era solver's backend parameters (prototype/solver/cls_quant_solver.py)"


@dataclass(frozen=True)
class Backend:
    """One deployment target's quantization rules (MQBench, Li et al. 2021, backend table).

    ::

        name:               the registry name ("academic", "tensorrt", ...).
        provider, hardware: who makes it and what it runs on (as the table says).
        per_channel:        one weight scale per output channel (else per tensor); activations
                            are per tensor on every backend of the table.
        symmetric:          symmetric grids (zero point 0) for weights and activations; else
                            asymmetric (a learned or calibrated zero point).
        pot_scale:          scales are powers of two (``refimpl.quant.pot_scale``).
        insertion:          where activation quantizers sit, 1, 2 or 3
                            (``refimpl.qmodel.INSERTION_PATTERNS``).
        fold_bn:            BatchNorm must be folded into the weights for deployment.
        weight_narrow_range: weight codes [-(2^(b-1) - 1), 2^(b-1) - 1] (TensorRT's [-127, 127]).
        adaptive_sign:      a non-negative site (a ReLU output) gets the unsigned grid
                            (MQBench's "adaptive signness", academic only); else every
                            activation grid is signed.
        academic:           no hardware: accepts non-uniform grids (PoT, APoT), which integer
                            kernels cannot run.
        source:             where each rule comes from.

    Used in :ref:`ch11-sec-six-backends-as-data`.
    """

    name: str
    provider: str
    hardware: str
    per_channel: bool
    symmetric: bool
    pot_scale: bool
    insertion: int
    fold_bn: bool
    weight_narrow_range: bool = False
    adaptive_sign: bool = False
    academic: bool = False
    source: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"name must be a non-empty str, got {self.name!r}")
        for field in ("per_channel", "symmetric", "pot_scale", "fold_bn", "weight_narrow_range",
                      "adaptive_sign", "academic"):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(f"{field} must be a bool, got {getattr(self, field)!r}")
        if isinstance(self.insertion, bool) or self.insertion not in INSERTION_PATTERNS:
            raise ValueError(f"insertion must be one of {tuple(INSERTION_PATTERNS)}, got {self.insertion!r}")

    def check_kind(self, kind: str) -> str:
        """``kind`` if this backend can run its grid; ValueError if not (a non-uniform grid, PoT or
        APoT, on integer hardware: MQBench runs APoT in the academic setting only)."""
        impl = get_kind(kind)
        if not impl.uniform and not self.academic:
            runs = [b.name for b in BACKENDS.values() if b.academic]
            raise ValueError(f"the {kind!r} quantizer has a non-uniform grid, which {self.name} "
                             f"({self.provider}, {self.hardware}) cannot express: integer kernels need "
                             f"codes times one scale. Backends that accept it: {runs}")
        return kind

    def config(self, weight_bits: int = 8, act_bits: int | None = 8, **overrides) -> QuantConfig:
        """The ``QuantConfig`` of this backend at the given bit-widths; ``overrides`` are further
        QuantConfig fields (range methods, first/last-layer bits, ...) that the backend does not
        fix. Overriding a field the backend fixes is a ValueError."""
        fixed = {
            "weight_per_channel": self.per_channel,
            "weight_symmetric": self.symmetric,
            "weight_narrow_range": self.weight_narrow_range,
            "act_symmetric": self.symmetric,
            "pot_scale": self.pot_scale,
            "act_adaptive_sign": self.adaptive_sign,
            "insertion": self.insertion,
        }
        clash = sorted(set(overrides) & set(fixed))
        if clash:
            raise ValueError(f"the {self.name} backend fixes {clash}; choose another backend "
                             f"(one of {backend_names()}) or build a QuantConfig directly")
        for kind_field in ("weight_quantizer", "act_quantizer"):
            if kind_field in overrides:
                self.check_kind(overrides[kind_field])
        return QuantConfig(weight_bits=weight_bits, act_bits=act_bits, **fixed, **overrides)

    def describe(self) -> dict:
        """The rules as a table row: {column: text}."""
        return {
            "backend": self.name, "hardware": "none" if self.academic else f"{self.provider} {self.hardware}",
            "weights": ("per-channel" if self.per_channel else "per-tensor"),
            "symmetry": "sym." if self.symmetric else "asym.",
            "scale": "power of two" if self.pot_scale else "float",
            "act. sign": "adaptive" if self.adaptive_sign else "signed",
            "pattern": self.insertion, "fold BN": "yes" if self.fold_bn else "no",
        }


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Add a backend to :data:`BACKENDS` under its name (a new name; ValueError if taken)."""
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a Backend, got {type(backend).__name__}")
    if backend.name in BACKENDS:
        raise ValueError(f"a backend named {backend.name!r} is registered already: {backend_names()}")
    BACKENDS[backend.name] = backend
    return backend


def backend_names() -> tuple[str, ...]:
    """The registered backend names, in registration order.

    Used in :ref:`ch11-sec-six-backends-as-data`.
    """
    return tuple(BACKENDS)


def get_backend(name) -> Backend:
    """The registered backend ``name`` (a :class:`Backend` is returned as is); ValueError listing
    the registered names otherwise.

    Used in :ref:`ch11-sec-six-backends-as-data`.
    """
    if isinstance(name, Backend):
        return name
    check_choice(name, "backend", backend_names())
    return BACKENDS[name]


for _b in (
    Backend("academic", "none", "none", per_channel=False, symmetric=True, pot_scale=False, insertion=1,
            fold_bn=False, adaptive_sign=True, academic=True,
            source=f"{_TABLE}: FP32 scale, per-tensor, sym., graph 1, fold BN no; 'only quantizes the input "
                   f"and the weight of a convolutional or linear layer'; adaptive signness 'only designed "
                   f"for academic setting'; {_SOLVER}: ada_sign=True, symmetry=True, per_channel=False"),
    Backend("tensorrt", "NVIDIA", "GPU (Tesla T4/P4)", per_channel=True, symmetric=True, pot_scale=False,
            insertion=2, fold_bn=True, weight_narrow_range=True,
            source=f"{_TABLE}: FP32, per-channel, sym., graph 2, fold BN; the TensorRT page: weights "
                   f"[-127, 127], activations [-128, 127], 'quantize every layers ... including the "
                   f"elemental-wise Add and Pooling'; {_SOLVER}: symmetry=True, per_channel=True"),
    Backend("acl", "HUAWEI", "ASIC (Ascend310)", per_channel=True, symmetric=False, pot_scale=False,
            insertion=1, fold_bn=True,
            source=f"{_TABLE}: FP32, per-channel, asym., graph 1, fold BN ('quantizes the layer which has "
                   f"weights ... remains the rest part of network in FP32'); {_SOLVER}: symmetry=False, "
                   f"per_channel=True (the ACL page says the weights are symmetric: the table and solver "
                   f"are followed here)"),
    Backend("tvm", "OctoML", "CPU (ARM)", per_channel=False, symmetric=True, pot_scale=True, insertion=3,
            fold_bn=True,
            source=f"{_TABLE}: POT scale, per-tensor, sym., graph 3, fold BN; 'symmetric per-tensor ... "
                   f"represent the scale as power-of-two'; {_SOLVER}: symmetry=True, per_channel=False, "
                   f"pot_scale=True"),
    Backend("snpe", "Qualcomm", "DSP (Snapdragon)", per_channel=False, symmetric=False, pot_scale=False,
            insertion=3, fold_bn=True,
            source=f"{_TABLE}: FP32, per-tensor, asym., graph 3, fold BN; 'asymmetric and per-tensor for "
                   f"weights and activations'; {_SOLVER}: symmetry=False, per_channel=False"),
    Backend("fbgemm", "Facebook", "CPU (x86)", per_channel=True, symmetric=False, pot_scale=False, insertion=3,
            fold_bn=True,
            source=f"{_TABLE}: FP32, per-channel, asym., graph 3, fold BN; 'asymmetric per-channel and we "
                   f"quantize the whole network into int8'; {_SOLVER}: symmetry=False, per_channel=True"),
):
    register_backend(_b)
del _b

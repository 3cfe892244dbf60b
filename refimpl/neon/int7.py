"""EasyQuant's INT7 argument on the simulator: int16 lanes that wrap, and INT7 vs INT8 kernels.

EasyQuant (Wu et al. 2020, arXiv 2006.16669, §3.3 and Fig. 2) quantizes to 7 bits so that SMLAL
can add ``floor((2^15 - 1) / (2^6 - 1)^2) = 8`` products into a 16-bit lane before SADALP widens
it into 32 bits, against ``floor((2^15 - 1) / (2^7 - 1)^2) = 2`` at 8 bits
(:func:`max_smlal_accumulations`). The paper's count assumes the narrow (symmetric) range
``[-(2^(b-1) - 1), 2^(b-1) - 1]``: with the full range, ``-64 * -64`` eight times is 32768, one
past int16, so the full-range INT7 budget is 7 (:func:`refimpl.neon.max_accumulations`).

* :func:`smlal_accumulate` runs SMLAL again and again on a :class:`~refimpl.neon.Machine` and
  records every int16 lane against the exact sum, and where a lane first wraps.
* :func:`conv_gemm_shape` gives the (M, K, N) of a convolution's im2col GEMM (plain ints).
* :func:`compare_kernels` runs :data:`INT7_CONFIGS` (INT8 and INT7 GEMM kernels of
  :mod:`refimpl.neon.kernels`) on one GEMM on every modelled core and returns cycles per MAC,
  the INT7/INT8 speed-up of each like-for-like pair, and the outputs checked against numpy.
* :func:`resource_bounds` says which pipeline (or the issue/dispatch width) bounds a loop body.
* :data:`NCNN_INT8_LOOP` and :func:`ncnn_int8_gemm`: the K loop of ncnn's 2020 aarch64 int8
  GEMM (``int8kernel_m4``, ``src/layer/arm/gemm_symm_int8.h`` at commit 890aff0, 2020-06-19,
  the version in ncnn when EasyQuant was measured), written out by us in the simulator's
  assembly subset, as the INT8 baseline a 2020 ncnn build ran for im2col and 1x1 convolutions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import numpy as np

from .asm import Mem, parse
from .kernels import GemmResult, KernelProgram, run_gemm
from .machine import CORE_FEATURES, CORES, INSTRUCTION_FEATURES, Machine, lanes
from .timing import CORE_MODELS, Timer, klass, llvm_mca_steady_state, steady_state_cycles

__all__ = ["max_smlal_accumulations", "AccumulationTrace", "lane_accumulate", "smlal_accumulate", "conv_gemm_shape",
           "KernelConfig", "INT7_CONFIGS", "KernelComparison", "compare_kernels",
           "resource_bounds", "NCNN_INT8_LOOP", "ncnn_int8_gemm"]


def _check_int(name, v, lo, hi):
    if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be in {lo}..{hi}, got {v}")
    return int(v)


def max_smlal_accumulations(bits: int, *, narrow_range: bool = True) -> int:
    """Products of two ``bits``-bit signed integers an int16 lane holds, worst case (paper §3.3).

    ``narrow_range=True`` is the paper's count, ``floor((2^15 - 1) / (2^(bits-1) - 1)^2)``:
    2 at 8 bits, 8 at 7 bits (operands in ``[-(2^(bits-1) - 1), 2^(bits-1) - 1]``).
    ``narrow_range=False`` allows ``-2^(bits-1)``, whose square is one larger: 1 at 8 bits, 7 at
    7 bits (:func:`refimpl.neon.max_accumulations` ``(bits, bits, 16)``). ``bits`` in 2..8.

    Used in :ref:`ch7-sec-int7-on-arm`.
    """
    bits = _check_int("bits", bits, 2, 8)
    top = (1 << (bits - 1)) - (1 if narrow_range else 0)
    return ((1 << 15) - 1) // (top * top)


# ---- int16 lanes under repeated SMLAL ---------------------------------------------------------
@dataclass(frozen=True)
class AccumulationTrace:
    """What :func:`smlal_accumulate` (or :func:`refimpl.neon.lowbit.mla_accumulate`) recorded, one
    row per accumulation (row i: after i+1 instructions).

    ``lanes`` (accumulations, L): the destination's lanes as the simulator left them (int16,
    L = 8, for SMLAL; int8, L = 16, for MLA .16b); ``exact`` (accumulations, L) int64: the true
    running sums; ``first_wrap``: the 1-based accumulation at which some lane first differs from
    the exact sum (it wrapped), or None; ``a``, ``w`` (L,) int8: the operands of each lane.
    """
    lanes: np.ndarray
    exact: np.ndarray
    first_wrap: int | None
    a: np.ndarray
    w: np.ndarray

    @property
    def wrapped(self) -> np.ndarray:
        """(accumulations, L) bool: lanes whose value is not the exact sum."""
        return self.lanes.astype(np.int64) != self.exact


# the repeated accumulations the simulator can trace: (instruction text, operand lanes, destination
# arrangement); operands in v0 and v1, destination v2
_ACCUMULATORS = {"smlal": ("smlal v2.8h, v0.8b, v1.8b", 8, "8h", "int16 lane of SMLAL .8h"),
                 "mla": ("mla v2.16b, v0.16b, v1.16b", 16, "16b", "int8 lane of MLA .16b")}


def _lane_operand(name, x, n_lanes, what):
    arr = np.asarray(x)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be an integer or an integer array, got {arr.dtype}")
    if arr.ndim > 1 or (arr.ndim == 1 and not 1 <= arr.shape[0] <= n_lanes):
        raise ValueError(f"{name} must be a scalar or have 1..{n_lanes} elements (one per {what}), "
                         f"got shape {arr.shape}")
    if arr.size and (arr.min() < -128 or arr.max() > 127):
        raise ValueError(f"{name} values must be int8, in [-128, 127], got range "
                         f"[{arr.min()}, {arr.max()}]")
    out = np.zeros(n_lanes, np.int8)
    out[:] = np.resize(arr.astype(np.int8).ravel(), n_lanes) if arr.ndim else arr
    return out


def lane_accumulate(instruction: str, a, w, accumulations: int, *, core: str = "cortex-a53") -> AccumulationTrace:
    """Run a multiply-accumulate ``accumulations`` times from a zero accumulator on the simulator and
    record every lane against the exact sum: ``"smlal"`` is ``SMLAL v2.8h, v0.8b, v1.8b`` (eight
    int16 lanes, EasyQuant's INT7 argument), ``"mla"`` is ``MLA v2.16b, v0.16b, v1.16b`` (sixteen
    int8 lanes, DSQ's).

    ``a``, ``w``: the int8 operands of the lanes, scalars or arrays of 1..L values (repeated to
    fill the L lanes). ``accumulations`` in 1..4096. ``core``: one of :data:`~refimpl.neon.CORES`
    (the instruction is the same on all). :func:`smlal_accumulate` and
    :func:`refimpl.neon.lowbit.mla_accumulate` call it.
    """
    if instruction not in _ACCUMULATORS:
        raise ValueError(f"instruction must be one of {tuple(_ACCUMULATORS)}, got {instruction!r}")
    asm, n_lanes, arrangement, what = _ACCUMULATORS[instruction]
    av, wv = _lane_operand("a", a, n_lanes, what), _lane_operand("w", w, n_lanes, what)
    n = _check_int("accumulations", accumulations, 1, 4096)
    if core not in CORES:
        raise ValueError(f"core must be one of {CORES}, got {core!r}")
    m = Machine(core, 16)
    m.v[0, :n_lanes] = av.view(np.uint8)
    m.v[1, :n_lanes] = wv.view(np.uint8)
    out = np.zeros((n, n_lanes), np.int16 if arrangement == "8h" else np.int8)
    for i in range(n):
        m.run(asm)
        out[i] = lanes(m.v[2], arrangement)
    exact = np.cumsum(np.tile(av.astype(np.int64) * wv.astype(np.int64), (n, 1)), axis=0)
    bad = np.flatnonzero((out.astype(np.int64) != exact).any(axis=1))
    return AccumulationTrace(out, exact, int(bad[0]) + 1 if bad.size else None, av, wv)


def smlal_accumulate(a, w, accumulations: int, *, core: str = "cortex-a53") -> AccumulationTrace:
    """Run ``SMLAL v2.8h, v0.8b, v1.8b`` ``accumulations`` times from a zero accumulator on the
    simulator and record every int16 lane against the exact sum (Wu et al. 2020, §3.3, Fig. 2);
    :func:`lane_accumulate` ``("smlal", ...)``.

    ``a``, ``w``: the int8 operands of the eight lanes, scalars or arrays of 1..8 values
    (repeated to fill 8 lanes). ``accumulations`` in 1..4096. ``core``: one of
    :data:`~refimpl.neon.CORES` (the instruction is the same on all). With ``a = w = 127``
    the first wrap is at accumulation 3 (``3 * 16129 > 32767``), with ``63`` at 9, with
    ``-128`` at 2 and with ``-64`` at 8 (the paper's 8 needs the narrow range).

    Used in :ref:`ch7-sec-int7-on-arm`.
    """
    return lane_accumulate("smlal", a, w, accumulations, core=core)


# ---- convolution as a GEMM ----------------------------------------------------------------------
def _tuple(name, v, dims, lo):
    vals = (v,) * dims if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else v
    if (not isinstance(vals, (tuple, list)) or len(vals) != dims
            or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in vals)):
        raise ValueError(f"{name} must be an int or a tuple of {dims} ints, got {v!r}")
    if any(x < lo for x in vals):
        raise ValueError(f"{name} values must be >= {lo}, got {v!r}")
    return tuple(int(x) for x in vals)


def conv_gemm_shape(input_shape, out_channels: int, kernel_size, *, stride=1, padding=0,
                    dilation=1, groups: int = 1) -> tuple[int, int, int]:
    """(M, K, N) of a convolution's im2col GEMM, ``(M, K) @ (K, N)``, with torch's Conv1d/Conv2d
    arguments: M = batch * output positions, K = in_channels / groups * kernel positions,
    N = out_channels / groups; with ``groups > 1`` the convolution is ``groups`` such GEMMs.

    ``input_shape``: (N, C, L) or (N, C, H, W); ``kernel_size``, ``stride``, ``padding``,
    ``dilation``: an int or one per spatial dimension. Output size per dimension:
    ``(size + 2 padding - dilation (kernel - 1) - 1) // stride + 1`` (torch's formula).

    Used in :ref:`ch7-sec-int7-on-arm`, :ref:`ch9-sec-what-a-bit-costs-on-arm`.
    """
    if not isinstance(input_shape, (tuple, list)) or len(input_shape) not in (3, 4) or not all(
            isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 1
            for x in input_shape):
        raise ValueError(f"input_shape must be (N, C, L) or (N, C, H, W) of positive ints, got "
                         f"{input_shape!r}")
    batch, c_in, *spatial = (int(x) for x in input_shape)
    dims = len(spatial)
    out_channels = _check_int("out_channels", out_channels, 1, 1 << 30)
    groups = _check_int("groups", groups, 1, 1 << 30)
    if c_in % groups or out_channels % groups:
        raise ValueError(f"groups={groups} must divide in_channels={c_in} and "
                         f"out_channels={out_channels}")
    ks = _tuple("kernel_size", kernel_size, dims, 1)
    st = _tuple("stride", stride, dims, 1)
    pd = _tuple("padding", padding, dims, 0)
    dl = _tuple("dilation", dilation, dims, 1)
    positions = 1
    for size, k, s, p, d in zip(spatial, ks, st, pd, dl):
        out = (size + 2 * p - d * (k - 1) - 1) // s + 1
        if out < 1:
            raise ValueError(f"kernel_size {kernel_size!r} (dilation {dilation!r}) does not fit "
                             f"input {tuple(spatial)} with padding {padding!r}")
        positions *= out
    return batch * positions, c_in // groups * int(np.prod(ks)), out_channels // groups


# ---- INT7 vs INT8 kernels -----------------------------------------------------------------------
@dataclass(frozen=True)
class KernelConfig:
    """One GEMM kernel set-up for :func:`compare_kernels`: ``name``, the :func:`run_gemm`
    ``kernel``, operand ``bits`` (operands drawn from the narrow range
    ``[-(2^(bits-1) - 1), 2^(bits-1) - 1]``), ``accumulations`` and ``tile`` (None: the kernel's
    default), and ``baseline``: the name of the config its speed-up is measured against (None:
    none)."""
    name: str
    kernel: str
    bits: int
    accumulations: int | None = None
    tile: tuple | None = None
    baseline: str | None = None


INT7_CONFIGS: tuple[KernelConfig, ...] = (
    KernelConfig("INT8 SMLAL 4x4, 2/lane", "smlal", 8),
    KernelConfig("INT8 SMLAL 3x4, 2/lane", "smlal", 8, 2, (3, 4)),
    KernelConfig("INT7 SMLAL 3x4, 8/lane", "smlal", 7, 8, (3, 4), "INT8 SMLAL 3x4, 2/lane"),
    KernelConfig("INT8 SMLAL 2x4, 2/lane", "smlal", 8, 2, (2, 4)),
    KernelConfig("INT7 SMLAL 2x4, 8/lane", "smlal", 7, 8, (2, 4), "INT8 SMLAL 2x4, 2/lane"),
    KernelConfig("INT7 LD1R 4x8, 7/lane", "int7", 7, None, None, "INT8 SMLAL 4x4, 2/lane"),
)
"""The comparison of the INT7 argument: chapter 4's INT8 SMLAL kernel (4 x 4, two products per
int16 lane); the same SMLAL kernel at INT8 (2 per lane) and INT7 (8 per lane, the paper's count)
on the same 3 x 4 and 2 x 4 tiles (like for like: only the products per lane change); and the
``int7`` kernel (LD1R broadcasts, 7 per lane, full-range safe) against chapter 4's INT8 kernel.

Used in :ref:`ch7-sec-int7-on-arm`.
"""


@dataclass
class KernelComparison:
    """One row of :func:`compare_kernels`: the ``config``; per core, ``cycles_per_mac`` of the
    whole GEMM (None where the core lacks the kernel's instructions), ``loop_cycles_per_mac``
    (the K loop alone, steady state), ``llvm_mca_loop_cycles_per_mac`` (llvm-mca-19 on the same
    loop, where requested and modelled), ``speedup`` (the baseline's cycles / this config's; > 1:
    faster); ``exact``: the outputs equal numpy's int64 matmul; ``program``: the
    :class:`~refimpl.neon.KernelProgram` that ran."""
    config: KernelConfig
    cycles_per_mac: dict
    loop_cycles_per_mac: dict
    llvm_mca_loop_cycles_per_mac: dict
    speedup: dict
    exact: bool
    program: KernelProgram = field(repr=False)

    @property
    def saving(self) -> dict:
        """Per core, the fraction of the baseline's cycles saved, ``1 - 1 / speedup``."""
        return {c: (None if s is None else 1 - 1 / s) for c, s in self.speedup.items()}


def _loop_text(prog):
    loops = [text for kind, text, _ in prog.account if kind == "loop"]
    return loops[0] if loops else None


def compare_kernels(m: int, k: int, n: int, configs=INT7_CONFIGS, *, cores=None, seed: int = 0,
                    llvm_mca: bool = False) -> list[KernelComparison]:
    """Run every config's kernel on one (m, k) @ (k, n) GEMM on every core; cycles per MAC,
    INT7/INT8 speed-ups and outputs checked against numpy (Wu et al. 2020 §3.3, Tables 5-6).

    Operands are random (``seed``) in each config's narrow range, so no kernel can wrap and
    every output must equal the exact product (``exact``). ``cores``: default all of
    :data:`~refimpl.neon.CORES`. ``llvm_mca=True`` also times each K loop with llvm-mca-19
    (cortex-a55, -a72, -a76; FileNotFoundError if it is not installed). Returns one
    :class:`KernelComparison` per config, in order.

    Used in :ref:`ch7-sec-int7-on-arm`, :ref:`ch9-sec-what-a-bit-costs-on-arm`.
    """
    dims = [_check_int(nm, v, 1, 1 << 24) for nm, v in (("m", m), ("k", k), ("n", n))]
    cores = CORES if cores is None else tuple(cores)
    for c in cores:
        if c not in CORES:
            raise ValueError(f"cores must be taken from {CORES}, got {c!r}")
    names = [c.name for c in configs]
    if not configs or not all(isinstance(c, KernelConfig) for c in configs):
        raise TypeError("configs must be a non-empty sequence of KernelConfig")
    for c in configs:
        if c.baseline is not None and c.baseline not in names:
            raise ValueError(f"config {c.name!r} names baseline {c.baseline!r}, which is not "
                             f"in configs: {names}")
    rng = np.random.default_rng(seed)
    operands = {}
    rows = {}
    for cfg in configs:
        if cfg.bits not in operands:
            top = (1 << (cfg.bits - 1)) - 1
            a = rng.integers(-top, top + 1, (dims[0], dims[1])).astype(np.int8)
            b = rng.integers(-top, top + 1, (dims[1], dims[2])).astype(np.int8)
            operands[cfg.bits] = (a, b, a.astype(np.int64) @ b.astype(np.int64))
        a, b, ref = operands[cfg.bits]
        cpm, loop, mca, exact, prog = {}, {}, {}, True, None
        for core in cores:
            feat = INSTRUCTION_FEATURES.get(cfg.kernel)
            if feat is not None and feat not in CORE_FEATURES[core]:
                cpm[core] = loop[core] = None
                continue
            r = run_gemm(a, b, cfg.kernel, core=core, bits=cfg.bits, tile=cfg.tile,
                         accumulations=cfg.accumulations)
            exact &= bool(np.array_equal(r.result, ref))
            prog = r.program
            cpm[core] = r.cycles_per_mac
            text = _loop_text(prog)
            macs = prog.mr * prog.nr * prog.kstep
            loop[core] = None if text is None else steady_state_cycles(text, core) / macs
            if llvm_mca and text is not None and core != "cortex-a53":
                mca[core] = llvm_mca_steady_state(text, core) / macs
        rows[cfg.name] = KernelComparison(cfg, cpm, loop, mca, {}, exact, prog)
    for row in rows.values():
        base = rows[row.config.baseline] if row.config.baseline else None
        for core in cores:
            mine = row.cycles_per_mac[core]
            ref_c = None if base is None else base.cycles_per_mac[core]
            row.speedup[core] = None if mine is None or ref_c is None else ref_c / mine
    return [rows[nm] for nm in names]


# ---- what bounds a loop -------------------------------------------------------------------------
def resource_bounds(loop_asm: str, core: str) -> dict:
    """Lower bounds on a loop body's cycles per iteration from each resource of ``core``'s model
    (:data:`~refimpl.neon.timing.CORE_MODELS`), ignoring latencies. ``"pipes P|Q"``: for each
    set of pipes some micro-op may use, the cycles of the micro-ops confined to that set, spread
    evenly over it. ``"issue"`` (in-order A53/A55): cycles holding issue (single-issue loads,
    128-bit loads for their two load-path cycles) plus the rest at the issue width or on their
    busiest pipe, whichever is more. ``"dispatch"`` (out-of-order A72/A76): the dispatch
    groups of the body in program order, packed as the model packs them (a group holds
    ``width`` instructions and ``uop_width`` micro-ops, a post-indexed access one micro-op
    more, so a 3-micro-op LD1R on the A72 fills a group alone). The largest is
    the loop's resource bound; a steady state (:func:`~refimpl.neon.steady_state_cycles`)
    above it is latency-bound.
    """
    if core not in CORE_MODELS:
        raise ValueError(f"core must be one of {sorted(CORE_MODELS)}, got {core!r}")
    model = CORE_MODELS[core]
    demand: dict[frozenset, float] = {}
    free_demand: dict[str, float] = {}      # in-order: pipe occupancy of non-holding instructions
    hold_total = other = 0.0
    sizes: list[int] = []                   # micro-ops of each instruction, in order
    prog = parse(loop_asm)
    for ins in prog:
        e = model.entry(ins)
        for pipes, occ in e.uops:
            key = frozenset(pipes)
            demand[key] = demand.get(key, 0) + occ
        wb = any(isinstance(o, Mem) and o.mode in ("pre", "post") for o in ins.operands)
        sizes.append(len(e.uops) + wb)
        if model.kind == "inorder":
            k = klass(ins)
            hold = e.uops[0][1] if model.block_wide_loads and k in ("ld1", "ld1r") else 1
            if k in model.single_issue or hold >= 2:
                hold_total += hold
            else:
                other += 1
                for pipes, occ in e.uops:
                    if len(pipes) == 1:
                        free_demand[pipes[0]] = free_demand.get(pipes[0], 0) + occ
    out = {}
    for key in sorted(demand, key=lambda s: (len(s), sorted(s))):
        need = sum(v for k2, v in demand.items() if k2 <= key)
        out["pipes " + "|".join(sorted(key))] = need / len(key)
    if model.kind == "inorder":
        out["issue"] = hold_total + max([other / model.width] + list(free_demand.values()))
    else:
        # the third copy of the body adds what one iteration adds in a run of iterations
        out["dispatch"] = float(_dispatch_groups(sizes * 3, model)
                                - _dispatch_groups(sizes * 2, model))
    return out


def _dispatch_groups(sizes, model):
    """In-order dispatch groups, packed as the Timer packs them: a group closes at ``width``
    instructions, or when the next instruction's micro-ops would not fit in ``uop_width``."""
    groups, used, used_uops = 1, 0, 0
    for n in sizes:
        if used >= model.width or (model.uop_width and used_uops
                                   and used_uops + n > model.uop_width):
            groups, used, used_uops = groups + 1, 0, 0
        if model.uop_width and n > model.uop_width:
            groups += (n - 1) // model.uop_width
            n -= (n - 1) // model.uop_width * model.uop_width
        used, used_uops = used + 1, used_uops + n
    return groups


# ---- ncnn's 2020 int8 GEMM kernel, transcribed --------------------------------------------------
NCNN_INT8_LOOP = """ncnn_k16:
add x15, x1, #32
add x14, x0, #32
ld1 {v4.8b, v5.8b}, [x1], #16
ld1 {v2.8b, v3.8b}, [x0], #16
smull v0.8h, v4.8b, v2.8b
ld1 {v6.8b, v7.8b}, [x15], #16
smull v1.8h, v5.8b, v2.8b
ld1 {v24.8b, v25.8b}, [x14], #16
smlal v0.8h, v6.8b, v24.8b
smlal v1.8h, v7.8b, v24.8b
sadalp v8.4s, v0.8h
sadalp v9.4s, v1.8h
smull v0.8h, v4.8b, v3.8b
smull v1.8h, v5.8b, v3.8b
smlal v0.8h, v6.8b, v25.8b
smlal v1.8h, v7.8b, v25.8b
sadalp v12.4s, v0.8h
sadalp v13.4s, v1.8h
ld1 {v28.8b, v29.8b}, [x0], #16
smull v0.8h, v4.8b, v28.8b
smull v1.8h, v5.8b, v28.8b
ld1 {v26.8b, v27.8b}, [x14], #16
smlal v0.8h, v6.8b, v26.8b
smlal v1.8h, v7.8b, v26.8b
sadalp v16.4s, v0.8h
sadalp v17.4s, v1.8h
smull v0.8h, v4.8b, v29.8b
smull v1.8h, v5.8b, v29.8b
smlal v0.8h, v6.8b, v27.8b
smlal v1.8h, v7.8b, v27.8b
sadalp v20.4s, v0.8h
sadalp v21.4s, v1.8h
ld1 {v4.8b, v5.8b}, [x1], #16
smull v0.8h, v4.8b, v2.8b
smull v1.8h, v5.8b, v2.8b
ld1 {v6.8b, v7.8b}, [x15], #16
smlal v0.8h, v6.8b, v24.8b
smlal v1.8h, v7.8b, v24.8b
sadalp v10.4s, v0.8h
sadalp v11.4s, v1.8h
smull v0.8h, v4.8b, v3.8b
smull v1.8h, v5.8b, v3.8b
smlal v0.8h, v6.8b, v25.8b
smlal v1.8h, v7.8b, v25.8b
sadalp v14.4s, v0.8h
sadalp v15.4s, v1.8h
smull v0.8h, v4.8b, v28.8b
smull v1.8h, v5.8b, v28.8b
smlal v0.8h, v6.8b, v26.8b
smlal v1.8h, v7.8b, v26.8b
sadalp v18.4s, v0.8h
sadalp v19.4s, v1.8h
smull v0.8h, v4.8b, v29.8b
smull v1.8h, v5.8b, v29.8b
smlal v0.8h, v6.8b, v27.8b
smlal v1.8h, v7.8b, v27.8b
sadalp v22.4s, v0.8h
sadalp v23.4s, v1.8h
add x0, x0, #32
add x1, x1, #32
subs w20, w20, #2
b.ne ncnn_k16
"""
"""The K loop (label ``2:``) of ncnn's ``int8kernel_m4`` for four output columns
(``src/layer/arm/gemm_symm_int8.h``, Tencent/ncnn commit 890aff0, 2020-06-19), in the order the
file gives it, operands renamed ``%0 -> x0`` (A panel), ``%1 -> x1`` (B panel): one 4 x 4 int32
tile, 16 k per iteration (two blocks of 8), 256 MACs. Each output's two 8-byte products go
through SMULL + SMLAL into one of only two int16 registers (v0, v1), and SADALP must wait for
each SMLAL's result before the next SMULL may overwrite it: two products per lane, and a
dependent chain every four instructions. Packing (ncnn's ``reorder_a``/``reorder_b``): per 8 k,
A holds the 4 rows' 8 bytes in turn, B the 4 columns' 8 bytes."""

_NCNN_EPILOGUE = """addp v8.4s, v8.4s, v9.4s
addp v10.4s, v10.4s, v11.4s
addp v12.4s, v12.4s, v13.4s
addp v14.4s, v14.4s, v15.4s
addp v16.4s, v16.4s, v17.4s
addp v18.4s, v18.4s, v19.4s
addp v20.4s, v20.4s, v21.4s
addp v22.4s, v22.4s, v23.4s
addp v8.4s, v8.4s, v10.4s
addp v9.4s, v12.4s, v14.4s
addp v10.4s, v16.4s, v18.4s
addp v11.4s, v20.4s, v22.4s
st1 {v8.4s, v9.4s, v10.4s, v11.4s}, [x2]
"""


def _ncnn_program(kp):
    # prologue: ncnn zeroes v8-v23 with EOR (not in our subset: MOVI #0 does the same)
    pro = "\n".join([f"movi v{r}.4s, #0" for r in range(8, 24)] + [f"mov w20, #{kp // 8}"])
    asm = "\n".join(["// ncnn int8kernel_m4 (gemm_symm_int8.h @ 890aff0), 4x4 tile, K = "
                     f"{kp}", pro, NCNN_INT8_LOOP.rstrip("\n"), _NCNN_EPILOGUE])
    account = (("once", pro, 1), ("loop", NCNN_INT8_LOOP, kp // 16),
               ("once", _NCNN_EPILOGUE, 1))
    return KernelProgram("ncnn-int8kernel", 4, 4, 16, kp, 8, 2, False, asm, account)


def _program_cycles(prog, core):
    total = 0.0
    for kind, text, count in prog.account:
        if kind == "loop":
            total += count * steady_state_cycles(text, core)
        else:
            t = Timer(core)
            for ins in parse(text):
                t.step(ins)
            total += count * t.cycles
    return total


def ncnn_int8_gemm(A, B, *, core: str = "cortex-a53", trace: bool = False) -> GemmResult:
    """``A @ B`` through the transcribed ncnn 2020 int8 kernel (:data:`NCNN_INT8_LOOP`) on the
    simulator: int32 result and cycles, as :func:`~refimpl.neon.run_gemm` reports them.

    A: (M, K), B: (K, N) int8 arrays (or integers in [-127, 127]: like the kernel's int8 inputs,
    MIN * MIN twice would wrap an int16 lane, which ncnn's quantizer never produces). M and N
    are padded to multiples of 4 and K to a multiple of 16 with zeros (ncnn runs separate code
    for 8-, 4-, 2- and 1-deep remainders; not transcribed). ``trace=True`` runs every tile on a
    :class:`~refimpl.neon.Machine` (small sizes); otherwise numpy gives the (identical) result
    and cycles come from the pieces: prologue and epilogue timed once, the loop at its steady
    state. The ADDP reduction and a single 64-byte store stand in for ncnn's per-row stores.

    Used in :ref:`ch7-sec-int7-on-arm`, :ref:`ch9-sec-what-a-bit-costs-on-arm`.
    """
    if core not in CORES:
        raise ValueError(f"core must be one of {CORES}, got {core!r}")
    if not isinstance(trace, (bool, np.bool_)):
        raise TypeError(f"trace must be a bool, got {type(trace).__name__}")
    mats = []
    for name, x in (("A", A), ("B", B)):
        if not isinstance(x, np.ndarray) or x.dtype == np.bool_ \
                or not np.issubdtype(x.dtype, np.integer):
            raise TypeError(f"{name} must be an integer numpy array")
        if x.ndim != 2 or 0 in x.shape:
            raise ValueError(f"{name} must be a non-empty 2-D array, got shape {x.shape}")
        if x.min() < -127 or x.max() > 127:
            raise ValueError(f"{name} values must be in [-127, 127], got range "
                             f"[{x.min()}, {x.max()}]")
        mats.append(x.astype(np.int8))
    a, b = mats
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"A is {a.shape} and B is {b.shape}: A's columns (K) must equal B's rows")
    m, k = a.shape
    n = b.shape[1]
    mp, np_, kp = -(-m // 4) * 4, -(-n // 4) * 4, -(-k // 16) * 16
    prog = _ncnn_program(kp)
    tiles = (mp // 4) * (np_ // 4)
    if not trace:
        c = (a.astype(np.int64) @ b.astype(np.int64)).astype(np.int32)
        return GemmResult(c, tiles * _program_cycles(prog, core), tiles * prog.instructions,
                          m * k * n, prog.asm, prog, tiles)
    ap = np.zeros((mp, kp), np.int8)
    bp = np.zeros((kp, np_), np.int8)
    ap[:m, :k], bp[:k, :n] = a, b
    # reorder_a / reorder_b: per 4 rows (columns) and 8 k, each row's (column's) 8 bytes in turn
    pa = ap.reshape(mp // 4, 4, kp // 8, 8).transpose(0, 2, 1, 3).reshape(mp // 4, -1)
    pb = bp.reshape(kp // 8, 8, np_ // 4, 4).transpose(2, 0, 3, 1).reshape(np_ // 4, -1)
    mach = Machine(core, pa.size + pb.size + 64 + 64)
    mach.mem[:pa.size] = pa.view(np.uint8).ravel()
    mach.mem[pa.size:pa.size + pb.size] = pb.view(np.uint8).ravel()
    out_at = pa.size + pb.size
    c = np.zeros((mp, np_), np.int32)
    cycles, count = 0.0, 0
    for i in range(mp // 4):
        for j in range(np_ // 4):
            mach.x[0] = i * pa.shape[1]
            mach.x[1] = pa.size + j * pb.shape[1]
            mach.x[2] = out_at
            stats = mach.run(prog.asm)
            cycles += stats.cycles
            count += stats.instructions
            c[4 * i:4 * i + 4, 4 * j:4 * j + 4] = \
                mach.mem[out_at:out_at + 64].view("<i4").reshape(4, 4)
    return GemmResult(c[:m, :n], cycles, count, m * k * n, prog.asm, prog, tiles)

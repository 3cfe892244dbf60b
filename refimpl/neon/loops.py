"""Representative NEON integer loop bodies (GNU as text) and their comparison with llvm-mca.

:data:`LOOPS` maps a name to a loop body ending in ``subs`` + ``b.ne`` (a counted loop).
:func:`compare_with_llvm_mca` times each body with :func:`refimpl.neon.timing.steady_state_cycles`
and with llvm-mca-19 (:func:`refimpl.neon.timing.llvm_mca_steady_state`) and returns printable
rows; :data:`MARKED` lists the kernel/core pairs whose difference is explained, with the reason.
"""
from __future__ import annotations

import re
import statistics

from .timing import llvm_mca_steady_state, steady_state_cycles

__all__ = ["LOOPS", "MARKED", "reasons", "COMPARED_CORES", "without_post_index", "compare_with_llvm_mca",
           "GEMM_CONFIGS", "gemm_loops", "compare_recorded", "agreement_summary",
           "format_rows"]

LOOPS: dict[str, str] = {
    # gemmlowp-style int8 GEMM inner loop: 2 LHS x 2 RHS 16-byte slices, int8 x int8 products
    # into int16 (SMULL low half, SMLAL2 high half), pairwise widened into int32 (SADALP).
    "gemm_int8_smlal": """loop:
ld1 {v0.16b, v1.16b}, [x0], #32
subs x2, x2, #1
ld1 {v2.16b, v3.16b}, [x1], #32
smull v8.8h, v0.8b, v2.8b
smull v9.8h, v0.8b, v3.8b
smull v10.8h, v1.8b, v2.8b
smull v11.8h, v1.8b, v3.8b
smlal2 v8.8h, v0.16b, v2.16b
smlal2 v9.8h, v0.16b, v3.16b
smlal2 v10.8h, v1.16b, v2.16b
smlal2 v11.8h, v1.16b, v3.16b
sadalp v16.4s, v8.8h
sadalp v17.4s, v9.8h
sadalp v18.4s, v10.8h
sadalp v19.4s, v11.8h
b.ne loop
""",
    # SDOT 4x16 tile, k = 4 per iteration: 16 bytes of LHS (4 rows x 4 k), 64 bytes of RHS
    # (16 columns x 4 k), 16 SDOT by element into 16 int32x4 accumulators.
    "sdot_tile": """loop:
ld1 {v0.16b}, [x0], #16
subs x2, x2, #1
ld1 {v4.16b, v5.16b, v6.16b, v7.16b}, [x1], #64
sdot v16.4s, v4.16b, v0.4b[0]
sdot v17.4s, v5.16b, v0.4b[0]
sdot v18.4s, v6.16b, v0.4b[0]
sdot v19.4s, v7.16b, v0.4b[0]
sdot v20.4s, v4.16b, v0.4b[1]
sdot v21.4s, v5.16b, v0.4b[1]
sdot v22.4s, v6.16b, v0.4b[1]
sdot v23.4s, v7.16b, v0.4b[1]
sdot v24.4s, v4.16b, v0.4b[2]
sdot v25.4s, v5.16b, v0.4b[2]
sdot v26.4s, v6.16b, v0.4b[2]
sdot v27.4s, v7.16b, v0.4b[2]
sdot v28.4s, v4.16b, v0.4b[3]
sdot v29.4s, v5.16b, v0.4b[3]
sdot v30.4s, v6.16b, v0.4b[3]
sdot v31.4s, v7.16b, v0.4b[3]
b.ne loop
""",
    # INT7-style: 7-bit operands let several SMLAL/SMLAL2 accumulate into one int16 lane before
    # SADALP widens to int32 (here 4 products per int16 accumulator, two accumulators).
    "int7_smlal": """loop:
ld1 {v0.16b, v1.16b}, [x0], #32
subs x2, x2, #1
ld1 {v2.16b, v3.16b}, [x1], #32
smull v8.8h, v0.8b, v2.8b
smull v9.8h, v1.8b, v3.8b
smlal2 v8.8h, v0.16b, v2.16b
smlal2 v9.8h, v1.16b, v3.16b
smlal v8.8h, v1.8b, v2.8b
smlal v9.8h, v0.8b, v3.8b
smlal2 v8.8h, v1.16b, v2.16b
smlal2 v9.8h, v0.16b, v3.16b
sadalp v16.4s, v8.8h
sadalp v17.4s, v9.8h
b.ne loop
""",
    # DSQ low-bit loop: MLA .16b accumulating low-bit products in int8 lanes several times,
    # then SADDW/SADDW2 widening the int8 partial sums into int16.
    "dsq_mla_int8": """loop:
ld1 {v0.16b, v1.16b}, [x0], #32
subs x2, x2, #1
ld1 {v2.16b, v3.16b}, [x1], #32
movi v8.16b, #0
movi v9.16b, #0
mla v8.16b, v0.16b, v2.16b
mla v9.16b, v1.16b, v3.16b
mla v8.16b, v1.16b, v2.16b
mla v9.16b, v0.16b, v3.16b
mla v8.16b, v0.16b, v3.16b
mla v9.16b, v1.16b, v2.16b
saddw v16.8h, v16.8h, v8.8b
saddw2 v17.8h, v17.8h, v8.16b
saddw v18.8h, v18.8h, v9.8b
saddw2 v19.8h, v19.8h, v9.16b
b.ne loop
""",
    # Requantisation epilogue, 16 int32 accumulators -> 16 uint8: fixed-point multiplier
    # (SQRDMULH), rounding right shift (SRSHL by a negative shift), saturating narrows to int16
    # (SQXTN/SQXTN2) and to uint8 (SQXTUN/SQXTUN2), one 16-byte store.
    "requant": """loop:
ld1 {v0.4s, v1.4s, v2.4s, v3.4s}, [x0], #64
subs x2, x2, #1
sqrdmulh v0.4s, v0.4s, v28.4s
sqrdmulh v1.4s, v1.4s, v28.4s
sqrdmulh v2.4s, v2.4s, v28.4s
sqrdmulh v3.4s, v3.4s, v28.4s
srshl v0.4s, v0.4s, v29.4s
srshl v1.4s, v1.4s, v29.4s
srshl v2.4s, v2.4s, v29.4s
srshl v3.4s, v3.4s, v29.4s
sqxtn v4.4h, v0.4s
sqxtn2 v4.8h, v1.4s
sqxtn v5.4h, v2.4s
sqxtn2 v5.8h, v3.4s
sqxtun v6.8b, v4.8h
sqxtun2 v6.16b, v5.8h
st1 {v6.16b}, [x1], #16
b.ne loop
""",
    # micro: one dependent chain of Q-form MLA (accumulate latency bound)
    "micro_mla_chain": """loop:
mla v0.8h, v1.8h, v2.8h
subs x2, x2, #1
mla v0.8h, v3.8h, v4.8h
mla v0.8h, v5.8h, v6.8h
mla v0.8h, v7.8h, v8.8h
b.ne loop
""",
    # micro: eight independent SMLAL accumulators (throughput bound)
    "micro_smlal_indep": """loop:
smlal v16.4s, v0.4h, v1.4h
subs x2, x2, #1
smlal v17.4s, v0.4h, v2.4h
smlal v18.4s, v0.4h, v3.4h
smlal v19.4s, v0.4h, v4.4h
smlal v20.4s, v0.4h, v5.4h
smlal v21.4s, v0.4h, v6.4h
smlal v22.4s, v0.4h, v7.4h
smlal v23.4s, v0.4h, v8.4h
b.ne loop
""",
    # micro: independent basic vector adds (ASIMD arith throughput)
    "micro_add_indep": """loop:
add v16.4s, v0.4s, v1.4s
subs x2, x2, #1
add v17.4s, v0.4s, v2.4s
add v18.4s, v0.4s, v3.4s
add v19.4s, v0.4s, v4.4s
add v20.4s, v0.4s, v5.4s
add v21.4s, v0.4s, v6.4s
add v22.4s, v0.4s, v7.4s
add v23.4s, v0.4s, v8.4s
b.ne loop
""",
    # micro: D-form loads feeding D-form SMLAL (a 64-bit datapath kernel)
    "micro_ld_d_smlal": """loop:
ld1 {v0.8b}, [x0], #8
subs x2, x2, #1
ld1 {v1.8b}, [x1], #8
smlal v16.8h, v0.8b, v1.8b
sadalp v17.4s, v16.8h
b.ne loop
""",
}

COMPARED_CORES = ("cortex-a55", "cortex-a72", "cortex-a76")

# (kernel, core) -> the reasons the pair is excluded from the accuracy goal: which published
# figure our model follows where llvm-mca's model differs (each checked on llvm-mca's timeline
# view). One string per distinct reason, so that a table can list each reason once.
_A55_ACC = ("follows the A55 SWOG multiply-accumulate figure 4(1) (accumulator forwarded after 1 "
            "cycle, as in Arm's SLOTHY A55 model); LLVM's A55 model has no accumulate forwarding "
            "(every dependent SMLAL/MLA waits the full 4 cycles)")
_A55_INORDER = ("llvm-mca's in-order A55 model holds a short-latency instruction (`SUBS`, `B.NE`) until "
                "the preceding 4-cycle NEON instructions complete (in-order completion) and gives "
                "`SUBS` a 3-cycle latency to the branch; we follow the SWOG's fixed-depth pipeline "
                "(ALU result forwarded after 1 cycle, no writeback-order stall)")
_A55_LD1_D = ("LLVM gives a D-form LD1 latency 4 where we use the A55 guide's 3-cycle load-to-use "
              "(removing our accumulate forwarding leaves the pair unchanged)")
_N1_ACC = ("follows the A76/N1 SWOG accumulate figures (MLA Q-form 5(2), SMLAL 4(1)); LLVM's "
           "Neoverse N1 model has no accumulate forwarding")
_N1_MLA16B = ("LLVM's Neoverse N1 model has no row for MLA .16b (MLAv16i8 falls to the 2-cycle "
              "any-V-pipe default); we use the guide's Q-form multiply-accumulate row, 5(2) at "
              "1/2 per cycle on V0")
_ARTEFACT = "llvm-mca A55 artefact: its model serialises the base writeback of post-indexed loads"
MARKED: dict[tuple[str, str], tuple[str, ...]] = {
    ("micro_mla_chain", "cortex-a55"): (_A55_ACC,),
    ("int7_smlal", "cortex-a55"): (_A55_ACC,),
    ("dsq_mla_int8", "cortex-a55"): (_A55_ACC,),
    ("micro_ld_d_smlal", "cortex-a55"): (_A55_INORDER, _A55_LD1_D),
    ("micro_smlal_indep", "cortex-a55"): (_A55_INORDER,),
    ("micro_mla_chain", "cortex-a76"): (_N1_ACC,),
    ("micro_ld_d_smlal", "cortex-a76"): (_N1_ACC,),
    ("dsq_mla_int8", "cortex-a76"): (_N1_MLA16B,),
    ("sdot_tile", "cortex-a72"):
        ("not applicable: Cortex-A72 is ARMv8.0-A without SDOT (our model raises ValueError; "
         "llvm-mca's A57 model times it only because -mattr=+dotprod is forced)",),
}

# the K loops of the generated GEMM kernels (refimpl.neon.kernels), named by gemm_loops()
_MLA_LOWBIT = ("gemm:mla-lowbit:2b", "gemm:mla-lowbit:3b", "gemm:mla-lowbit:4b")
MARKED.update({("gemm:int7", "cortex-a55"): (_A55_ACC,)})
MARKED.update({(name, "cortex-a55"): (_A55_ACC,) for name in _MLA_LOWBIT})
MARKED.update({(name, "cortex-a76"): (_N1_MLA16B,) for name in _MLA_LOWBIT})


def reasons(kernel: str, core: str, variant: str) -> tuple[str, ...]:
    """Why a (loop, core, variant) pair is excluded from the accuracy goal: the llvm-mca A55
    writeback artefact for the "post-index" variant, then the pair's :data:`MARKED` reasons;
    () for a pair both models time by the same figures. A kernel's second loop (``name#1``)
    shares the first one's reasons."""
    name = kernel.split(":", 1)[1] if kernel.startswith("loop:") else kernel
    name = name.split("#")[0]
    return ((_ARTEFACT,) if variant == "post-index" else ()) + MARKED.get((name, core), ())


GEMM_CONFIGS = (("smlal", 8), ("sdot", 8), ("int7", 7), ("mla-lowbit", 2), ("mla-lowbit", 3),
                ("mla-lowbit", 4))


def gemm_loops(k: int = 576) -> dict[str, str]:
    """K-loop bodies of the generated GEMM kernels (default tiles, depth ``k``), named
    ``gemm:<kernel>`` (``gemm:mla-lowbit:<bits>b``); a kernel's identical loops appear once."""
    from .kernels import generate_kernel   # kernels -> machine -> timing: no import cycle
    loops = {}
    for kernel, bits in GEMM_CONFIGS:
        prog = generate_kernel(kernel, k, bits=bits)
        bodies = list(dict.fromkeys(text for kind, text, _ in prog.account if kind == "loop"))
        base = f"gemm:{kernel}" + (f":{bits}b" if kernel == "mla-lowbit" else "")
        for i, text in enumerate(bodies):
            loops[base + (f"#{i}" if i else "")] = text + "\n"
    return loops


_RE_POST = re.compile(r"^(\s*(?:ld1|ld1r|st1|ldr|str)\s+.*?)\[\s*(x\d+)\s*\]\s*,\s*(#?[-\w]+)\s*$",
                      re.IGNORECASE)


def without_post_index(asm: str) -> str:
    """The same loop with every post-indexed access ``op ..., [xN], #imm`` (or ``, xM``)
    rewritten as ``op ..., [xN]`` followed by ``add xN, xN, #imm``. Used to compare Cortex-A55
    with llvm-mca, whose A55 model serialises post-index writebacks (not a published figure)."""
    out = []
    for line in asm.splitlines():
        m = _RE_POST.match(line.split("//", 1)[0])
        if m:
            out.append(f"{m.group(1)}[{m.group(2)}]")
            out.append(f"add {m.group(2)}, {m.group(2)}, {m.group(3)}")
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def compare_with_llvm_mca(kernels: dict[str, str] | None = None,
                          cores=COMPARED_CORES) -> list[dict]:
    """Rows ``{"kernel", "core", "variant", "ours", "mca", "rel_err", "marked"}``: cycles per
    iteration from our model and from llvm-mca-19 on the same text. On cortex-a55 each kernel
    is compared in offset-addressing form ("offset+add", see :func:`without_post_index`) and
    additionally reported as written ("post-index", marked as the llvm-mca A55 writeback
    artefact). ``rel_err`` = (ours - mca) / mca; ``reasons``: :func:`reasons` of the pair;
    ``marked``: those joined by "; ", or "".
    Raises FileNotFoundError when llvm-mca-19 is absent."""
    kernels = LOOPS if kernels is None else kernels
    rows = []
    for name, body in kernels.items():
        for core in cores:
            variants = [("as written", body)]
            if core == "cortex-a55" and body != without_post_index(body):
                variants = [("offset+add", without_post_index(body)), ("post-index", body)]
            for variant, text in variants:
                why = reasons(name, core, variant)
                try:
                    ours = steady_state_cycles(text, core)
                except ValueError as e:
                    ours, why = None, why or (str(e),)
                mca = llvm_mca_steady_state(text, core)
                err = None if ours is None else (ours - mca) / mca
                rows.append({"kernel": name, "core": core, "variant": variant, "ours": ours,
                             "mca": mca, "rel_err": err, "reasons": why, "marked": "; ".join(why)})
    return rows



def compare_recorded(record: dict) -> list[dict]:
    """Rows of :func:`compare_with_llvm_mca` from recorded llvm-mca figures (the JSON written by
    ``tools/record_llvm_mca.py``: ``record["rows"]`` with ``loop``, ``core``, ``variant``,
    ``text``, ``mca``); ``ours`` is computed now by :func:`steady_state_cycles` on the same text.
    Loop names are those of :data:`LOOPS` prefixed ``loop:``, or of :func:`gemm_loops`.

    Used in :ref:`ch4-sec-how-far-to-trust-the-cycle`.
    """
    rows = []
    for r in record["rows"]:
        why = reasons(r["loop"], r["core"], r["variant"])
        ours = steady_state_cycles(r["text"], r["core"])
        rows.append({"kernel": r["loop"], "core": r["core"], "variant": r["variant"],
                     "ours": ours, "mca": r["mca"], "rel_err": (ours - r["mca"]) / r["mca"],
                     "reasons": why, "marked": "; ".join(why)})
    return rows


def agreement_summary(rows: list[dict]) -> dict:
    """``{"pairs", "median", "max"}`` of ``|rel_err|`` over the unmarked rows (fractions).

    Used in :ref:`ch4-sec-how-far-to-trust-the-cycle`.
    """
    errs = [abs(r["rel_err"]) for r in rows if not r["marked"] and r["rel_err"] is not None]
    if not errs:
        raise ValueError("rows has no unmarked pair with an error")
    return {"pairs": len(errs), "median": statistics.median(errs), "max": max(errs)}


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of :func:`compare_with_llvm_mca` rows, with the median and maximum
    ``|error|`` over the unmarked rows."""
    lines = [f"{'kernel':20s} {'core':11s} {'variant':11s} {'ours':>7s} {'mca':>7s} {'err':>7s}  marked"]
    for r in rows:
        ours = "-" if r["ours"] is None else f"{r['ours']:.2f}"
        err = "-" if r["rel_err"] is None else f"{100 * r['rel_err']:+.1f}%"
        lines.append(f"{r['kernel']:20s} {r['core']:11s} {r['variant']:11s} {ours:>7s} "
                     f"{r['mca']:7.2f} {err:>7s}  {r['marked'][:70]}")
    errs = [abs(r["rel_err"]) for r in rows if not r["marked"] and r["rel_err"] is not None]
    if errs:
        lines.append(f"unmarked pairs: {len(errs)}, median |err| {100 * statistics.median(errs):.1f}%, "
                     f"max |err| {100 * max(errs):.1f}%")
    return "\n".join(lines)

"""Tests of refimpl.neon.timing: register read/write sets, hand-checkable cases from the published
tables (chains, throughput, dual issue, stall causes), steady state vs a full Timer run, and the
comparison with llvm-mca-19 on the representative loops of refimpl.neon.loops."""
import shutil
import statistics
import subprocess
import sys
import time

import pytest

from refimpl.neon import timing
from refimpl.neon.asm import Instruction, parse
from refimpl.neon.loops import (COMPARED_CORES, LOOPS, MARKED, compare_with_llvm_mca, gemm_loops,
                                format_rows, without_post_index)
from refimpl.neon.timing import (CORE_MODELS, Timer, full_run_cycles, llvm_mca_steady_state,
                                 reads_writes, steady_state_cycles)

CORES = ("cortex-a53", "cortex-a55", "cortex-a72", "cortex-a76")
HAVE_MCA = shutil.which(timing.LLVM_MCA) is not None
needs_mca = pytest.mark.skipif(not HAVE_MCA, reason="llvm-mca-19 not installed "
                               "(Debian package llvm-19); comparison with llvm-mca skipped")


def one(text):
    (ins,) = parse(text)
    return ins


def run(text, core):
    t = Timer(core)
    for ins in parse(text):
        t.step(ins)
    return t


# ---- reads and writes --------------------------------------------------------------------------
@pytest.mark.parametrize("text, reads, writes", [
    ("ld1 {v0.16b, v1.16b}, [x0], #32", {"x0"}, {"v0", "v1", "x0"}),
    ("ld1 {v31.4s, v0.4s}, [x3]", {"x3"}, {"v31", "v0"}),
    ("ld1 {v2.8b}, [x1], x5", {"x1", "x5"}, {"v2", "x1"}),
    ("st1 {v6.16b}, [x1], #16", {"v6", "x1"}, {"x1"}),
    ("ldr x4, [x2, #8]", {"x2"}, {"x4"}),
    ("ldr q4, [x2], #16", {"x2"}, {"v4", "x2"}),
    ("ldr d4, [x2, x3, lsl #3]", {"x2", "x3"}, {"v4"}),
    ("str q4, [x2, #-16]!", {"x2", "v4"}, {"x2"}),
    ("str w4, [x2, x3]", {"x2", "x3", "x4"}, set()),
    ("ldp q0, q1, [x2], #32", {"x2"}, {"v0", "v1", "x2"}),
    ("stp s5, s6, [x2, #8]", {"x2", "v5", "v6"}, set()),
    ("movi v1.4s, #1, msl #8", set(), {"v1"}),
    ("mla v0.8h, v1.8h, v2.h[3]", {"v0", "v1", "v2"}, {"v0"}),
    ("mul v0.8h, v1.8h, v2.8h", {"v1", "v2"}, {"v0"}),
    ("smlal2 v8.8h, v0.16b, v2.16b", {"v8", "v0", "v2"}, {"v8"}),
    ("sadalp v16.4s, v8.8h", {"v16", "v8"}, {"v16"}),
    ("sdot v16.4s, v4.16b, v0.4b[1]", {"v16", "v4", "v0"}, {"v16"}),
    ("sqxtn v4.4h, v0.4s", {"v0"}, {"v4"}),
    ("sqxtn2 v4.8h, v1.4s", {"v4", "v1"}, {"v4"}),
    ("ins v3.s[1], w5", {"v3", "x5"}, {"v3"}),
    ("mov v3.s[1], v4.s[0]", {"v3", "v4"}, {"v3"}),
    ("umov w1, v2.h[3]", {"v2"}, {"x1"}),
    ("addv s1, v2.4s", {"v2"}, {"v1"}),
    ("subs x2, x2, #1", {"x2"}, {"x2", "nzcv"}),
    ("subs xzr, x2, x3", {"x2", "x3"}, {"nzcv"}),
    ("cmp w2, #3", {"x2"}, {"nzcv"}),
    ("movi v1.16b, #0", set(), {"v1"}),
    ("dup v1.8h, w3", {"x3"}, {"v1"}),
])
def test_reads_writes(text, reads, writes):
    r, w = reads_writes(one(text))
    assert set(r) == reads and set(w) == writes


def test_branch_reads_flags():
    prog = parse("loop: subs x2, x2, #1\nb.ne loop\ncbnz x3, loop\nb loop")
    assert reads_writes(prog[1]) == (("nzcv",), ())
    assert reads_writes(prog[2]) == (("x3",), ())
    assert reads_writes(prog[3]) == ((), ())


# ---- errors ------------------------------------------------------------------------------------
def test_unknown_mnemonic_names_it_and_the_core():
    with pytest.raises(ValueError, match=r"cortex-a72.*'frob'"):
        Timer("cortex-a72").step(Instruction("frob", (), 1, "frob v0"))
    with pytest.raises(ValueError, match="unknown core"):
        Timer("cortex-x1")


@pytest.mark.parametrize("core", ["cortex-a53", "cortex-a72"])
def test_sdot_absent_on_armv80_cores(core):
    with pytest.raises(ValueError, match="SDOT.*ARMv8.0"):
        Timer(core).step(one("sdot v16.4s, v4.16b, v0.4b[0]"))


def test_every_core_times_every_subset_mnemonic():
    texts = ["add v0.4s, v1.4s, v2.4s", "sub v0.8b, v1.8b, v2.8b", "mul v0.4s, v1.4s, v2.s[1]",
             "mls v0.8h, v1.8h, v2.8h", "smax v0.4s, v1.4s, v2.4s", "smin v0.8b, v1.8b, v2.8b",
             "addp v0.4s, v1.4s, v2.4s", "smull v0.4s, v1.4h, v2.4h", "saddl2 v0.8h, v1.16b, v2.16b",
             "saddlp v0.8h, v1.16b", "addv s0, v1.4s", "dup v0.4s, v1.s[0]", "ext v0.16b, v1.16b, v2.16b, #3",
             "mov w0, v1.s[1]", "mov x0, x1", "mov x0, #5", "add x0, x1, #1", "sqdmulh v0.4s, v1.4s, v2.4s",
             "sshr v0.4s, v1.4s, #3", "srshr v0.4s, v1.4s, #3", "xtn v0.8b, v1.8h", "xtn2 v0.16b, v1.8h",
             "sqxtun v0.8b, v1.8h", "ld1r {v0.4s}, [x1]", "str x1, [x2], #8", "cmp x1, x2"]
    for core in CORES:
        t = Timer(core)
        for text in texts:
            t.step(one(text))
        assert t.instructions == len(texts) and t.cycles > 0


# ---- hand-checkable cases from the tables ------------------------------------------------------
@pytest.mark.parametrize("core, text, per, first", [
    # A55 SWOG 3.15: ADD 2 cycles -> a dependent chain of N costs 2N
    ("cortex-a55", "add v0.8h, v0.8h, v1.8h", 2, 2),
    # A55: MLA 4(1): the first result after 4, then each accumulation 1 cycle later
    ("cortex-a55", "mla v0.4h, v1.4h, v2.4h", 1, 4),
    # A55: SADALP 4, no accumulate forwarding given
    ("cortex-a55", "sadalp v0.4s, v1.8h", 4, 4),
    # A72 SWOG 3.14: MUL Q-form 5 (operand, not accumulator, dependency)
    ("cortex-a72", "mul v0.8h, v0.8h, v1.8h", 5, 5),
    # A72: MLA Q-form 5(2)
    ("cortex-a72", "mla v0.8h, v1.8h, v2.8h", 2, 5),
    # A72: SMLAL 4(1)
    ("cortex-a72", "smlal v0.4s, v1.4h, v2.4h", 1, 4),
    # A76: ADD 2, SRSHL 4
    ("cortex-a76", "add v0.4s, v0.4s, v1.4s", 2, 2),
    ("cortex-a76", "srshl v0.4s, v0.4s, v1.4s", 4, 4),
    # A76: SDOT 2
    ("cortex-a76", "sdot v0.4s, v1.16b, v2.16b", 2, 2),
])
def test_dependent_chain(core, text, per, first):
    n = 10
    t = run("\n".join([text] * n), core)
    assert t.cycles == first + (n - 1) * per
    assert t.instructions == n


@pytest.mark.parametrize("core, body, expected", [
    # A55: Q-form ADD takes both 64-bit pipes -> 1 per cycle; D-form 2 per cycle
    ("cortex-a55", "\n".join(f"add v{i}.4s, v20.4s, v21.4s" for i in range(8)), 8),
    ("cortex-a55", "\n".join(f"add v{i}.2s, v20.2s, v21.2s" for i in range(8)), 4),
    # A55: a Q-form load holds the 64-bit load path (and issue) 2 cycles
    ("cortex-a55", "ld1 {v0.16b}, [x0]\nld1 {v1.16b}, [x1]", 4),
    ("cortex-a55", "ld1 {v0.16b}, [x0]\nadd v2.8b, v3.8b, v4.8b", 3),
    ("cortex-a55", "ld1 {v0.8b}, [x0]\nadd v2.8b, v3.8b, v4.8b", 1),
    # A72: MLA Q-form issues every 2 cycles on F0; D-form every cycle
    ("cortex-a72", "\n".join(f"mla v{i}.8h, v20.8h, v21.8h" for i in range(4)), 8),
    ("cortex-a72", "\n".join(f"mla v{i}.4h, v20.4h, v21.4h" for i in range(4)), 4),
    # A72: basic ASIMD on F0/F1 -> 2 per cycle, dispatch 3 per cycle
    ("cortex-a72", "\n".join(f"add v{i}.4s, v20.4s, v21.4s" for i in range(6)), 3),
    # A76: 2 load pipes; 4-wide dispatch
    ("cortex-a76", "\n".join(f"ld1 {{v{i}.16b}}, [x{i}]" for i in range(4)), 2),
    ("cortex-a76", "\n".join(f"add x{i}, x{i}, #1" for i in range(8)), 8 / 3),
])
def test_independent_throughput(core, body, expected):
    # (c(400) - c(200)) / 200 rounds a fractional period to whole cycles
    assert steady_state_cycles(body, core) == pytest.approx(expected, abs=0.01)


def test_a55_dual_issue_and_slot_rule():
    # scalar ALU + D-form vector op pair in one cycle
    t = run("add v0.8b, v1.8b, v2.8b\nadd x0, x0, #1", "cortex-a55")
    assert t.cycles == 2 and t.stalls["issue_width"] == 0
    # a Q-form vector op must lead its pair: after a scalar op it waits a cycle
    t = run("add x0, x0, #1\nadd v0.16b, v1.16b, v2.16b", "cortex-a55")
    assert t.cycles == 3 and t.stalls["issue_width"] == 1
    t = run("add v0.16b, v1.16b, v2.16b\nadd x0, x0, #1", "cortex-a55")
    assert t.cycles == 2 and t.stalls["issue_width"] == 0
    # at most two per cycle
    t = run("add x0, x0, #1\nadd x1, x1, #1\nadd x2, x2, #1", "cortex-a55")
    assert t.cycles == 2
    # A53: vector loads issue alone (ncnn measurements), A55 pairs them
    body = "ld1 {v0.8b}, [x0]\nadd v1.8b, v2.8b, v3.8b"
    assert run(body, "cortex-a55").stalls["issue_width"] == 0
    assert run(body, "cortex-a53").stalls["issue_width"] == 1
    assert steady_state_cycles(body, "cortex-a55") == 1
    assert steady_state_cycles(body, "cortex-a53") == 2


def test_stall_causes():
    t = run("add v0.4h, v0.4h, v1.4h\nadd v0.4h, v0.4h, v1.4h", "cortex-a55")
    assert t.stalls == {"operand": 2, "pipe": 0, "issue_width": 0}
    # Q-form: the slot rule already moved it one cycle; the operand waits one more
    t = run("add v0.8h, v0.8h, v1.8h\nadd v0.8h, v0.8h, v1.8h", "cortex-a55")
    assert t.stalls == {"operand": 1, "pipe": 0, "issue_width": 1}
    # A55 Q-form load: issues alone (issue_width 1) and holds issue 2 cycles (pipe 1 more)
    t = run("ld1 {v0.16b}, [x0]\nld1 {v1.16b}, [x1]", "cortex-a55")
    assert t.stalls == {"operand": 0, "pipe": 1, "issue_width": 1}
    # D-form loads: one load pipe, so the second waits a cycle for it
    t = run("ld1 {v0.8b}, [x0]\nld1 {v1.8b}, [x1]", "cortex-a55")
    assert t.stalls == {"operand": 0, "pipe": 1, "issue_width": 0}
    t = run("mla v0.8h, v20.8h, v21.8h\nmla v1.8h, v20.8h, v21.8h", "cortex-a72")
    assert t.stalls["pipe"] == 2 and t.stalls["operand"] == 0
    t = run("mul v0.4s, v1.4s, v2.4s\nadd v3.4s, v0.4s, v0.4s", "cortex-a76")
    assert t.stalls["operand"] == 5 and t.cycles == 7  # MUL Q-form 5, ADD 2
    t = run("\n".join(f"add x{i}, x{i}, #1" for i in range(5)), "cortex-a76")
    assert t.stalls["issue_width"] == 1


# LDR/STR of SIMD&FP registers and LDP/STP are timed as the LD1/ST1 that moves the same bytes
# in as many registers (timing.klass); MOVI msl as MOVI lsl
SAME_AS = [
    ("ldr q0, [x0]", "ld1 {v0.16b}, [x0]"),
    ("ldr q0, [x0], #16", "ld1 {v0.16b}, [x0], #16"),
    ("ldr q0, [x0, #32]!", "ld1 {v0.16b}, [x0], #16"),
    ("ldr q0, [x0, x1, lsl #4]", "ld1 {v0.16b}, [x0], x1"),     # both read x1; no writeback
    ("ldr d0, [x0, #8]", "ld1 {v0.8b}, [x0]"),
    ("ldr b0, [x0, #1]", "ld1 {v0.8b}, [x0]"),
    ("str q0, [x0, #16]", "st1 {v0.16b}, [x0]"),
    ("str s0, [x0], #4", "st1 {v0.2s}, [x0], #8"),
    ("ldp q0, q1, [x0]", "ld1 {v0.16b, v1.16b}, [x0]"),
    ("ldp q0, q1, [x0], #32", "ld1 {v0.16b, v1.16b}, [x0], #32"),
    ("ldp d0, d1, [x0, #16]", "ld1 {v0.8b, v1.8b}, [x0]"),
    ("stp q0, q1, [x0, #-32]!", "st1 {v0.16b, v1.16b}, [x0], #32"),
    ("movi v0.4s, #1, msl #8", "movi v0.4s, #1, lsl #8"),
    ("movi v0.2s, #1, msl #16", "movi v0.2s, #1, lsl #16"),
]


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("text, like", SAME_AS)
def test_simd_transfers_timed_as_ld1_st1(core, text, like):
    if "ldr q0, [x0, x1" in text:   # register offset: no writeback micro-op, unlike LD1's
        assert CORE_MODELS[core].entry(one(text)) == CORE_MODELS[core].entry(one("ld1 {v0.16b}, [x0]"))
        return
    assert CORE_MODELS[core].entry(one(text)) == CORE_MODELS[core].entry(one(like))
    assert timing.klass(one(text)) == timing.klass(one(like))
    body = f"{text}\nadd v2.4s, v0.4s, v0.4s"
    assert run(body, core).cycles == run(f"{like}\nadd v2.4s, v0.4s, v0.4s", core).cycles


def test_simd_transfer_costs():
    # A55: a q load is 2 cycles of the 64-bit load path, issues alone, latency 4; LDP q 4 and 6
    e = CORE_MODELS["cortex-a55"].entry(one("ldr q0, [x0]"))
    assert (e.lat, e.uops) == (4, ((("LD",), 2),))
    e = CORE_MODELS["cortex-a55"].entry(one("ldp q0, q1, [x0]"))
    assert (e.lat, e.uops) == (6, ((("LD",), 4),))
    assert steady_state_cycles("ldr q0, [x0], #16", "cortex-a55") == 2
    assert steady_state_cycles("ldr d0, [x0], #8", "cortex-a55") == 1
    # A72: one L micro-op per register, latency 5 (1-2 registers)
    e = CORE_MODELS["cortex-a72"].entry(one("ldp q0, q1, [x0]"))
    assert e.lat == 5 and len(e.uops) == 2
    # A76: two load pipes, so two independent q loads a cycle
    assert steady_state_cycles("ldr q0, [x0]\nldr q1, [x1]", "cortex-a76") == 1


def test_ooo_dispatch_counts_micro_ops():
    # A72 dispatches 3 micro-ops per cycle; a post-indexed load is 2 (load + writeback)
    t = run("ld1 {v0.8b}, [x0], #8\nld1 {v1.8b}, [x1], #8", "cortex-a72")
    assert t.stalls["issue_width"] == 1
    t = run("ld1 {v0.8b}, [x0]\nld1 {v1.8b}, [x1]", "cortex-a72")
    assert t.stalls["issue_width"] == 0
    # A76: 4 instructions per cycle
    assert run("\n".join(["add v0.4s, v1.4s, v2.4s"] * 5), "cortex-a76").stalls["issue_width"] == 1


def test_renaming_no_war_waw_on_ooo():
    # v0 rewritten while an older reader waits: no stall beyond the chain on OoO cores
    body = "mul v1.4s, v2.4s, v3.4s\nadd v4.4s, v1.4s, v0.4s\nmovi v0.16b, #1\nmovi v1.16b, #2"
    t = run(body, "cortex-a76")
    assert t.cycles == 7  # mul 5 (Q) + add 2; the MOVIs issue at once
    assert t.stalls["operand"] == 5


def test_post_index_writeback_is_fast():
    # two independent post-indexed D loads: load-pipe bound (A55 1 cycle each), not serialised
    assert steady_state_cycles("ld1 {v0.8b}, [x0], #8\nld1 {v1.8b}, [x1], #8",
                               "cortex-a55") == 2
    # a post-indexed pointer chase on one base: 1 cycle per access on the address path
    assert steady_state_cycles("ld1 {v0.8b}, [x0], #8", "cortex-a55") == 1


# ---- steady state ------------------------------------------------------------------------------
def _cases():
    for name in LOOPS:
        for core in CORES:
            if "sdot" in LOOPS[name] and core in ("cortex-a53", "cortex-a72"):
                continue
            yield name, core


@pytest.mark.parametrize("name, core", list(_cases()))
def test_steady_state_equals_full_run(name, core):
    body = LOOPS[name]
    prog = parse(body)
    t, c200 = Timer(core), None
    for it in range(1, 401):
        for ins in prog:
            t.step(ins)
        if it == 200:
            c200 = t.cycles
    assert steady_state_cycles(body, core) == (t.cycles - c200) / 200


def test_full_run_cycles():
    body = LOOPS["requant"]
    t = Timer("cortex-a72")
    for _ in range(3):
        for ins in parse(body):
            t.step(ins)
    assert full_run_cycles(body, "cortex-a72", 3) == t.cycles
    assert t.instructions == 3 * len(parse(body))


@pytest.mark.parametrize("core", ["cortex-a55", "cortex-a76"])
def test_steady_state_is_fast(core):
    body = "\n".join(LOOPS["gemm_int8_smlal"].splitlines()[:-1]
                     + LOOPS["requant"].splitlines()[1:-2]) + "\nb.ne loop\n"
    assert len(parse(body)) >= 30
    t0 = time.perf_counter()
    steady_state_cycles(body, core)
    assert time.perf_counter() - t0 < 0.5


def test_without_post_index():
    out = without_post_index("loop:\nld1 {v0.16b, v1.16b}, [x0], #32\nst1 {v2.8b}, [x1], x4\n")
    assert out == ("loop:\nld1 {v0.16b, v1.16b}, [x0]\nadd x0, x0, #32\n"
                   "st1 {v2.8b}, [x1]\nadd x1, x1, x4\n")
    for body in LOOPS.values():
        parse(without_post_index(body))


def test_timing_does_not_import_torch():
    code = "import sys, refimpl.neon.timing, refimpl.neon.loops; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_models_cite_sources():
    for core, m in CORE_MODELS.items():
        assert m.source and m.kind in ("inorder", "ooo")


# ---- llvm-mca ----------------------------------------------------------------------------------
def test_llvm_mca_a53_not_compared():
    with pytest.raises(ValueError, match="flat latency"):
        llvm_mca_steady_state(LOOPS["micro_add_indep"], "cortex-a53")


def test_llvm_mca_missing_binary(monkeypatch):
    monkeypatch.setattr(timing, "LLVM_MCA", "llvm-mca-does-not-exist")
    with pytest.raises(FileNotFoundError, match="llvm-19"):
        llvm_mca_steady_state(LOOPS["micro_add_indep"], "cortex-a55")


@needs_mca
def test_llvm_mca_hand_case():
    # LLVM's A57 model: two basic adds per cycle, like ours for the A72
    body = "\n".join(f"add v{i}.4s, v20.4s, v21.4s" for i in range(6))
    assert llvm_mca_steady_state(body, "cortex-a72") == pytest.approx(3.0)


@needs_mca
def test_compare_with_llvm_mca():
    rows = compare_with_llvm_mca(LOOPS, COMPARED_CORES)
    print("\n" + format_rows(rows))
    assert {(r["kernel"], r["core"]) for r in rows} == {(k, c) for k in LOOPS
                                                         for c in COMPARED_CORES}
    for key in MARKED:  # every mark refers to a compared pair
        assert (key[0] in LOOPS or key[0] in gemm_loops()) and key[1] in COMPARED_CORES
    free = [r for r in rows if not r["marked"]]
    errs = [abs(r["rel_err"]) for r in free]
    assert len(free) >= 12
    assert statistics.median(errs) <= 0.10, format_rows(rows)
    assert max(errs) <= 0.20, format_rows(rows)
    # the A55 post-index artefact: llvm-mca is slower on the post-indexed form than on the
    # equivalent offset + ADD form, ours is not
    art = {r["kernel"]: r for r in rows if r["variant"] == "post-index"}
    off = {r["kernel"]: r for r in rows if r["variant"] == "offset+add"}
    assert art and all(art[k]["mca"] > off[k]["mca"] for k in art)
    assert all(art[k]["ours"] <= off[k]["ours"] for k in art)

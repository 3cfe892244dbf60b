"""Record llvm-mca-19's steady-state cycles for the loops the ARM chapter compares.

The chapter "Integer inference on ARM" must build on machines without LLVM, so llvm-mca's figures
are recorded here, with the exact loop text and command, into ``chapters/data/llvm_mca_19.json``;
``tests/test_llvm_mca_record.py`` re-runs llvm-mca-19 on every recorded loop (where it is
installed, as in CI) and fails if a figure or a loop's text has changed.

Loops: the representative bodies of :data:`refimpl.neon.loops.LOOPS` and the K loops of the
generated GEMM kernels (:func:`refimpl.neon.generate_kernel`, default tiles, K = 576). On
cortex-a55 each loop with post-indexed accesses is recorded twice: as written, and rewritten with
offset addressing plus ADD (:func:`refimpl.neon.loops.without_post_index`), because llvm-mca's A55
model serialises post-index writebacks.

Usage: ``python tools/record_llvm_mca.py`` (needs llvm-mca-19 on PATH; Debian package llvm-19).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from refimpl.neon.loops import COMPARED_CORES, LOOPS, gemm_loops, without_post_index
from refimpl.neon.timing import LLVM_MCA, LLVM_MCA_CPU, llvm_mca_steady_state

OUT = Path(__file__).resolve().parents[1] / "chapters" / "data" / "llvm_mca_19.json"
def all_loops() -> dict[str, str]:
    return {**{f"loop:{k}": v for k, v in LOOPS.items()}, **gemm_loops()}


def variants(name: str, text: str, core: str):
    """(variant, text) pairs recorded for ``core``."""
    if core == "cortex-a55" and without_post_index(text) != text:
        return [("offset+add", without_post_index(text)), ("post-index", text)]
    return [("as written", text)]


def main() -> int:
    version = subprocess.run([LLVM_MCA, "--version"], capture_output=True, text=True,
                             check=True).stdout
    rows = []
    for name, text in all_loops().items():
        for core in COMPARED_CORES:
            if core == "cortex-a72" and "sdot" in text:
                continue  # ARMv8.0: no SDOT on the real core
            for variant, body in variants(name, text, core):
                rows.append({"loop": name, "core": core, "llvm_cpu": LLVM_MCA_CPU[core],
                             "variant": variant, "text": body,
                             "mca": llvm_mca_steady_state(body, core)})
    version_line = next(line.strip() for line in version.splitlines() if "version" in line)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "tool": version_line,
        "command": f"{LLVM_MCA} -mtriple=aarch64 -mcpu=<llvm_cpu> -mattr=+dotprod "
                   "-iterations=N (N = 200, 400); mca = (TotalCycles(400) - TotalCycles(200)) / 200",
        "rows": rows}, indent=1) + "\n")
    print(f"{len(rows)} rows written to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

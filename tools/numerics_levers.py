"""Measure each lever of the numerics configuration on this machine: which results move when it
is taken away, or when a knob makes the libraries take another CPU's kernels.

Runs tests/numerics_workload.py (FP32 training, the standard PTQ pipeline, QAT, range setting on
digits) in subprocesses: once under the configuration (refimpl/numerics.py), then once per row
below, and prints which of the workload's results (weights, accuracies, losses, ranges) differ
from the first run. Rows "without ..." take one lever away; rows "knob ..." keep the
configuration and add a knob (each should change nothing), or drop the configuration's
environment and add the knob (these show the knob is live on this CPU).
Usage: python tools/numerics_levers.py [tiny|small|full]       (make levers)
Levers that only show between CPU vendors (MKL_CBWR=AVX2 on AMD, torch.sqrt through MKL's vector
math) need another CPU: tools/numerics_probe.py under qemu-x86_64 (its docstring).
"""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from refimpl import numerics  # noqa: E402

WORKLOAD = ROOT / "tests" / "numerics_workload.py"
IGNORED = {"problems", "signature"}


def run(size, env, args=()):
    out = subprocess.run([sys.executable, str(WORKLOAD), size, *args], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main(size="tiny"):
    conf = numerics.environment()
    # MKL reads MKL_CBWR at its first call, after the workload's set-up would put the
    # configuration's value in place of an unset one: AUTO is MKL's own default, set explicitly
    bare = {**{k: v for k, v in conf.items() if k not in numerics.X86_ENV}, "MKL_CBWR": "AUTO"}
    without = lambda *keys: {k: v for k, v in conf.items() if k not in keys}
    rows = {
        "without oneDNN off": (conf, ["--mkldnn"]),
        "without ATEN_CPU_CAPABILITY=avx2": (without("ATEN_CPU_CAPABILITY"), []),
        "MKL_CBWR=AVX2 instead of COMPATIBLE": ({**conf, "MKL_CBWR": "AVX2"}, []),
        "MKL_CBWR=AUTO (MKL's default)": ({**conf, "MKL_CBWR": "AUTO"}, []),
        "without NPY_DISABLE_CPU_FEATURES, OPENBLAS_CORETYPE": (
            without("NPY_DISABLE_CPU_FEATURES", "OPENBLAS_CORETYPE"), []),
        "knob ONEDNN_MAX_CPU_ISA=SSE41, configuration": ({**conf, "ONEDNN_MAX_CPU_ISA": "SSE41"}, []),
        "knob MKL_ENABLE_INSTRUCTIONS=SSE4_2, configuration": ({**conf, "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}, []),
        "knob ONEDNN_MAX_CPU_ISA=SSE41, no configuration": ({**bare, "ONEDNN_MAX_CPU_ISA": "SSE41"}, ["--mkldnn"]),
        "knob MKL_ENABLE_INSTRUCTIONS=SSE4_2, no configuration": ({**bare, "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}, []),
    }
    with ThreadPoolExecutor(2) as pool:
        ref = pool.submit(run, size, conf)
        futures = {name: pool.submit(run, size, env, args) for name, (env, args) in rows.items()}
        ref = ref.result()
        results = {name: f.result() for name, f in futures.items()}
    keys = sorted(set(ref) - IGNORED)
    print(f"numerics levers on this CPU, workload '{size}' ({len(keys)} results); reference: the "
          "configuration")
    print("| run | results that differ from the reference | e.g. |")
    print("|---|---|---|")
    for name, res in results.items():
        diff = [k for k in keys if res.get(k) != ref.get(k)]
        print(f"| {name} | {len(diff)} of {len(keys)} | {', '.join(diff[:3])} |")


if __name__ == "__main__":
    main(*sys.argv[1:])

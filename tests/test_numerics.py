"""refimpl.numerics: the configuration under which the book's numbers are bit-identical on any
x86-64 CPU with AVX2, checked on one machine by emulating other CPUs.

Two kinds of emulation, each running tests/numerics_workload.py (FP32 training, the standard PTQ
pipeline with AdaRound, QAT, range setting) in subprocesses and requiring identical bits:
- knobs: the environment variables that make libraries pick other kernels, as another CPU
  would (oneDNN's ISA, MKL's instruction set; each changes results without the configuration);
- whole CPUs: the same Python under ``qemu-x86_64 -cpu EPYC-Rome-v1`` (AMD) and ``Haswell-v4``
  (Intel AVX2), on a smaller workload (emulation is ~50x slower). Skipped with a reason where
  qemu-user is absent; .ci/run installs it.
"""

import ast
import json
import platform
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from refimpl import numerics

ROOT = Path(__file__).resolve().parents[1]
WORKLOAD = ROOT / "tests" / "numerics_workload.py"
x86_only = pytest.mark.skipif(not numerics.is_x86_64(), reason="the bit-for-bit promise is for x86-64 CPUs")


def run_workload(size: str, env: dict, prefix=(), args=()) -> dict:
    out = subprocess.run([*prefix, sys.executable, str(WORKLOAD), size, *args], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=1800)
    # qemu warns about each CPU feature it cannot emulate: not the error
    err = "\n".join(l for l in out.stderr.splitlines() if not l.startswith("qemu-x86_64: warning"))
    assert out.returncode == 0, err[-3000:]
    return json.loads(out.stdout)


def differing(a: dict, b: dict) -> list:
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


# ---- sqrt -----------------------------------------------------------------------------------

def test_sqrt_float32_is_correctly_rounded():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 0x7F800000, size=1_000_000, dtype=np.uint32).view(np.float32)
    x = np.concatenate([x, np.arange(1, 70_000, dtype=np.float32),
                        np.array([0.0, 1e-45, 1.17549435e-38, 3.4028235e38, np.inf], np.float32)])
    y = numerics.sqrt(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(y.view(np.uint32), np.sqrt(x).view(np.uint32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sqrt_half_precision_is_correctly_rounded(dtype):
    x = torch.arange(0, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)   # every finite >= 0
    x = x[torch.isfinite(x)]
    ref = torch.from_numpy(np.sqrt(x.double().numpy())).to(dtype)      # one rounding, from float64
    y = numerics.sqrt(x)
    assert y.dtype == dtype and torch.equal(y, ref)


def test_sqrt_float64_within_two_ulp_and_special_values():
    x = torch.from_numpy(np.random.default_rng(1).random(200_000) * 10.0 ** np.arange(-150, 150, 1.5).repeat(1000))
    ref = np.sqrt(x.numpy())
    assert (np.abs(numerics.sqrt(x).numpy() - ref) <= 2 * np.spacing(ref)).all()
    special = torch.tensor([0.0, -0.0, float("inf"), -1.0, float("nan")])
    y = numerics.sqrt(special)
    assert y[:3].tolist() == [0.0, 0.0, float("inf")] and torch.signbit(y[1]) and y[3:].isnan().all()


def test_sqrt_gradient_and_bad_input():
    x = torch.tensor([0.25, 4.0, 9.0], requires_grad=True)
    numerics.sqrt(x).sum().backward()
    torch.testing.assert_close(x.grad, 0.5 / x.detach().sqrt())
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        numerics.sqrt(torch.tensor([4]))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        numerics.sqrt(4.0)


# ---- the configuration in this process and in the book's entry points ------------------------

@x86_only
def test_this_test_process_runs_under_the_configuration():
    """conftest.py applies it before torch or NumPy compute anything."""
    assert numerics.check() == []
    assert numerics.signature() == "x86_64-avx2-portable"


def test_check_names_what_is_off(monkeypatch):
    monkeypatch.setenv("MKL_CBWR", "AVX2")      # part of the configuration on x86-64 only
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", True)
    problems = " ".join(numerics.check())
    assert "mkldnn" in problems
    if numerics.is_x86_64():
        assert "MKL_CBWR is 'AVX2'" in problems
        assert numerics.signature() != "x86_64-avx2-portable"


def test_makefile_exports_the_same_environment():
    out = subprocess.run([sys.executable, str(ROOT / "refimpl" / "numerics.py"), "--make"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == [f"export {k} := {v}" for k, v in numerics.ENV.items()]
    assert "include $(NUMERICS_MK)" in (ROOT / "Makefile").read_text()


def test_no_torch_sqrt_in_refimpl():
    """torch.sqrt differs between CPUs (module docstring of refimpl.numerics): refimpl calls
    numerics.sqrt, and Adam/AdamW fused (math.sqrt and np.sqrt on scalars are exact)."""
    offenders = []
    for path in sorted((ROOT / "refimpl").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            f = node.func
            owner = f.value.id if isinstance(f.value, ast.Name) else None
            if f.attr in ("sqrt", "sqrt_") and owner not in ("math", "np", "numpy", "numerics"):
                offenders.append(f"{path.name}:{node.lineno}: .{f.attr}()")
            if f.attr in ("Adam", "AdamW") and not any(
                    k.arg == "fused" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords):
                offenders.append(f"{path.name}:{node.lineno}: {f.attr} without fused=True")
    assert not offenders, "\n".join(offenders)


# ---- emulated CPUs ----------------------------------------------------------------------------

# Knobs that make the libraries take another CPU's kernels. Each changes results when the
# configuration is off (test_knobs_change_results_without_the_configuration).
KNOBS = {
    "oneDNN at SSE4.1": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
    "oneDNN at AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "MKL at SSE4.2": {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "MKL at AVX2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "MKL at AVX-512": {"MKL_ENABLE_INSTRUCTIONS": "AVX512"},
}


@pytest.fixture(scope="module")
def reference_full():
    return run_workload("full", numerics.environment())


@x86_only
@pytest.mark.parametrize("knob", list(KNOBS))
def test_knobs_do_not_change_results_under_the_configuration(knob, reference_full):
    assert reference_full["problems"] == []
    other = run_workload("full", {**numerics.environment(), **KNOBS[knob]})
    assert differing(reference_full, other) == []


@x86_only
def test_knobs_change_results_without_the_configuration():
    """The knobs above are live: without the configuration (oneDNN on, the libraries' default
    dispatch; still one thread) they change the trained weights, so the test above can fail."""
    # MKL_CBWR=AUTO (MKL's default) explicitly: an unset one would get the configuration's value
    # from the workload's set-up before MKL's first call
    base = {**{k: v for k, v in numerics.environment().items() if k not in numerics.X86_ENV},
            "MKL_CBWR": "AUTO"}
    runs = {"default": {}, "oneDNN at SSE4.1": KNOBS["oneDNN at SSE4.1"],
            "MKL at SSE4.2": KNOBS["MKL at SSE4.2"]}
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(run_workload, "tiny", {**base, **env}, (), ["--mkldnn"])
                   for name, env in runs.items()}
        runs = {name: f.result() for name, f in futures.items()}
    assert runs["default"]["problems"], "the run without the configuration should report it"
    changed = {name: [k for k in differing(runs["default"], runs[name]) if k.endswith(".weights")]
               for name in ("oneDNN at SSE4.1", "MKL at SSE4.2")}
    assert any(changed.values()), f"no knob changed any weights without the configuration: {changed}"


QEMU = shutil.which("qemu-x86_64")
QEMU_CPUS = ["EPYC-Rome-v1", "Haswell-v4"]


@x86_only
@pytest.mark.skipif(QEMU is None, reason="qemu-user is not installed (Debian package qemu-user; .ci/run installs it)")
def test_emulated_cpus_give_the_same_bits():
    """The same Python under qemu-user as an AMD EPYC (Zen 2) and an Intel Haswell: identical
    bits and accuracies to this machine's CPU, whichever it is."""
    env = numerics.environment()
    with ThreadPoolExecutor(len(QEMU_CPUS) + 1) as pool:
        native = pool.submit(run_workload, "tiny", env)
        emulated = {cpu: pool.submit(run_workload, "tiny", env, (QEMU, "-cpu", cpu)) for cpu in QEMU_CPUS}
        native = native.result()
        emulated = {cpu: f.result() for cpu, f in emulated.items()}
    assert native["problems"] == []
    for cpu, result in emulated.items():
        diff = {k: (native.get(k), result.get(k)) for k in differing(native, result)}
        assert not diff, f"{cpu} differs from this CPU ({platform.processor()}): {diff}"

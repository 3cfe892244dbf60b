"""The book's one numerics configuration: float results bit-identical on any x86-64 CPU with AVX2.

Every entry point applies it from here: the Makefile exports :data:`ENV` (``python
refimpl/numerics.py --make``), the tests' ``conftest.py`` and ``tools/run_notebooks.py`` call
:func:`set_environment`, chapters call :func:`apply` through :func:`refimpl.book.setup`, and
:func:`refimpl.zoo.cache_key` keys trained models on :func:`signature`. The levers, each measured on
an Intel Xeon (AVX-512, AMX) against the same code under ``qemu-x86_64 -cpu EPYC-Rome-v1`` (AMD)
and ``-cpu Haswell-v4`` (Intel AVX2); ``tests/test_numerics.py`` re-checks them:

* ``torch.backends.mkldnn.enabled = False``: oneDNN, which runs the convolutions otherwise, picks
  its kernels by the CPU's ISA and cache sizes (``ONEDNN_MAX_CPU_ISA`` pins the first, not the
  second). Without it convolutions run as ATen's im2col and MKL GEMM.
* ``ATEN_CPU_CAPABILITY=avx2``: ATen's vectorised kernels (reductions, elementwise, batch norm,
  softmax) at AVX2, which every such CPU has; an AVX-512 CPU would otherwise pick other kernels.
* ``MKL_CBWR=COMPATIBLE``: MKL's GEMM on one code path on Intel and AMD. ``MKL_CBWR=AVX2`` is not
  enough: MKL gives AMD CPUs another path, and GEMMs, exp and log then differ.
* MKL's vector math (VML) computes ``torch.sqrt`` on x86 CPUs from an approximate reciprocal
  square root whose bits differ between CPUs, under every ``MKL_CBWR``: use :func:`sqrt`, and
  Adam/AdamW with ``fused=True`` (their fused kernel takes the exact vector square root).
* ``NPY_DISABLE_CPU_FEATURES`` (AVX-512 loops) and ``OPENBLAS_CORETYPE=Haswell``: NumPy's float64
  exp and log and OpenBLAS's GEMM otherwise take AVX-512 kernels where the CPU has them.
* One thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``): the
  summation order of reductions and GEMMs depends on the thread count; and deterministic
  algorithms (``torch.use_deterministic_algorithms``).

Environment variables are read once, when the library first needs them (NumPy's when NumPy is
imported), so they must be in place before the first computation; :func:`check` says which are not.
On other platforms (ARM64 Linux, macOS) only the thread count and determinism apply: results are
reproducible run to run there, but not bit-identical to x86-64 (see the README).

This module imports neither torch nor NumPy at import time, so that the Makefile can run it as a
script before the virtual environment exists.
"""

from __future__ import annotations

import os
import platform
import sys

__all__ = ["ENV", "X86_ENV", "COMMON_ENV", "is_x86_64", "environment", "set_environment", "apply",
           "check", "signature", "sqrt"]

# Needed everywhere: one thread, and a fixed hash seed (set iteration order in Python code).
COMMON_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "PYTHONHASHSEED": "0",
}
# Needed on x86-64 to get the same bits on every CPU (see the module docstring, one line each).
X86_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "OPENBLAS_CORETYPE": "Haswell",
    # NumPy 2.x's AVX-512 dispatch targets (NumPy 1.x's are AVX512F, AVX512_SKX, ...: check()
    # reports them). A target the CPU lacks is ignored silently.
    "NPY_DISABLE_CPU_FEATURES": "X86_V4,AVX512_ICL,AVX512_SPR",
}


def is_x86_64() -> bool:
    """True on x86-64, the platform whose results the stored chapters reproduce bit for bit."""
    return platform.machine().lower() in ("x86_64", "amd64")


ENV = {**COMMON_ENV, **(X86_ENV if is_x86_64() else {})}
"""The environment variables of the configuration on this platform."""


def environment(base=None) -> dict:
    """A copy of ``base`` (default ``os.environ``) with :data:`ENV` applied: for subprocesses."""
    env = dict(os.environ if base is None else base)
    env.update(ENV)
    return env


def set_environment() -> None:
    """Put :data:`ENV` into ``os.environ`` where a variable is not set already: for this process's
    libraries not yet initialised and for every subprocess it starts (notebook kernels,
    pytest-xdist workers). A value set otherwise is left alone, and :func:`check` reports it."""
    for key, value in ENV.items():
        os.environ.setdefault(key, value)


def apply() -> None:
    """Apply the configuration to this process: :data:`ENV` in ``os.environ`` (where unset), oneDNN
    off, one thread, deterministic algorithms. Call it before the first computation (see
    :func:`check`)."""
    set_environment()
    import torch

    torch.backends.mkldnn.enabled = False
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def check() -> list[str]:
    """What of the configuration is not in force in this process, as sentences (empty: all is).

    Checks the torch flags, the environment, ATen's dispatch level, and NumPy's AVX-512 loops
    (which only an environment variable set before NumPy's import turns off).
    """
    import torch

    problems = []
    for key, value in ENV.items():
        if os.environ.get(key) != value:
            problems.append(f"environment variable {key} is {os.environ.get(key)!r}, not {value!r}")
    if torch.backends.mkldnn.enabled:
        problems.append("torch.backends.mkldnn.enabled is True (oneDNN picks kernels by CPU)")
    if torch.get_num_threads() != 1:
        problems.append(f"torch uses {torch.get_num_threads()} threads, not 1")
    if not torch.are_deterministic_algorithms_enabled():
        problems.append("torch.use_deterministic_algorithms is off")
    if is_x86_64():
        cap = torch.backends.cpu.get_cpu_capability()
        if cap not in ("AVX2", "DEFAULT"):   # DEFAULT: a CPU without AVX2, outside the promise
            problems.append(f"ATen dispatches at {cap}, not AVX2 (ATEN_CPU_CAPABILITY was set too "
                            "late: before the first torch operation is needed)")
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            on = _numpy_avx512_dispatch(numpy)
            if on:
                problems.append(f"NumPy dispatches to {', '.join(on)} (NPY_DISABLE_CPU_FEATURES must be "
                                "set before NumPy is imported)")
    return problems


def _numpy_avx512_dispatch(numpy) -> list[str]:
    """NumPy's AVX-512 dispatch targets that are enabled in this process."""
    for name in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):
        try:
            mod = __import__(name, fromlist=["__cpu_features__"])
            features, targets = mod.__cpu_features__, mod.__cpu_dispatch__
        except (ImportError, AttributeError):
            continue
        return [t for t in targets if (t == "X86_V4" or t.startswith("AVX512")) and features.get(t)]
    return []


def signature() -> str:
    """A name for the float behaviour of this process: the same on every CPU whose results are
    bit-identical under the configuration (``"x86_64-avx2-portable"``); otherwise it names the
    platform, the dispatch level and what of the configuration is off. ``refimpl.zoo`` keys its
    cache on it."""
    import torch

    problems = check()
    if is_x86_64() and not problems:
        return "x86_64-avx2-portable"
    return "|".join([platform.machine(), platform.system(), torch.backends.cpu.get_cpu_capability(),
                     *problems])


def sqrt(x):
    """Square root, correctly rounded for float32/float16/bfloat16, the same bits on every CPU.

    ``torch.sqrt`` on x86 CPUs calls MKL's vector math, whose float32 and float64 results are
    approximate and differ between CPUs (measured: 691 of 4099 float32 square roots off by one
    ulp on one CPU, 624 on another). Here: y = x * rsqrt(x) in float64 (exact vector square root
    and division), rounded to float32, then corrected to the nearest float32 by comparing x with
    the squared midpoints (exact in float64). float64 input: x * rsqrt(x), within 2 ulp.
    x: a floating-point tensor of any shape and device; returns x's shape and dtype. x < 0 and
    NaN give NaN, +-0 and +inf themselves. Differentiable where x > 0.
    Used by ``refimpl.calib``, ``refimpl.ptq`` (cross-layer equalization).
    """
    import torch

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor (float16, bfloat16, float32, float64), got {x.dtype}")
    x64 = x.to(torch.float64)
    y64 = x64 * x64.rsqrt()
    if x.dtype != torch.float64:
        y = y64.to(torch.float32)
        up = torch.nextafter(y, torch.full_like(y, float("inf")))
        down = torch.nextafter(y, torch.zeros_like(y))
        yd, upd, downd = y.double(), up.double(), down.double()
        # midpoints between neighbouring float32 values have 25 bits: their squares are exact
        mid_up, mid_down = (yd + upd) / 2, (yd + downd) / 2
        y = torch.where(x64 > mid_up * mid_up, up, torch.where(x64 < mid_down * mid_down, down, y))
        y64 = y.to(torch.float64)
    # 0 * inf and inf * 0 are NaN above: +-0 and +inf are their own square roots
    y64 = torch.where((x64 == 0) | (x64 == float("inf")), x64, y64)
    return y64.to(x.dtype)


def _main(argv) -> int:
    if argv == ["--make"]:
        for key, value in ENV.items():
            print(f"export {key} := {value}")
        return 0
    if argv in ([], ["--sh"]):
        for key, value in ENV.items():
            print(f"export {key}='{value}'")
        return 0
    print("usage: python refimpl/numerics.py [--sh | --make]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

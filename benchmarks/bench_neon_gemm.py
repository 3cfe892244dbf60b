"""run_gemm's fast path against numpy's int32 matmul on a 56x56 3x3 conv with 64 output channels.

Prints, from one run with both measured side by side (interleaved, best of repeats, since this
machine is noisy), for every kernel: refimpl.neon.run_gemm(trace=False) time / numpy
``A.astype(np.int32) @ B.astype(np.int32)`` time (goal <= 10), on A (64, 576) @ B (576, 3136)
(the im2col GEMM of the conv, output channels as M here), and the simulated cycles per MAC on
each core (timed once before the measurement, so the per-core cycle accounting is cached).
"""


import numpy as np

from refimpl.neon import CORE_FEATURES, CORES
from refimpl.neon.kernels import run_gemm

from _timing import best_of  # benchmarks/_timing.py (scripts run from benchmarks/)

M, K, N = 64, 576, 3136
RUNS = [("smlal", 8), ("sdot", 8), ("int7", 7), ("mla-lowbit", 2), ("mla-lowbit", 3),
        ("mla-lowbit", 4)]


def main():
    rng = np.random.default_rng(0)
    print(f"A ({M}, {K}) @ B ({K}, {N}): {M * K * N / 1e6:.1f}M MACs")
    print(f"{'kernel':<14}{'bits':>5}{'run_gemm s':>12}{'numpy s':>10}{'ratio':>8}  exact  "
          + "  ".join(f"{c} cyc/MAC" for c in CORES))
    for kernel, bits in RUNS:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        a = rng.integers(lo, hi + 1, (M, K)).astype(np.int8)
        b = rng.integers(lo, hi + 1, (K, N)).astype(np.int8)
        per_core = []
        for core in CORES:
            if kernel == "sdot" and "dotprod" not in CORE_FEATURES[core]:
                per_core.append("      -")
                continue
            per_core.append(f"{run_gemm(a, b, kernel, core=core, bits=bits).cycles_per_mac:7.4f}")
        ours = lambda: run_gemm(a, b, kernel, bits=bits)
        ref = lambda: a.astype(np.int32) @ b.astype(np.int32)
        t_ours, t_ref = best_of(repeats=7, fns=[ours, ref])
        got = ours().result
        # == numpy's matmul (smlal could differ only where MIN*MIN pairs wrap: documented)
        exact = np.array_equal(got, ref())
        print(f"{kernel:<14}{bits:>5}{t_ours:12.4f}{t_ref:10.4f}{t_ours / t_ref:8.2f}  "
              f"{exact!s:<6} "
              + "  ".join(f"{p:>{len(c) + 8}}" for p, c in zip(per_core, CORES)))


if __name__ == "__main__":
    main()

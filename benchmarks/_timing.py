"""Shared by the benchmark scripts: interleaved best-of timing (this machine is noisy)."""

import time


def best_of(fns, repeats=7):
    """Min wall time (s) of each function; calls interleaved so drift hits all alike, each
    function called once first as a warm-up (allocator, caches, threads)."""
    best = [float("inf")] * len(fns)
    for fn in fns:
        fn()
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best

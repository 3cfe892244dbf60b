"""Entropy (KL) calibration: refimpl.calib.entropy_onnxruntime against onnxruntime's
HistogramCollector.get_entropy_onnxruntime on the same 2048-bin histogram.

The histogram is onnxruntime's own (HistogramCollector.collect, method "entropy") of 1M
Laplacian samples. The two are timed in alternation, several rounds, and the minimum of each is
kept (the machine is noisy); both must return the same threshold.

Run: .venv/bin/python benchmarks/bench_calib.py
"""

import contextlib
import io
import time

import numpy as np
from onnxruntime.quantization.calibrate import HistogramCollector

from refimpl.calib import entropy_onnxruntime

SAMPLES = 1_000_000
NUM_BINS = 2048
NUM_QUANTIZED_BINS = 128
ROUNDS = 3            # onnxruntime takes seconds per call
INNER = 20            # refimpl calls per round


def main():
    x = np.random.default_rng(0).laplace(size=SAMPLES).astype(np.float32)
    collector = HistogramCollector("entropy", False, NUM_BINS, NUM_QUANTIZED_BINS, 99.99, "same")
    with contextlib.redirect_stdout(io.StringIO()):           # it prints progress
        collector.collect({"x": x})
    histogram = collector.get_histogram_dict()["x"]
    hist, edges = histogram[:2]
    # wide min/max: onnxruntime's final clip to the data range becomes a no-op, as in refimpl
    big = np.array(np.finfo(edges.dtype).max, dtype=edges.dtype)
    ort_input = (hist, edges, -big, big, edges[-1])

    ours, theirs = [], []
    for _ in range(ROUNDS):
        for _ in range(INNER):
            t0 = time.perf_counter()
            got = entropy_onnxruntime(hist, edges, NUM_QUANTIZED_BINS)
            ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        want = collector.get_entropy_onnxruntime(ort_input, NUM_QUANTIZED_BINS)
        theirs.append(time.perf_counter() - t0)

    same = got == want
    print(f"histogram: {hist.size} bins of {SAMPLES:,} Laplacian samples, "
          f"{NUM_QUANTIZED_BINS} quantized bins, {hist.size // 2 - NUM_QUANTIZED_BINS // 2 + 1} windows")
    print(f"refimpl entropy_onnxruntime        : {min(ours) * 1e3:9.2f} ms  (min of {len(ours)})")
    print(f"onnxruntime get_entropy_onnxruntime: {min(theirs) * 1e3:9.2f} ms  (min of {len(theirs)})")
    print(f"threshold refimpl    : ({float(got[0]):.7g}, {float(got[1]):.7g})")
    print(f"threshold onnxruntime: ({float(want[0]):.7g}, {float(want[1]):.7g})")
    print(f"same threshold       : {same}")
    print(f"speed-up             : {min(theirs) / min(ours):.0f}x")
    if not same:
        raise SystemExit("thresholds differ")


if __name__ == "__main__":
    main()

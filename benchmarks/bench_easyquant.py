"""EasyQuant's scale search (refimpl.ptq.easyquant) batched against the same search as a loop over
candidates, on the book's MobileNetV2-style MNIST-1D model (refimpl.zoo, seed 0), W8A8, the
paper's variant (n = 100 candidates, one round, 50 calibration samples), one thread.

Prints the seconds of each (the batched search: best of 3 after a warm-up; the loop, which takes
about a minute: one run between them), their ratio, and whether the two chose the same scales
(they must). Goal: the batched search under 30 s.

Run: .venv/bin/python benchmarks/bench_easyquant.py
"""

import time

import torch

from refimpl.ptq import easyquant
from refimpl.zoo import pretrained

GOAL_SECONDS = 30.0


def main():
    torch.set_num_threads(1)
    model, data = pretrained("mnist1d", "mobilenetv2", seed=0, progress=False)

    def run(batched):
        t0 = time.perf_counter()
        _, report = easyquant(model, data.x_calib, 8, 8, batched=batched, progress=False, return_report=True)
        return time.perf_counter() - t0, report

    run(True)                                                       # warm-up
    t_batched, batched = run(True)
    t_loop, loop = run(False)
    t_batched = min(t_batched, run(True)[0], run(True)[0])
    same = all(torch.equal(a.weight_scale, b.weight_scale) and a.act_scale == b.act_scale
               for a, b in zip(batched, loop))
    channels = sum(r.weight_scale.numel() for r in batched)
    print(f"mnist1d MobileNetV2 (seed 0), W8A8, {len(batched)} layers, {channels} weight scales, "
          f"{data.x_calib[:50].shape[0]} samples, {torch.get_num_threads()} thread")
    print(f"batched : {t_batched:7.2f} s  (best of 3; goal < {GOAL_SECONDS:.0f} s)")
    print(f"loop    : {t_loop:7.2f} s")
    print(f"loop / batched: {t_loop / t_batched:.1f}x   same scales: {same}")
    if not same:
        raise SystemExit("the batched and the looped search chose different scales")
    if t_batched >= GOAL_SECONDS:
        raise SystemExit(f"the batched search took {t_batched:.1f} s (goal < {GOAL_SECONDS:.0f} s)")


if __name__ == "__main__":
    main()

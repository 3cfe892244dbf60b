"""PWLQ's breakpoint search for a whole model: refimpl.quant.pwlq_breakpoint (all channels and
candidates of a stage batched) against the same coarse-to-fine search written as a plain Python
loop over channels and candidates, as the released code runs it (quant/pwlq.py,
pwlq_coarse2fine_grid_search, one output channel at a time).

The model: the book's pretrained MobileNetV2-style network on MNIST-1D (refimpl.zoo), BatchNorm
folded, every Conv/Linear weight per output channel at 4 bits. Prints both times (interleaved,
best of repeats, one thread), their ratio (goal: the batched search under 2 s for the whole model)
and on how many channels the two choose the same p.

Run: PYTHONPATH=. REFIMPL_CACHE=.cache/refimpl .venv/bin/python benchmarks/bench_pwlq.py
"""

import math

import torch
from torch import nn

from refimpl.fold import fold_all_bn
from refimpl.quant import pwlq, pwlq_breakpoint
from refimpl.zoo import pretrained

from _timing import best_of  # benchmarks/_timing.py (scripts run from benchmarks/)

BITS = 4


def loop_search(w: torch.Tensor, bits: int) -> int:
    """One channel: p/m in thousandths, by the released code's three stages (a candidate replaces
    the best only when its error is strictly smaller; p/m outside (0, 1) skipped). In float64,
    as refimpl's search (the released code works in float32)."""
    w = w.double()
    m = float(w.abs().max())
    if m == 0:
        return 0
    best, min_err = 0, math.inf
    for k in range(100, 1000, 100):
        e = float(((pwlq(w, bits, m, k / 1000 * m, axis=None) - w) ** 2).sum())
        if e < min_err:
            best, min_err = k, e
    for step in (10, 1):
        for k in range(best - 10 * step, best + 10 * step, step):
            if 0 < k < 1000:
                e = float(((pwlq(w, bits, m, k / 1000 * m, axis=None) - w) ** 2).sum())
                if e < min_err:
                    best, min_err = k, e
    return best


def main():
    torch.set_num_threads(1)
    model, _ = pretrained("mnist1d", "mobilenetv2", progress=False)
    folded = fold_all_bn(model)
    weights = [mod.weight.detach() for mod in folded.modules() if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    channels = sum(w.shape[0] for w in weights)
    print(f"MobileNetV2 on MNIST-1D, BN folded: {len(weights)} layers, {channels} output channels, "
          f"{sum(w.numel() for w in weights):,} weights; {BITS}-bit PWLQ, {torch.get_num_threads()} thread")

    def batched():
        return [pwlq_breakpoint(w, BITS, "search") for w in weights]

    def looped():
        return [[loop_search(w[c].reshape(-1), BITS) for c in range(w.shape[0])] for w in weights]

    t_batched, t_loop = best_of([batched, looped], repeats=2)
    same = 0
    for (m, p), ratios in zip(batched(), looped()):
        ours = torch.where(m > 0, torch.round(p / torch.where(m > 0, m, 1) * 1000), 0).long()
        same += int((ours == torch.tensor(ratios)).sum())
    print(f"batched search (refimpl.quant.pwlq_breakpoint): {t_batched:8.3f} s  (goal < 2 s)")
    print(f"loop over channels and candidates             : {t_loop:8.3f} s")
    print(f"speed-up                                      : {t_loop / t_batched:8.0f}x")
    print(f"same p on {same} of {channels} channels")
    if t_batched >= 2.0:
        raise SystemExit("the batched search missed its goal of 2 s")


if __name__ == "__main__":
    main()

"""refimpl's fake_quant against torch's fused per-channel op: time ratios and bit-exactness.

Prints, from one run with both measured side by side (interleaved, best of repeats, since this
machine is noisy): refimpl.fake_quant / torch.fake_quantize_per_channel_affine (goal <= 0.5) and
refimpl.fake_quant / x.clone() (the memory floor, goal <= 6), on 4M float32 elements, 2 threads.
"""


import torch

from refimpl.quant import QuantSpec, fake_quant, qparams

from _timing import best_of  # benchmarks/_timing.py (scripts run from benchmarks/)


def main():
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 128, 128, generator=g) * torch.rand(256, 1, 1, generator=g)   # 4M elements
    print(f"tensor {tuple(w.shape)} float32 ({w.numel() / 1e6:.1f}M elements), {torch.get_num_threads()} threads")
    for symmetric in (True, False):
        spec = QuantSpec(8, symmetric=symmetric, axis=0)
        s, z = qparams(w.amin((1, 2)), w.amax((1, 2)), spec)
        ours = lambda: fake_quant(w, s, z, spec)
        ref = lambda: torch.fake_quantize_per_channel_affine(w, s, z, 0, spec.qmin, spec.qmax)
        floor = lambda: w.clone()
        exact = torch.equal(ours(), ref())
        t_ours, t_ref, t_clone = best_of(repeats=30, fns=[ours, ref, floor])
        print(f"per-channel int8 {'symmetric ' if symmetric else 'asymmetric'}: refimpl {t_ours * 1e3:6.2f} ms"
              f" | torch {t_ref * 1e3:6.2f} ms | clone {t_clone * 1e3:5.2f} ms"
              f" | refimpl/torch {t_ours / t_ref:.2f}x (goal <= 0.5) | refimpl/clone {t_ours / t_clone:.2f}x"
              f" (goal <= 6) | bit-exact: {exact}")


if __name__ == "__main__":
    main()

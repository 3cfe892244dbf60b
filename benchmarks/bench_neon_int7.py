"""INT7 vs INT8 (EasyQuant, Wu et al. 2020 §3.3, Tables 5-6) on the NEON simulator's cores, on a
real layer of the book's model: ResNetCNN (digits) ``blocks.0.conv1``, a 3x3 conv on a batch
of 64 8x8 images, whose im2col GEMM is derived here from the model definition.

Prints, all in one run (simulated cycles are deterministic; every ratio is taken between rows
of this run):

1. the layer's GEMM shape (refimpl.neon.int7.conv_gemm_shape on the input shape a forward hook
   sees) and the int16 lanes' first wraps (smlal_accumulate: 3rd at INT8, 9th at INT7);
2. refimpl.neon.int7.compare_kernels on that GEMM: cycles per MAC of each INT7_CONFIGS kernel
   on each modelled core (whole GEMM, and the K loop alone with llvm-mca-19's figure for the
   same loop where installed), outputs checked against numpy, INT7/INT8 speed-ups like for like
   (same SMLAL kernel and tile, 8 vs 2 products per int16 lane) and for the existing ``int7``
   kernel against chapter 4's INT8 kernel;
3. the INT8 kernel ncnn shipped in 2020 (refimpl.neon.int7.ncnn_int8_gemm, the transcribed
   ``int8kernel_m4`` K loop) on the same GEMM, output checked, and the INT7 kernels' saving
   against it;
4. two more loops from the authors' own ncnn fork (deepglint/eq-ncnn @64ba809, 2020-06-25, the
   code the EasyQuant README says its INT7 speed tests ran on), timed only (see below);
5. every loop's resource bounds (refimpl.neon.int7.resource_bounds) against its steady state;
6. the sum over every convolution of the model (GEMMs only), INT7 vs INT8.

Loops from deepglint/eq-ncnn, written out here in the simulator's subset, TIMED ONLY:
* ``eq-ncnn INT7 1x1``: the aarch64 K loop of ``conv1x1s1_int8_e2e_neon``
  (src/layer/arm/convolution_1x1_int8.h): 16 pixels x 16 input channels x 8 output channels
  per iteration; weights broadcast by DUP, SMULL/SMULL2 + 15 SMLAL/SMLAL2 add 16 products into
  each int16 lane, and SQADD adds the lanes into an INT16 output buffer (loaded and stored
  every iteration): no SADALP, no 32-bit accumulator at all. SQADD is timed as ADD (both
  "ASIMD arith" rows; the simulator has no SQADD) and the PRFM hints are left out (the model
  assumes L1 hits). Its arithmetic is checked here on the Machine with ADD in place of SQADD
  on operands that cannot saturate (7-bit activations in [0, 63], 6-bit weights).
* ``eq-ncnn/ncnn-2019 INT8 im2col``: the aarch64 K loop of ``conv_im2col_sgemm_int8_neon``
  (src/layer/arm/convolution_sgemm_int8.h), ncnn's int8 GEMM before the 2020 ``int8kernel``:
  4x4 outputs x 4 k per iteration, REV32/REV64 permutes of one 16-byte A load, SMULL + SMLAL2 +
  SADALP. REV is timed as EXT (both in the guides' permute rows; the simulator has no REV),
  PRFM left out; timing only.

Run: ``cd benchmarks && PYTHONPATH=.. python bench_neon_int7.py``.
"""

import shutil

import numpy as np
import torch

from refimpl.models import ResNetCNN
from refimpl.neon import CORES, Machine, lanes, steady_state_cycles
from refimpl.neon import timing
from refimpl.neon.int7 import (INT7_CONFIGS, NCNN_INT8_LOOP, compare_kernels, conv_gemm_shape,
                               max_smlal_accumulations, ncnn_int8_gemm, resource_bounds,
                               smlal_accumulate)
from refimpl.train import TRAIN_DEFAULTS

SHORT = {c: c.replace("cortex-", "") for c in CORES}


# ---- the layer --------------------------------------------------------------------------------
def model_conv_shapes(batch=64):
    """{name: (M, K, N)} of every Conv2d of the digits ResNetCNN, from forward hooks."""
    model = ResNetCNN(in_channels=1, num_classes=10, **TRAIN_DEFAULTS["digits", "resnet"]["model"])
    shapes = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Conv2d):
            def hook(m, inp, out, name=name):
                shapes[name] = conv_gemm_shape(tuple(inp[0].shape), m.out_channels, m.kernel_size,
                                               stride=m.stride, padding=m.padding,
                                               dilation=m.dilation, groups=m.groups)
            mod.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(batch, 1, 8, 8))
    return shapes


# ---- deepglint/eq-ncnn loops (timing only) ----------------------------------------------------
def eq_ncnn_int7_1x1_loop():
    """conv1x1s1_int8_e2e_neon's K loop (eq-ncnn convolution_1x1_int8.h, aarch64, clang path),
    in its order; operands: w0 = nn, x1-x8 = the 8 int16 output rows, x9-x24 = the 16 input
    channel rows, v0-v7 = the 8 output channels' 16 weights (the asm's %50-%57). SQADD -> ADD,
    PRFM dropped (see the module docstring)."""
    out = ["eq1x1:"]

    def mac(i, k):   # input channel i (v8+i) times the broadcast weight in v24+k
        return [f"smlal v28.8h, v{8 + i}.8b, v{24 + k}.8b",
                f"smlal2 v31.8h, v{8 + i}.16b, v{24 + k}.16b"]

    for oc in range(8):
        w, nxt = f"v{oc}", f"v{oc + 1}" if oc < 7 else None
        body = ["smull v28.8h, v8.8b, v24.8b", "smull2 v31.8h, v8.16b, v24.16b"]
        if oc == 0:   # output channel 0 also streams in input channels 4..15
            body += mac(1, 1) + ["ld1 {v12.16b}, [x13], #16", "ld1 {v13.16b}, [x14], #16"]
            body += mac(2, 2) + ["ld1 {v14.16b}, [x15], #16", "ld1 {v15.16b}, [x16], #16",
                                 f"dup v24.16b, {w}.b[4]"]
            body += mac(3, 3) + [f"dup v{25 + j}.16b, {w}.b[{5 + j}]" for j in range(3)]
            body += mac(4, 0) + ["ld1 {v29.8h, v30.8h}, [x1]"]
            body += mac(5, 1) + ["ld1 {v16.16b}, [x17], #16"]
            body += mac(6, 2) + [f"ld1 {{v{17 + j}.16b}}, [x{18 + j}], #16" for j in range(3)]
            body += mac(7, 3) + [f"dup v{24 + j}.16b, {w}.b[{8 + j}]" for j in range(3)]
            body += mac(8, 0) + [f"dup v27.16b, {w}.b[11]"]
            body += mac(9, 1) + ["ld1 {v20.16b}, [x21], #16"]
            body += mac(10, 2) + [f"ld1 {{v{21 + j}.16b}}, [x{22 + j}], #16" for j in range(3)]
            body += mac(11, 3) + [f"dup v{24 + j}.16b, {w}.b[{12 + j}]" for j in range(3)]
            body += mac(12, 0) + [f"dup v27.16b, {w}.b[15]"]
            body += mac(13, 1) + [f"dup v24.16b, {nxt}.b[0]"]
            body += mac(14, 2) + [f"dup v25.16b, {nxt}.b[1]"]
            body += mac(15, 3) + [f"dup v26.16b, {nxt}.b[2]", "add v29.8h, v29.8h, v28.8h",
                                  "add v30.8h, v30.8h, v31.8h", f"dup v27.16b, {nxt}.b[3]"]
        else:
            body += [f"dup v24.16b, {w}.b[4]"]
            for i in range(1, 16):
                body += mac(i, i % 4)
                if i <= 3:        # the weight register just read takes the byte 4 further on
                    body += [f"dup v{24 + i}.16b, {w}.b[{i + 4}]"]
                elif i == 4:      # this output channel's int16 sums, 16 pixels
                    body += [f"ld1 {{v29.8h, v30.8h}}, [x{oc + 1}]"]
                elif i <= 12 or (oc < 7 and i <= 14):
                    byte = i + 3  # one step behind from here on; bytes 16.. are the next channel's
                    src = w if byte < 16 else nxt
                    body += [f"dup v{24 + (i - 1) % 4}.16b, {src}.b[{byte % 16}]"]
                elif i in (13, 14):   # output channel 7 reloads input channels 0, 1
                    body += [f"ld1 {{v{8 + i - 13}.16b}}, [x{9 + i - 13}], #16"]
            if oc < 7:
                body += ["add v29.8h, v29.8h, v28.8h", f"dup v26.16b, {nxt}.b[2]",
                         f"dup v27.16b, {nxt}.b[3]", "add v30.8h, v30.8h, v31.8h"]
            else:
                body += ["ld1 {v10.16b}, [x11], #16", "ld1 {v11.16b}, [x12], #16",
                         "dup v24.16b, v0.b[0]", "add v29.8h, v29.8h, v28.8h",
                         "dup v25.16b, v0.b[1]", "add v30.8h, v30.8h, v31.8h",
                         "dup v26.16b, v0.b[2]", "dup v27.16b, v0.b[3]"]
        body += [f"st1 {{v29.8h, v30.8h}}, [x{oc + 1}], #32"]
        out += body
    out += ["subs w0, w0, #1", "b.ne eq1x1"]
    return "\n".join(out) + "\n"


EQ_NCNN_INT8_IM2COL_LOOP = """im2col:
ld1 {v0.16b}, [x0]
ld1 {v4.16b}, [x1]
add x0, x0, #16
add x1, x1, #16
ext v1.16b, v0.16b, v0.16b, #2
ext v2.16b, v0.16b, v0.16b, #4
ext v3.16b, v0.16b, v0.16b, #6
smull v8.8h, v4.8b, v0.8b
smull v9.8h, v4.8b, v1.8b
smull v10.8h, v4.8b, v2.8b
smull v11.8h, v4.8b, v3.8b
smlal2 v8.8h, v4.16b, v0.16b
smlal2 v9.8h, v4.16b, v1.16b
smlal2 v10.8h, v4.16b, v2.16b
smlal2 v11.8h, v4.16b, v3.16b
sadalp v16.4s, v8.8h
sadalp v17.4s, v9.8h
sadalp v18.4s, v10.8h
sadalp v19.4s, v11.8h
subs w4, w4, #1
b.ne im2col
"""   # eq-ncnn convolution_sgemm_int8.h conv_im2col_sgemm_int8_neon, aarch64; REV -> EXT, no PRFM


def check_eq_1x1(loop, rng):
    """Run the transcribed INT7 1x1 loop for 2 iterations (32 pixels) on the Machine on
    operands that cannot saturate int16 and compare the int16 outputs with numpy."""
    pixels, inch, outch = 32, 16, 8
    act = rng.integers(0, 64, (inch, pixels)).astype(np.int8)        # after ReLU, 7-bit
    wts = rng.integers(-31, 32, (outch, inch)).astype(np.int8)       # 6-bit (eq-ncnn README)
    init = rng.integers(-2000, 2000, (outch, pixels)).astype(np.int16)
    m = Machine("cortex-a53", inch * pixels + outch * pixels * 2 + 64)
    m.mem[:act.size] = act.view(np.uint8).ravel()
    out_at = act.size
    m.mem[out_at:out_at + init.size * 2] = init.view(np.uint8).ravel()
    for i in range(inch):
        m.x[9 + i] = i * pixels
    for o in range(outch):
        m.x[1 + o] = out_at + o * pixels * 2
        m.v[o] = wts[o].view(np.uint8)
    m.x[0] = pixels // 16
    pre = "\n".join([f"ld1 {{v{8 + i}.16b}}, [x{9 + i}], #16" for i in range(4)]
                    + [f"dup v{24 + j}.16b, v0.b[{j}]" for j in range(4)])
    m.run(pre + "\n" + loop)
    got = m.mem[out_at:out_at + init.size * 2].view("<i2").reshape(outch, pixels)
    ref = init.astype(np.int64) + wts.astype(np.int64) @ act.astype(np.int64)
    return bool(np.array_equal(got, ref))


# ---- printing -----------------------------------------------------------------------------------
def fmt(v, spec=".4f"):
    return "      -" if v is None else f"{v:{spec}}"


def main():
    rng = np.random.default_rng(0)
    have_mca = shutil.which(timing.LLVM_MCA) is not None
    shapes = model_conv_shapes()
    M, K, N = shapes["blocks.0.conv1"]
    print(f"ResNetCNN digits blocks.0.conv1, batch 64: im2col GEMM ({M} x {K}) @ ({K} x {N}), "
          f"{M * K * N / 1e6:.2f} M MACs")
    print(f"paper's SMLAL budget per int16 lane: INT8 {max_smlal_accumulations(8)}, "
          f"INT7 {max_smlal_accumulations(7)} (narrow range); full range: "
          f"{max_smlal_accumulations(8, narrow_range=False)}, "
          f"{max_smlal_accumulations(7, narrow_range=False)}")
    for v in (127, 63, -128, -64):
        tr = smlal_accumulate(v, v, 12)
        i = tr.first_wrap - 1
        print(f"  SMLAL {v:4d} x {v:4d} into int16: first wrap at accumulation {tr.first_wrap} "
              f"(exact {int(tr.exact[i, 0])}, lane {int(tr.lanes[i, 0])})")

    # 2. the kernels on the layer
    rows = compare_kernels(M, K, N, INT7_CONFIGS, llvm_mca=have_mca)
    print(f"\ncycles per MAC on the layer (whole GEMM; all outputs == numpy matmul: "
          f"{all(r.exact for r in rows)})")
    print(f"{'kernel':<26}" + "".join(f"{SHORT[c]:>9}" for c in CORES)
          + "   speed-up vs baseline (" + ", ".join(SHORT[c] for c in CORES) + ")")
    for r in rows:
        sp = ", ".join("-" if r.speedup[c] is None else f"{r.speedup[c]:.3f}x" for c in CORES)
        print(f"{r.config.name:<26}" + "".join(f"{fmt(r.cycles_per_mac[c]):>9}" for c in CORES)
              + (f"   {sp} vs {r.config.baseline}" if r.config.baseline else ""))
    print("\nK loop alone, cycles per MAC: ours" + (" / llvm-mca-19" if have_mca else
                                                      " (llvm-mca-19 not installed)"))
    for r in rows:
        cells = []
        for c in CORES:
            mca = r.llvm_mca_loop_cycles_per_mac.get(c)
            cells.append(fmt(r.loop_cycles_per_mac[c]) + ("" if mca is None else f"/{mca:.4f}"))
        print(f"{r.config.name:<26}" + "".join(f"{x:>15}" for x in cells))

    # 3. ncnn 2020's INT8 kernel
    top = 127
    a = rng.integers(-top, top + 1, (M, K)).astype(np.int8)
    b = rng.integers(-top, top + 1, (K, N)).astype(np.int8)
    ncnn = {c: ncnn_int8_gemm(a, b, core=c) for c in CORES}
    ok = all(np.array_equal(g.result, a.astype(np.int64) @ b.astype(np.int64))
             for g in ncnn.values())
    small = ncnn_int8_gemm(a[:16, :64], b[:64, :8], trace=True)
    ok &= bool(np.array_equal(small.result, a[:16, :64].astype(np.int64) @ b[:64, :8]))
    print(f"\nncnn 2020 int8kernel_m4 (transcribed) on the layer, output == numpy "
          f"(and on the Machine, 16x64x8): {ok}")
    print(f"{'ncnn INT8 int8kernel 4x4':<26}" + "".join(f"{ncnn[c].cycles_per_mac:9.4f}"
                                                       for c in CORES))
    print("saving of each kernel against ncnn 2020's INT8 (1 - cycles / ncnn cycles):")
    for r in rows:
        print(f"  {r.config.name:<26}" + "".join(
            f"{1 - r.cycles_per_mac[c] / ncnn[c].cycles_per_mac:+9.1%}" for c in CORES))

    # 4. eq-ncnn loops, timed only
    eq1x1 = eq_ncnn_int7_1x1_loop()
    print(f"\neq-ncnn INT7 1x1 loop on the Machine (ADD for SQADD, no saturation): int16 "
          f"outputs == numpy: {check_eq_1x1(eq1x1, rng)}")
    loops = {"ncnn 2020 INT8 int8kernel": (NCNN_INT8_LOOP, 256),
             "eq-ncnn 2019 INT8 im2col": (EQ_NCNN_INT8_IM2COL_LOOP, 64),
             "eq-ncnn INT7 1x1 (int16 out)": (eq1x1, 2048)}
    for r in rows:
        text = [t for kind, t, _ in r.program.account if kind == "loop"][0]
        loops[r.config.name] = (text, r.program.mr * r.program.nr * r.program.kstep)
    print("\nloop steady state, cycles per MAC [resource bound per MAC, binding resource]")
    print(f"{'loop':<30}" + "".join(f"{SHORT[c]:>26}" for c in CORES))
    steady = {}
    for name, (text, macs) in loops.items():
        cells = []
        for c in CORES:
            s = steady_state_cycles(text, c) / macs
            steady[name, c] = s
            bounds = resource_bounds(text, c)
            key = max(bounds, key=bounds.get)
            cells.append(f"{s:.4f} [{bounds[key] / macs:.4f} {key.replace('pipes ', '')}]")
        print(f"{name:<30}" + "".join(f"{x:>26}" for x in cells))
    print("\nloop-level INT7 saving against each INT8 baseline loop (1 - INT7 / INT8):")
    for base in ("ncnn 2020 INT8 int8kernel", "eq-ncnn 2019 INT8 im2col", "INT8 SMLAL 4x4, 2/lane",
                 "INT8 SMLAL 3x4, 2/lane"):
        for int7 in ("INT7 SMLAL 3x4, 8/lane", "eq-ncnn INT7 1x1 (int16 out)"):
            print(f"  {int7:<30} vs {base:<28}" + "".join(
                f"{SHORT[c]} {1 - steady[int7, c] / steady[base, c]:+6.1%}  " for c in CORES))

    # 6. every conv of the model
    print("\nevery Conv2d of the model (GEMMs only; batch 64):")
    totals = {}
    for name, (m, k, n) in shapes.items():
        res = compare_kernels(m, k, n, INT7_CONFIGS[:3])
        print(f"  {name:<22} GEMM {m}x{k}x{n}: " + "; ".join(
            f"{r.config.name.split(',')[0]} a53 {r.cycles_per_mac['cortex-a53']:.4f} "
            f"a72 {r.cycles_per_mac['cortex-a72']:.4f}" for r in res))
        for r in res:
            for c in CORES:
                totals[r.config.name, c] = totals.get((r.config.name, c), 0) + \
                    r.cycles_per_mac[c] * m * k * n
    for c in CORES:
        i8 = totals["INT8 SMLAL 4x4, 2/lane", c]
        i7 = totals["INT7 SMLAL 3x4, 8/lane", c]
        print(f"  model total {SHORT[c]}: INT8 4x4 {i8 / 1e6:.3f} M cycles, INT7 3x4 8/lane "
              f"{i7 / 1e6:.3f} M cycles: speed-up {i8 / i7:.3f}x, saving {1 - i7 / i8:+.1%}")


if __name__ == "__main__":
    main()

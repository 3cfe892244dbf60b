"""onnxruntime latency of the book's MNIST-1D ResNet (refimpl.zoo, seed 0): the float ONNX graph
(refimpl.deploy.export_float), refimpl's QDQ export of the calibrated W8A8 model (per-channel
weights, min-max ranges; refimpl.deploy.export_qdq) and onnxruntime's own static quantization of
the float graph (refimpl.deploy.ort_quantize_static, MinMax, uint8 and int8 activations).

For batch 1 and a batch of 256, all models are timed in ONE interleaved run per batch
(refimpl.deploy.ort_latency: round robin over the models each repeat, in this process, one
thread), with onnxruntime's graph optimisations on (ORT_ENABLE_ALL: QDQ groups fused into
integer kernels) and, for the QDQ models, also off (ORT_DISABLE_ALL: float Conv/Gemm on
dequantized tensors, Q/DQ as ops). Prints the median per run, per sample, and the ratio to the
float model measured in the same run; then the kernels onnxruntime runs for each optimised model.

onnxruntime's int8 kernels depend on the CPU (u8 x s8 products summed with VNNI's vpdpbusd
where the CPU has it, else in pairs through 16-bit intermediates), so the CPU model and its
AVX2 / AVX-512 / VNNI / AMX flags are printed first (from /proc/cpuinfo).

Run: .venv/bin/python benchmarks/ort_latency.py [--repeats-small N] [--repeats-large N]
"""

import argparse
import platform
from pathlib import Path

import onnxruntime

from refimpl import numerics

BATCHES = (1, 256)
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_info() -> tuple[str, dict]:
    """(CPU model name, {flag: present}) from /proc/cpuinfo; ("unknown", {}) elsewhere."""
    path = Path("/proc/cpuinfo")
    if not path.exists():
        return platform.processor() or "unknown", {}
    name, flags = "unknown", set()
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and name == "unknown":
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return name, {f: f in flags for f in FLAGS}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats-small", type=int, default=2000, help="timed runs at batch 1")
    parser.add_argument("--repeats-large", type=int, default=200, help="timed runs at batch 256")
    args = parser.parse_args()

    numerics.apply()                 # the book's configuration: the zoo's cached model, one thread
    from refimpl.deploy import (export_float, export_qdq, ort_latency, ort_optimized_ops, ort_quantize_static,
                                ort_session)
    from refimpl.fold import fold_all_bn
    from refimpl.qmodel import QuantConfig, calibrate, quantize_model
    from refimpl.zoo import pretrained

    name, flags = cpu_info()
    print(f"CPU: {name}")
    print("flags: " + ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in flags.items()) if flags
          else "flags: unknown (no /proc/cpuinfo)")
    vnni = flags.get("avx512_vnni") or flags.get("avx_vnni")
    print(f"VNNI (onnxruntime's int8 dot products in one instruction): {'yes' if vnni else 'no'}")
    print(f"onnxruntime {onnxruntime.__version__}, CPUExecutionProvider, 1 intra-op thread, 1 inter-op thread")

    model, data = pretrained("mnist1d", "resnet", 0, progress=False)
    folded = fold_all_bn(model).eval()
    float_onnx = export_float(folded, data.x_test[:2])
    qm = quantize_model(fold_all_bn(model), QuantConfig(8, 8, weight_per_channel=True))
    calibrate(qm, data.x_calib)
    ref_qdq = export_qdq(qm, data.x_test[:2])
    ort_u8 = ort_quantize_static(float_onnx, data.x_calib, activation_type="uint8")
    ort_s8 = ort_quantize_static(float_onnx, data.x_calib, activation_type="int8")
    optimised = {"float": float_onnx, "refimpl QDQ": ref_qdq, "ORT QDQ u8": ort_u8, "ORT QDQ s8": ort_s8}
    print(f"model: MNIST-1D ResNetCNN (zoo seed 0), input {tuple(data.x_test.shape[1:])}; QDQ: W8A8, "
          f"per-channel weights, min-max ranges from {len(data.x_calib)} calibration samples")

    for batch in BATCHES:
        x = data.x_test[:batch]
        models = {**optimised,
                  "refimpl QDQ, opt off": ort_session(ref_qdq, optimize=False),
                  "ORT QDQ u8, opt off": ort_session(ort_u8, optimize=False)}
        repeats = args.repeats_small if batch == 1 else args.repeats_large
        t = ort_latency(models, x, repeats=repeats, warmup=max(5, repeats // 20))
        print(f"\nbatch {batch}: median of {repeats} interleaved runs (optimisations on unless 'opt off')")
        print(f"  {'model':22s} {'per run':>11s} {'per sample':>11s} {'/ float':>8s}")
        for k, v in t.items():
            print(f"  {k:22s} {v * 1e6:9.1f} us {v * 1e6 / batch:9.2f} us {v / t['float']:8.2f}")

    print("\nkernels after onnxruntime's optimisation (ORT_ENABLE_ALL):")
    for k, m in optimised.items():
        ops = ort_optimized_ops(m)
        print(f"  {k:12s} " + ", ".join(f"{op.removeprefix('com.microsoft.')} {n}" for op, n in ops.items()))


if __name__ == "__main__":
    main()

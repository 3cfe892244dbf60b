"""The book's float-critical work in miniature, run in a subprocess by tests/test_numerics.py:
prints, as JSON, hashes of the bits it computes (trained weights, quantized models, ranges) and
the accuracies, so that two runs under different (real or emulated) CPUs can be compared.

Usage: python tests/numerics_workload.py tiny|small|full [--mkldnn]
- tiny (for CPUs emulated by qemu-user, ~100x slower): digits, ResNet and MobileNetV2-style
  models, two steps of FP32 training, two QAT steps, the standard PTQ pipeline (CLE, bias
  absorption, MSE ranges) with two AdaRound iterations, the range-setting methods;
- small: the same with more data and steps;
- full: more again, and MNIST-1D (1-D convolutions, generated data).

It applies the book's configuration as a chapter does (refimpl.book.setup) and reports
refimpl.numerics.check(), so a run outside the configuration is visible in its output.
``--mkldnn`` turns oneDNN back on after set-up (tools/numerics_levers.py measures that lever).
"""

import dataclasses
import hashlib
import json
import sys

from refimpl.book import setup


def digest(obj) -> str:
    import numpy as np
    import torch

    h = hashlib.sha256()
    if isinstance(obj, dict):
        for k in sorted(obj):
            h.update(k.encode())
            h.update(digest(obj[k]).encode())
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            h.update(digest(v).encode())
    elif isinstance(obj, torch.Tensor):
        h.update(obj.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        h.update(np.ascontiguousarray(obj).tobytes())
    else:
        h.update(repr(obj).encode())
    return h.hexdigest()[:16]


def subset(data, n_train: int, n_test: int, n_calib: int):
    return dataclasses.replace(data, x_train=data.x_train[:n_train], y_train=data.y_train[:n_train],
                               x_test=data.x_test[:n_test], y_test=data.y_test[:n_test],
                               x_calib=data.x_calib[:n_calib])


def run(size: str, mkldnn: bool = False) -> dict:
    import torch

    from refimpl import calib, numerics
    from refimpl.data import load_dataset
    from refimpl.models import make_model
    from refimpl.ptq import standard_pipeline
    from refimpl.qat import qat_pipeline
    from refimpl.qmodel import QuantConfig
    from refimpl.quant.spec import QuantSpec
    from refimpl.train import TRAIN_DEFAULTS, evaluate, train

    setup()
    if mkldnn:
        torch.backends.mkldnn.enabled = True
    out = {"problems": numerics.check(), "signature": numerics.signature()}
    full, tiny = size == "full", size == "tiny"
    cases = [("digits", "resnet"), ("digits", "mobilenetv2")]
    if full:
        cases += [("mnist1d", "resnet"), ("mnist1d", "mobilenetv2")]
    # (train, test, calib) rows; FP32 epochs; AdaRound iterations; QAT rows; QAT epochs
    n_train, n_test, n_calib, epochs, ada_iters, n_qat, qat_epochs = {
        "tiny": (256, 64, 32, 1, 2, 64, 1), "small": (384, 128, 64, 1, 4, 64, 1),
        "full": (1024, 256, 128, 2, 20, 256, 2)}[size]
    for name, arch in cases:
        tag = f"{name}-{arch}"
        kw = {"num_samples": 600, "calib_size": 128} if name == "mnist1d" else {}
        data = load_dataset(name, seed=0, **kw)
        data = subset(data, n_train, n_test, n_calib)
        out[f"{tag}.data"] = digest([data.x_train, data.x_test, data.x_calib, data.mean, data.std])
        torch.manual_seed(0)
        model = make_model(name, arch, **TRAIN_DEFAULTS[(name, arch)]["model"])
        _, hist = train(model, data, epochs=epochs, seed=0, progress=False)
        model.eval()
        out[f"{tag}.fp32.weights"] = digest(model.state_dict())
        out[f"{tag}.fp32.loss"] = [float(v).hex() for v in hist["loss"]]
        out[f"{tag}.fp32.acc"] = evaluate(model, data.x_test, data.y_test)

        cfg = QuantConfig(weight_bits=4, act_bits=8, weight_range_method="mse", act_range_method="mse")
        r = standard_pipeline(model, data.x_calib, cfg, adaround=True,
                              adaround_kw={"iterations": ada_iters, "batch_size": 16 if tiny else 32},
                              progress=False)
        out[f"{tag}.ptq.weights"] = digest(r.qmodel.state_dict())
        out[f"{tag}.ptq.acc"] = evaluate(r.qmodel, data.x_test, data.y_test)

        qdata = subset(data, n_qat, n_test, n_calib)
        qcfg = QuantConfig(weight_bits=4, act_bits=4)
        qmodel, qhist = qat_pipeline(model, qdata, qcfg, epochs=qat_epochs, batch_size=32,
                                     eval_each_epoch=False, progress=False)
        out[f"{tag}.qat.weights"] = digest(qmodel.state_dict())
        out[f"{tag}.qat.loss"] = [float(v).hex() for v in qhist["loss"]]
        out[f"{tag}.qat.acc"] = evaluate(qmodel, data.x_test, data.y_test)

    g = torch.Generator().manual_seed(0)
    n = 1024 if tiny else 4096
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g).exp()
    spec = QuantSpec(bits=4, symmetric=False)
    for method in ("minmax", "percentile", "mse", "kl_onnxruntime"):
        out[f"calib.{method}"] = digest(getattr(calib, method)(x, spec))
    out["calib.cross_entropy"] = digest(calib.cross_entropy(x.reshape(-1, 16), spec))
    out["sqrt"] = digest(numerics.sqrt(x.abs()))
    return out


if __name__ == "__main__":
    size = sys.argv[1] if len(sys.argv) > 1 else "small"
    if size not in ("tiny", "small", "full") or set(sys.argv[2:]) - {"--mkldnn"}:
        raise SystemExit("usage: python tests/numerics_workload.py tiny|small|full [--mkldnn]")
    json.dump(run(size, "--mkldnn" in sys.argv[2:]), sys.stdout, indent=1, sort_keys=True)

"""Hash the results of single torch and NumPy operations, to find which differ between two CPUs.

The bisection tool behind refimpl/numerics.py: run it on two CPUs (or one CPU and an emulated
one) under the same environment, then compare the two outputs:

    eval "$(python3 refimpl/numerics.py)"
    .venv/bin/python tools/numerics_probe.py > native.json
    qemu-x86_64 -cpu EPYC-Rome-v1 .venv/bin/python tools/numerics_probe.py > epyc.json
    .venv/bin/python tools/numerics_probe.py --compare native.json epyc.json

Prints the operations whose bits differ. ``--no-config`` leaves oneDNN on (the library default).
"""

from __future__ import annotations

import hashlib
import json
import sys


def _hash(x) -> str:
    import numpy as np
    import torch

    if isinstance(x, torch.Tensor):
        x = x.detach().contiguous().numpy()
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()[:12]


def torch_ops():
    import torch
    import torch.nn.functional as F

    from refimpl import numerics

    return {
        "exp": torch.exp, "log": lambda x: (x.abs() + 1e-3).log(), "log1p": lambda x: x.abs().log1p(),
        "expm1": torch.expm1, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "erf": torch.erf,
        "sin": torch.sin, "cos": torch.cos, "torch.sqrt": lambda x: x.abs().sqrt(),
        "torch.sqrt float64": lambda x: x.double().abs().sqrt(),
        "pow 0.5": lambda x: x.abs().pow(0.5), "rsqrt": lambda x: (x.abs() + 1e-3).rsqrt(),
        "numerics.sqrt": lambda x: numerics.sqrt(x.abs()),
        "numerics.sqrt float64": lambda x: numerics.sqrt(x.double().abs()),
        "softmax": lambda x: x.view(-1, 41).softmax(1), "log_softmax": lambda x: x.view(-1, 41).log_softmax(1),
        "logsumexp": lambda x: x.view(-1, 41).logsumexp(1), "sum": torch.sum,
        "std": lambda x: x.view(-1, 41).std(1), "norm": lambda x: x.view(-1, 41).norm(dim=1),
        "matmul": lambda x: x.view(-1, 41)[:100] @ x.view(41, -1)[:, :100],
        "matmul float64": lambda x: x.double().view(-1, 41)[:100] @ x.double().view(41, -1)[:, :100],
        "conv1d": lambda x: F.conv1d(x[:1640].view(4, 10, 41), x[:90].view(3, 10, 3)),
        "conv2d": lambda x: F.conv2d(x[:1024].view(1, 16, 8, 8), x[:1152].view(8, 16, 3, 3), padding=1),
        "depthwise conv2d": lambda x: F.conv2d(x[:1024].view(1, 16, 8, 8), x[:144].view(16, 1, 3, 3),
                                               padding=1, groups=16),
        "batch_norm": lambda x: F.batch_norm(x[:1640].view(40, 41), None, None, training=True),
        "cross_entropy": lambda x: F.cross_entropy(x[:410].view(41, 10), torch.arange(41) % 10),
    }


def numpy_ops():
    import numpy as np

    return {
        "np.exp": lambda v: np.exp(np.clip(v, -30, 30)), "np.log": lambda v: np.log(np.abs(v) + 1e-3), "np.log1p": lambda v: np.log1p(np.abs(v)),
        "np.expm1": lambda v: np.expm1(np.clip(v, -30, 30)), "np.power": lambda v: np.power(np.abs(v), 0.37), "np.arctan": np.arctan,
        "np.tanh": np.tanh, "np.sin": np.sin, "np.sqrt": lambda v: np.sqrt(np.abs(v)), "np.sum": np.sum,
        "np.dot (BLAS)": lambda v: v[:4000].reshape(-1, 100) @ v[100:4100].reshape(100, -1),
        "np.linalg.svd": lambda v: np.linalg.svd(v[:400].reshape(20, 20))[1],
    }


def probe(config: bool = True) -> dict:
    import numpy as np
    import torch

    from refimpl import numerics

    if config:
        numerics.apply()
    out = {}
    g = torch.Generator().manual_seed(0)
    for scale in (1e-3, 1.0, 8.0):
        x = torch.randn(4100, generator=g) * scale
        for name, f in torch_ops().items():
            out[f"{name} (scale {scale})"] = _hash(f(x))
            if name in ("matmul", "conv2d", "torch.sqrt", "exp"):
                xr = x.clone().requires_grad_()
                y = f(xr)
                y.backward(torch.ones_like(y))
                out[f"{name} backward (scale {scale})"] = _hash(xr.grad)
        for dtype in (np.float32, np.float64):
            v = (x.double().numpy() * 3).astype(dtype)
            for name, f in numpy_ops().items():
                out[f"{name} {dtype.__name__} (scale {scale})"] = _hash(f(v))
    return out


def main(argv) -> int:
    if argv[:1] == ["--compare"] and len(argv) == 3:
        a, b = (json.load(open(p)) for p in argv[1:])
        diff = [k for k in a if a[k] != b.get(k)]
        print(f"{len(diff)} of {len(a)} results differ" + (":" if diff else ""))
        for k in diff:
            print("  " + k)
        return 1 if diff else 0
    json.dump(probe(config="--no-config" not in argv), sys.stdout, indent=0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

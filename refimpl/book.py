"""Set-up shared by the book's chapters: determinism, print formats, figure style."""

from __future__ import annotations

import random

import numpy as np
import torch


def setup(seed: int = 0) -> None:
    """Seed every generator, pin one thread and deterministic kernels, fix print formats.

    The book's stored outputs are compared with fresh ones under strict nbval: float32 results
    change with the thread count and SIMD level, so chapters call this first (the Makefile also
    pins OMP_NUM_THREADS, ATEN_CPU_CAPABILITY and MKL_CBWR for the kernel it starts).
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.set_printoptions(precision=4, sci_mode=False)
    np.set_printoptions(precision=4, suppress=True)
    import matplotlib

    matplotlib.rcParams.update({
        "figure.figsize": (7.0, 3.6), "figure.dpi": 100, "savefig.dpi": 100,
        "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
        "font.size": 10,
    })
    try:
        import sklearn

        sklearn.set_config(display="text")
    except ImportError:       # scikit-learn is a dependency; keep set-up usable without it
        pass

"""The chapters' support: ``setup()`` (determinism, print formats, figure style), called first by
every chapter; ``refimpl.book.plots`` (figures), ``refimpl.book.tables`` (Markdown tables, mean ±
std over seeds) and ``refimpl.book.toys`` (small dynamics chapter 2 plots)."""

from __future__ import annotations

import random
import warnings

import numpy as np
import torch

from .. import numerics

__all__ = ["setup"]


def setup(seed: int = 0) -> None:
    """Apply the numerics configuration, seed every generator, fix print formats and figure style.

    The book's stored outputs are compared with fresh ones under strict nbval, so chapters call
    this first: :func:`refimpl.numerics.apply` (oneDNN off, one thread, deterministic kernels).
    Its environment variables must be in place before the kernel starts (``make`` does it); on
    x86-64 a warning names what is not, since the stored numbers then need not reproduce.

    Used in :ref:`ch1-sec-introduction-and-taxonomy`, :ref:`ch2-sec-foundations`,
    :ref:`ch3-sec-range-setting`, :ref:`ch4-sec-integer-inference-on-arm-what`,
    :ref:`ch5-sec-white-paper-post-training`, :ref:`ch6-sec-white-paper-quantization-aware`,
    :ref:`ch8-sec-pwlq`, :ref:`ch7-sec-easyquant`, :ref:`ch9-sec-dsq`,
    :ref:`ch10-sec-log-pot-apot`, :ref:`ch11-sec-mqbench`, :ref:`ch12-sec-deployment`.
    """
    numerics.apply()
    if numerics.is_x86_64():
        problems = numerics.check()
        if problems:
            warnings.warn("this kernel does not run under the book's numerics configuration, so "
                          "its numbers may differ from the stored ones in the last digits (start "
                          "it through make, see the README): " + "; ".join(problems), stacklevel=2)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_printoptions(precision=4, sci_mode=False)
    np.set_printoptions(precision=4, suppress=True)
    import matplotlib

    matplotlib.rcParams.update({
        # 200 dpi: twice the pixels of the size a figure is shown at, crisp on high-DPI screens
        "figure.figsize": (7.0, 3.6), "figure.dpi": 200, "savefig.dpi": 200,
        "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
        "font.size": 10, "legend.fontsize": 9, "axes.titlesize": 10, "xtick.labelsize": 9,
        "ytick.labelsize": 9,
    })
    try:
        import sklearn

        sklearn.set_config(display="text")
    except ImportError:       # scikit-learn is a dependency; keep set-up usable without it
        pass

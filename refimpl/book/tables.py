"""Tables for the book's chapters: Markdown tables and "mean ± std" cells over seeds.

* ``markdown_table`` — a Markdown table string for ``IPython.display.Markdown`` (every chapter).
* ``mean_std``, ``format_mean_std`` — mean and sample standard deviation of results over seeds
  (chapters 5 and 6).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .._checks import check_int

__all__ = ["markdown_table", "mean_std", "format_mean_std"]


def _cell(value) -> str:
    """A table cell's text, with "|" escaped (GFM would read it as a column separator)."""
    return str(value).replace("|", "\\|")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence], formats: Sequence[str | None] | None = None) -> str:
    """A Markdown (GFM) table: ``headers``, then one line per row.

    formats: one format spec per column (e.g. ".2f", "d", or None for ``str``); numeric columns
    are right-aligned, text columns left-aligned. Non-numeric cells are always shown with ``str``.
    A "|" in a header or cell is escaped, so it cannot split the column.
    Returns the table as a string (display it with ``IPython.display.Markdown``).

    Used in :ref:`ch1-sec-why-quantize`, :ref:`ch2-sec-clipping`,
    :ref:`ch3-sec-why-the-range-matters-clipping`, :ref:`ch4-sec-registers-lanes-and`,
    :ref:`ch5-sec-white-paper-post-training`, :ref:`ch6-sec-the-straight-through-estimator`.
    """
    headers = [_cell(h) for h in headers]
    ncol = len(headers)
    if ncol == 0:
        raise ValueError("headers must not be empty")
    formats = list(formats) if formats is not None else [None] * ncol
    if len(formats) != ncol:
        raise ValueError(f"formats must have one entry per column ({ncol}), got {len(formats)}")
    rows = [list(row) for row in rows]
    lines_rows, numeric = [], [True] * ncol
    for r, row in enumerate(rows):
        if len(row) != ncol:
            raise ValueError(f"row {r} has {len(row)} cells, expected {ncol}")
        cells = []
        for j, (cell, fmt) in enumerate(zip(row, formats)):
            is_num = isinstance(cell, (int, float, np.integer, np.floating)) and not isinstance(cell, bool)
            numeric[j] &= is_num
            cells.append(_cell(format(cell, fmt) if (is_num and fmt) else cell))
        lines_rows.append("| " + " | ".join(cells) + " |")
    align = ["---:" if (numeric[j] and rows) else ":---" for j in range(ncol)]
    return "\n".join(["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |", *lines_rows])


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value) of numbers.

    Used in :ref:`ch5-sec-per-tensor-weights-and-the`, :ref:`ch6-sec-the-qat-pipeline`.
    """
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("values must not be empty")
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def format_mean_std(values, digits: int = 1) -> str:
    """"mean ± std" of numbers (e.g. accuracies over seeds), both to ``digits`` decimals.

    Used in :ref:`ch5-sec-white-paper-post-training`, :ref:`ch6-sec-the-qat-pipeline`.
    """
    digits = check_int(digits, "digits", 0, 6)
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"

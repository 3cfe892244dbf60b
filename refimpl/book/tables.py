"""Tables for the book's chapters: Markdown tables and "mean ± std" cells over seeds.

* ``markdown_table`` — a Markdown table string for ``IPython.display.Markdown`` (every chapter).
* ``mean_std``, ``format_mean_std`` — mean and sample standard deviation of results over seeds
  (chapters 5 and 6).
* ``check_claims`` — the prose's statements about a table, each computed from the table itself,
  so that a chapter whose numbers change under a statement fails on re-execution (every chapter).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .._checks import check_int

__all__ = ["markdown_table", "mean_std", "format_mean_std", "check_claims"]


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
    :ref:`ch5-sec-white-paper-post-training`, :ref:`ch6-sec-the-straight-through-estimator`,
    :ref:`ch8-sec-choosing-the-breakpoint`, :ref:`ch7-sec-accuracy-against-min-max-kl-and`,
    :ref:`ch9-sec-training-with-dsq`, :ref:`ch10-sec-the-grids`, :ref:`ch11-sec-six-backends-as-data`,
    :ref:`ch12-sec-one-convolution-three-ways`.
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

    Used in :ref:`ch5-sec-per-tensor-weights-and-the`, :ref:`ch6-sec-the-qat-pipeline`,
    :ref:`ch8-sec-post-training-quantization-with`, :ref:`ch7-sec-accuracy-against-min-max-kl-and`,
    :ref:`ch9-sec-training-with-dsq`, :ref:`ch10-sec-training-with-the-grids`, :ref:`ch11-sec-one-regime`.
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

    Used in :ref:`ch5-sec-white-paper-post-training`, :ref:`ch6-sec-the-qat-pipeline`,
    :ref:`ch8-sec-post-training-quantization-with`, :ref:`ch7-sec-accuracy-against-min-max-kl-and`,
    :ref:`ch9-sec-training-with-dsq`, :ref:`ch10-sec-training-with-the-grids`, :ref:`ch11-sec-one-regime`.
    """
    digits = check_int(digits, "digits", 0, 6)
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def check_claims(claims) -> None:
    """Raise ``AssertionError`` naming every statement of the prose that its table contradicts.

    claims: a mapping {statement, as the prose words it: truth value computed from the table's own
    numbers}, e.g. ``{"per-channel raises the SQNR of every layer at 4 bits": all(g > 0 for g in
    gains4)}``. A chapter calls this right after the table its prose describes; prose numbers come
    from ``glue``, and this covers the words between them ("every", "worse than", "never").
    Executing the chapter afresh (``make test``) then fails where a change of numbers made a
    sentence false, instead of leaving a page that contradicts its own table. Returns None, so a
    cell that ends with the call shows nothing.

    Used in :ref:`ch1-sec-uniform-and-non-uniform-grids`, :ref:`ch2-sec-rounding`,
    :ref:`ch3-sec-why-the-range-matters-clipping`, :ref:`ch4-sec-why-accumulators-overflow`,
    :ref:`ch5-sec-per-tensor-weights-and-the`, :ref:`ch6-sec-the-straight-through-estimator`,
    :ref:`ch8-sec-choosing-the-breakpoint`, :ref:`ch7-sec-the-scale-search`, :ref:`ch9-sec-training-with-dsq`,
    :ref:`ch10-sec-logquant`, :ref:`ch11-sec-one-regime`, :ref:`ch12-sec-one-convolution-three-ways`.
    """
    from collections.abc import Mapping

    if not isinstance(claims, Mapping) or not claims:
        raise ValueError("claims must be a non-empty mapping {statement: bool}")
    wrong = []
    for statement, holds in claims.items():
        if not isinstance(statement, str) or not statement.strip():
            raise ValueError(f"each claim's key must be the statement as a non-empty string, got {statement!r}")
        if not isinstance(holds, (bool, np.bool_)):
            raise TypeError(f"claim {statement!r} must map to a bool computed from the table, "
                            f"got {type(holds).__name__}")
        if not holds:
            wrong.append(statement)
    if wrong:
        raise AssertionError("the table no longer supports what the prose says: " + "; ".join(wrong))

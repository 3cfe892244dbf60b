"""Figures for the book's chapters (matplotlib; no computation beyond min/max).

* ``plot_grid_over_histogram`` — a histogram of values with one or more quantization grids drawn
  over it as vertical lines, each grid in its own horizontal band (chapters 1 and 3).
* ``plot_channel_ranges`` — the [min, max] range of a weight tensor per output channel, against the
  single range a per-tensor quantizer would use (chapters 2 and 5).
* ``plot_sensitivity`` — the debugging flow's per-layer accuracies (chapter 5).
* ``check_figure`` and ``glue_figure`` — the house style every chapter's figure is held to (text at
  least 8 pt, no legend over data), checked before the figure is glued into the book.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .._checks import check_float_tensor, check_int, normalize_axis

__all__ = ["plot_grid_over_histogram", "plot_channel_ranges", "plot_sensitivity", "check_figure",
           "glue_figure", "MIN_FONT_PT"]

#: The smallest text a figure may carry, in points (tick labels, legends, annotations).
MIN_FONT_PT = 8.0


def _to_numpy(t, name: str) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        check_float_tensor(t, name)
        return t.detach().double().cpu().numpy().reshape(-1)
    arr = np.asarray(t, dtype=np.float64).reshape(-1)
    if arr.size == 0 or not np.isfinite(arr).all():
        raise ValueError(f"{name} must be non-empty and finite")
    return arr


def plot_grid_over_histogram(ax, values, grids: Mapping[str, torch.Tensor], bins: int = 80, log: bool = False,
                             xlabel: str = "value", colors: Sequence[str] | None = None):
    """Histogram of ``values`` with the levels of each grid in ``grids`` drawn as vertical lines.

    ax: a matplotlib Axes.  values: tensor or array of any shape (flattened).
    grids: {legend label: 1-d tensor/array of the grid's levels}; grid i of n is drawn in the
    horizontal band [i/n, (i+1)/n] of the axes' height, so that grids sharing a level stay
    distinguishable.  log: log-scaled counts (for spiky data, e.g. post-ReLU zeros).
    Returns ax, with labelled axes ("count" on y) and a legend above the axes.

    Used in :ref:`ch1-sec-uniform-and-non-uniform-grids`.
    """
    check_int(bins, "bins", low=1)
    if not isinstance(grids, Mapping) or not grids:
        raise ValueError("grids must be a non-empty mapping {label: levels}")
    v = _to_numpy(values, "values")
    ax.hist(v, bins=bins, color="0.6", log=log, label=f"values ({v.size})")
    colors = list(colors) if colors is not None else [f"C{i}" for i in range(len(grids))]
    if len(colors) < len(grids):
        raise ValueError(f"need {len(grids)} colors, got {len(colors)}")
    n = len(grids)
    for i, (label, levels) in enumerate(grids.items()):
        lv = _to_numpy(levels, f"grids[{label!r}]")
        lo, hi = (n - 1 - i) / n, (n - i) / n      # first grid in the top band
        ax.vlines(lv, lo, hi, transform=ax.get_xaxis_transform(), colors=colors[i], linewidth=1.0,
                  label=f"{label} ({lv.size} levels)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count" + (" (log scale)" if log else ""))
    # above the axes: inside, it would hide the grid lines of the top band
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=n + 1, frameon=False)
    return ax


def plot_channel_ranges(ax, weight: torch.Tensor, axis: int = 0, title: str | None = None,
                        ylabel: str = "weight value"):
    """Per-channel [min, max] of ``weight`` along ``axis`` as vertical bars, with the per-tensor range.

    The per-tensor range of a symmetric quantizer, [-max|W|, max|W|], is drawn as dashed lines: a
    channel whose bar is much shorter than that range uses only a few of the per-tensor grid's
    codes, which is what per-channel quantization fixes (white paper, Nagel et al. 2021, §2.4).
    weight: floating tensor with at least one dimension. Returns ax.

    Used in :ref:`ch2-sec-per-tensor-and-per-channel`, :ref:`ch5-sec-per-tensor-weights-and-the`.
    """
    check_float_tensor(weight, "weight")
    if weight.ndim == 0:
        raise ValueError("weight must have at least one dimension")
    axis = normalize_axis(axis, weight.ndim, "axis")
    rows = weight.detach().double().movedim(axis, 0).reshape(weight.shape[axis], -1)
    lo, hi = rows.amin(1).cpu().numpy(), rows.amax(1).cpu().numpy()
    peak = float(rows.abs().max())
    ch = np.arange(len(lo))
    ax.vlines(ch, lo, hi, colors="C0", linewidth=3, label="per-channel [min, max]")
    ax.axhline(peak, color="C3", linestyle="--", linewidth=1, label="per-tensor ±max|W|")
    ax.axhline(-peak, color="C3", linestyle="--", linewidth=1)
    ax.set_xlabel("output channel" if axis == 0 else f"index along axis {axis}")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def plot_sensitivity(ax, report: Mapping, title: str | None = None):
    """The debugging flow's per-layer picture: accuracy with one quantizer on at a time.

    report: from :func:`refimpl.ptq.quantization_sensitivity` (keys "fp32", "full",
    "layers", "sites"). Bars: accuracy (%) with only that layer's weights quantized (blue) or
    only that activation site quantized (orange); dashed lines: FP32 and everything quantized.
    Returns ax.

    Used in :ref:`ch5-sec-the-results-table`.
    """
    for key in ("fp32", "full", "layers", "sites"):
        if key not in report:
            raise ValueError(f"report must come from quantization_sensitivity(per_layer=True); missing {key!r}")
    names = list(dict.fromkeys(list(report["layers"]) + list(report["sites"])))
    x = np.arange(len(names))
    w = [report["layers"].get(n, np.nan) for n in names]
    a = [report["sites"].get(n, np.nan) for n in names]
    ax.bar(x - 0.2, w, 0.4, label="only this layer's weights", color="C0")
    ax.bar(x + 0.2, a, 0.4, label="only this activation site", color="C1")
    ax.axhline(report["fp32"], color="k", linestyle="--", linewidth=1, label="FP32")
    ax.axhline(report["full"], color="C3", linestyle=":", linewidth=1.2, label="all quantized")
    ax.set_xticks(x, names, rotation=90, fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    lo = min(v for v in w + a + [report["full"]] if not np.isnan(v))
    ax.set_ylim(max(0.0, lo - 5), 100.5)
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def _data_paths(ax):
    """The display-space paths of what ``ax`` plots: lines, patches (bars), collections."""
    for line in ax.get_lines():
        if line.get_visible() and len(line.get_xydata()):
            yield "line", line.get_label(), line.get_transform().transform_path(line.get_path())
    for patch in ax.patches:
        if patch.get_visible():
            yield "patch", patch.get_label(), patch.get_transform().transform_path(patch.get_path())
    for coll in ax.collections:
        if not coll.get_visible():
            continue
        offsets = coll.get_offsets()
        if len(offsets) and coll.get_offset_transform() is not None and len(coll.get_paths()) <= 1:
            pts = coll.get_offset_transform().transform(offsets)     # scatter: one marker, many offsets
            yield "points", coll.get_label(), pts
        else:
            for path in coll.get_paths():
                yield "collection", coll.get_label(), coll.get_transform().transform_path(path)


def check_figure(fig) -> None:
    """Raise ``ValueError`` if ``fig`` breaks the book's figure style; return None if it keeps it.

    The style (README, "House style of a chapter"): every visible text (tick labels, axis labels,
    titles, legends, annotations) is at least :data:`MIN_FONT_PT` points, and no legend drawn
    inside an axes covers a plotted line, bar, point or filled area of that axes (a legend placed
    outside the axes, e.g. above it, is never in the way). fig: a matplotlib Figure; it is drawn
    once so that tick labels and legend positions are final. Used by :func:`glue_figure`, hence by
    every figure of the book.
    """
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    if not isinstance(fig, Figure):
        raise TypeError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
    fig.canvas.draw()
    problems = []
    for text in fig.findobj(Text):
        if text.get_visible() and text.get_text().strip() and text.get_fontsize() < MIN_FONT_PT:
            problems.append(f"text {text.get_text()[:40]!r} is {text.get_fontsize():g} pt "
                            f"(at least {MIN_FONT_PT:g})")
    renderer = fig.canvas.get_renderer()
    for i, ax in enumerate(fig.axes):
        legend = ax.get_legend()
        if legend is None or not legend.get_visible():
            continue
        box = legend.get_window_extent(renderer)
        if not box.overlaps(ax.get_window_extent(renderer)):
            continue
        for kind, label, geom in _data_paths(ax):
            if kind == "points":
                hit = bool(((geom[:, 0] >= box.x0) & (geom[:, 0] <= box.x1)
                            & (geom[:, 1] >= box.y0) & (geom[:, 1] <= box.y1)).any())
            else:
                hit = geom.intersects_bbox(box, filled=(kind != "line"))
            if hit:
                problems.append(f"the legend of axes {i} ({ax.get_title() or ax.get_ylabel()!s}) "
                                f"covers the {kind} {label!r}")
                break
    if problems:
        raise ValueError("figure breaks the book's style: " + "; ".join(problems))


def glue_figure(name: str, fig) -> None:
    """Check ``fig`` (:func:`check_figure`), glue it under ``name`` for a glued-figure block, close it.

    The one way a chapter hands a figure to the book: the figure is shown where the prose places
    it, numbered and captioned, never as a stray cell output. name: the glue key, by convention
    the figure's label ("ch5-fig-cle"). Needs myst-nb (the ``book`` extra).

    Used in :ref:`ch1-sec-uniform-and-non-uniform-grids`, :ref:`ch2-sec-rounding`,
    :ref:`ch3-sec-why-the-range-matters-clipping`, :ref:`ch4-sec-what-a-bit-costs-cycles-per`,
    :ref:`ch5-sec-per-tensor-weights-and-the`, :ref:`ch6-sec-the-qat-pipeline`,
    :ref:`ch8-sec-the-piecewise-grid`, :ref:`ch7-sec-the-scale-search`, :ref:`ch9-sec-the-soft-staircase`,
    :ref:`ch10-sec-the-grids`, :ref:`ch11-sec-the-algorithms`, :ref:`ch12-sec-the-whole-model`.
    """
    import matplotlib.pyplot as plt
    from myst_nb import glue

    if not isinstance(name, str) or not name:
        raise ValueError("name must be a non-empty string (the glue key)")
    check_figure(fig)
    glue(name, fig, display=False)
    plt.close(fig)

"""refimpl.plots: what each helper draws, checked on the artists it returns (Agg backend)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402

from refimpl.plots import markdown_table, plot_channel_ranges, plot_grid_over_histogram  # noqa: E402


def test_grid_over_histogram_draws_each_grid_in_its_band():
    fig, ax = plt.subplots()
    x = torch.linspace(-1, 1, 101)
    grids = {"a": torch.tensor([-1.0, 0.0, 1.0]), "b": np.array([-0.5, 0.5])}
    plot_grid_over_histogram(ax, x, grids, bins=10)
    lines = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert len(lines) == 2
    xs = [sorted(seg[0][0] for seg in c.get_segments()) for c in lines]
    assert xs == [[-1.0, 0.0, 1.0], [-0.5, 0.5]]
    bands = [(c.get_segments()[0][0][1], c.get_segments()[0][1][1]) for c in lines]
    assert bands == [(0.5, 1.0), (0.0, 0.5)]
    assert int(sum(p.get_height() for p in ax.patches)) == 101
    assert ax.get_ylabel() == "count" and ax.get_legend() is not None
    plt.close(fig)


def test_grid_over_histogram_errors():
    fig, ax = plt.subplots()
    with pytest.raises(ValueError, match="non-empty mapping"):
        plot_grid_over_histogram(ax, torch.ones(3), {})
    with pytest.raises(ValueError, match="colors"):
        plot_grid_over_histogram(ax, torch.ones(3), {"a": [0.0], "b": [1.0]}, colors=["r"])
    plt.close(fig)


def test_channel_ranges_are_the_per_channel_min_and_max():
    fig, ax = plt.subplots()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, 2, 2, generator=g) * torch.arange(1, 6).reshape(5, 1, 1, 1)
    plot_channel_ranges(ax, w, title="conv")
    (bars,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    segs = np.array(bars.get_segments())          # (channels, 2 points, xy)
    flat = w.double().reshape(5, -1).numpy()
    assert np.allclose(segs[:, 0, 1], flat.min(1)) and np.allclose(segs[:, 1, 1], flat.max(1))
    peaks = sorted(line.get_ydata()[0] for line in ax.lines)
    assert np.allclose(peaks, [-np.abs(flat).max(), np.abs(flat).max()])
    assert ax.get_xlabel() == "output channel" and ax.get_title() == "conv"
    plt.close(fig)


def test_markdown_table():
    t = markdown_table(["layer", "bits", "SQNR (dB)"], [["stem", 8, 42.123], ["head", 4, 17.5]],
                       [None, "d", ".2f"])
    assert t == ("| layer | bits | SQNR (dB) |\n| :--- | ---: | ---: |\n"
                 "| stem | 8 | 42.12 |\n| head | 4 | 17.50 |")
    mixed = markdown_table(["a"], [[1.5], ["n/a"]], [".1f"])
    assert mixed.splitlines()[1] == "| :--- |" and mixed.splitlines()[2] == "| 1.5 |"
    piped = markdown_table(["|x|"], [["a|b"]])
    assert piped.splitlines()[0] == "| \\|x\\| |" and piped.splitlines()[2] == "| a\\|b |"
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        markdown_table(["a", "b"], [[1]])
    with pytest.raises(ValueError, match="one entry per column"):
        markdown_table(["a", "b"], [[1, 2]], [".1f"])


def test_plot_sensitivity_draws_both_kinds_of_bars():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from refimpl.plots import plot_sensitivity
    rep = {"fp32": 99.0, "full": 90.0, "layers": {"a": 95.0, "b": 98.0}, "sites": {"input": 97.0, "a": 93.0}}
    fig, ax = plt.subplots()
    plot_sensitivity(ax, rep)
    heights = sorted(round(p.get_height(), 3) for p in ax.patches if not np.isnan(p.get_height()))
    assert heights == [93.0, 95.0, 97.0, 98.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "input"]
    plt.close(fig)
    with pytest.raises(ValueError, match="missing"):
        plot_sensitivity(ax, {"fp32": 1.0})

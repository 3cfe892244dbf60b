"""refimpl.book: what each plotting helper draws, checked on the artists it returns (Agg backend);
Markdown tables; the toy dynamics of chapter 2 against NumPy recurrences."""

import math
import statistics

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402

from refimpl.book.plots import plot_channel_ranges, plot_grid_over_histogram, plot_sensitivity  # noqa: E402
from refimpl.book.tables import format_mean_std, markdown_table, mean_std  # noqa: E402
from refimpl.book.toys import accumulate_updates, ste_gradient_descent  # noqa: E402
from refimpl.quant import QuantSpec  # noqa: E402


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

    rep = {"fp32": 99.0, "full": 90.0, "layers": {"a": 95.0, "b": 98.0}, "sites": {"input": 97.0, "a": 93.0}}
    fig, ax = plt.subplots()
    plot_sensitivity(ax, rep)
    heights = sorted(round(p.get_height(), 3) for p in ax.patches if not np.isnan(p.get_height()))
    assert heights == [93.0, 95.0, 97.0, 98.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "input"]
    plt.close(fig)
    with pytest.raises(ValueError, match="missing"):
        plot_sensitivity(ax, {"fp32": 1.0})


def test_accumulate_updates_nearest_stalls_stochastic_follows_in_expectation():
    spec, s = QuantSpec(16), 1.0 / 64
    x0 = torch.zeros(2000, dtype=torch.float64)
    near = accumulate_updates(x0, 0.3 * s, 100, s, spec)
    assert near.shape == (101, 2000) and torch.equal(near, torch.zeros_like(near))
    up = accumulate_updates(x0[:3], 0.7 * s, 10, s, spec)      # above s/2: one code per step
    assert torch.allclose(up[-1], torch.full((3,), 10 * s, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    sto = accumulate_updates(x0, 0.3 * s, 100, s, spec, "stochastic", g)
    final = sto[-1].numpy()
    se = final.std(ddof=1) / math.sqrt(final.size)
    assert abs(final.mean() - 100 * 0.3 * s) < 4 * se
    assert np.all(np.abs(np.round(final / s) - final / s) == 0)        # always on the grid

def test_ste_gradient_descent_equals_numpy_recurrence_and_oscillates():
    spec, s, t, lr = QuantSpec(8), 0.5, 0.3 * 0.5, 0.2
    latent, quantized = ste_gradient_descent(0.45, t, s, spec, lr, 200)
    w, ws, qs = 0.45, [], []
    for _ in range(201):
        q = s * np.clip(np.round(w / s), spec.qmin, spec.qmax)     # np.round: half to even
        ws.append(w)
        qs.append(q)
        w = w - lr * (q - t)
    assert np.allclose(latent.numpy(), ws, rtol=0, atol=1e-12)
    assert np.array_equal(quantized.numpy(), np.array(qs))
    tail = quantized[50:]
    assert set(tail.tolist()) == {0.0, 0.5}                          # flips between the neighbours
    assert float(latent[50:].min()) < s / 2 < float(latent[50:].max())
    with pytest.raises(ValueError, match="lr"):
        ste_gradient_descent(0.0, 0.1, s, spec, -1.0, 3)


def test_mean_std_and_format():
    vals = [97.1, 98.2, 97.3]
    m, s = mean_std(vals)
    assert m == pytest.approx(statistics.mean(vals)) and s == pytest.approx(statistics.stdev(vals))
    assert mean_std([5]) == (5.0, 0.0)
    assert format_mean_std(vals) == f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}"
    with pytest.raises(ValueError, match="empty"):
        mean_std([])


def test_check_figure_flags_small_text_and_a_legend_over_data():
    from refimpl.book.plots import check_figure

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1], [0, 1], label="diagonal")
    ax.set_xlabel("x (units)")
    check_figure(fig)                                     # no legend, 10 pt text: fine
    ax.legend(loc="center")                               # sits on the diagonal
    with pytest.raises(ValueError, match="covers the line 'diagonal'"):
        check_figure(fig)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0))   # above the axes
    check_figure(fig)
    ax.set_ylabel("tiny", fontsize=6)
    with pytest.raises(ValueError, match="'tiny' is 6 pt"):
        check_figure(fig)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar([0, 1, 2], [5, 5, 5], label="bars")
    ax.set_ylim(0, 10)
    ax.legend(loc="upper right")                          # above the bars: fine
    check_figure(fig)
    ax.legend(loc="lower left")                           # on the bars
    with pytest.raises(ValueError, match="covers the patch"):
        check_figure(fig)
    plt.close(fig)
    with pytest.raises(TypeError, match="fig must be a matplotlib Figure"):
        check_figure(ax)


def test_check_claims():
    from refimpl.book.tables import check_claims

    gains = [0.5, 1.2, -0.18]
    assert check_claims({"some layer gains": any(g > 0 for g in gains)}) is None
    with pytest.raises(AssertionError, match="raises every layer"):
        check_claims({"per-channel raises every layer's SQNR": all(g > 0 for g in gains),
                      "some layer gains": any(g > 0 for g in gains)})
    with pytest.raises(TypeError, match="must map to a bool"):
        check_claims({"a number is not a truth value": 1.0})
    with pytest.raises(ValueError, match="non-empty mapping"):
        check_claims({})

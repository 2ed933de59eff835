"""Figures of the study, as matplotlib Figure objects.

Built without pyplot, so nothing depends on a backend: notebooks display the returned
figure inline, the CLI saves it with ``save_figure``.
"""

import math

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from .files import atomic_path
from .images import open_image


def save_figure(fig: Figure, path, dpi=110):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


def _panels(n, columns, width=3.4, height=2.8):
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    fig = Figure(figsize=(width * columns, height * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def plot_history(history) -> Figure:
    """Train/val loss and val cosine per epoch, the chosen epoch marked."""
    fig, (loss_ax, cos_ax) = _panels(2, 2, width=5, height=3.6)
    loss_ax.plot(history["epoch"], history["train_loss"], label="train")
    loss_ax.plot(history["epoch"], history["val_loss"], label="validation")
    loss_ax.set(xlabel="epoch", ylabel="loss (1 − cosine)", title="Loss")
    loss_ax.legend()
    cos_ax.plot(history["epoch"], history["val_cosine"], color="tab:green")
    best = history[history["best"]]
    cos_ax.scatter(best["epoch"], best["val_cosine"], color="black", zorder=3,
                   label=f"kept: epoch {int(best['epoch'].iloc[0])}")
    cos_ax.set(xlabel="epoch", ylabel="cosine", title="Validation cosine")
    cos_ax.legend()
    return fig


def plot_decoder_history(history) -> Figure:
    """The decoder's train/val cross-entropy per epoch and, when recorded, the validation
    cosine of its generated prompts; the kept epoch marked."""
    with_cosine = "val_cosine" in history
    fig, axes = _panels(2 if with_cosine else 1, 2, width=5, height=3.6)
    best = history[history["best"]]
    label = f"kept: epoch {int(best['epoch'].iloc[0])}"
    axes[0].plot(history["epoch"], history["train_loss"], label="train")
    axes[0].plot(history["epoch"], history["val_loss"], label="validation")
    axes[0].scatter(best["epoch"], best["val_loss"], color="black", zorder=3, label=label)
    axes[0].set(xlabel="epoch", ylabel="cross-entropy per token", title="Decoder loss", yscale="log")
    axes[0].legend()
    if with_cosine:
        axes[1].plot(history["epoch"], history["val_cosine"], color="tab:green")
        axes[1].scatter(best["epoch"], best["val_cosine"], color="black", zorder=3, label=label)
        axes[1].set(xlabel="epoch", ylabel="cosine", title="Validation cosine of generated prompts")
        axes[1].legend()
    return fig


def bar_panels(counts: dict, columns=4, horizontal=False) -> Figure:
    """One bar chart per ``{title: pandas Series of counts}``."""
    fig, axes = _panels(len(counts), columns, height=3.2 if horizontal else 2.8)
    for ax, (title, series) in zip(axes, counts.items()):
        labels = [str(label) for label in series.index]
        if horizontal:
            ax.barh(labels[::-1], series.values[::-1], color="tab:blue")
        else:
            ax.bar(labels, series.values, color="tab:blue")
            ax.tick_params(axis="x", labelrotation=60 if len(labels) > 3 else 0, labelsize=8)
        ax.set_title(title)
    return fig


def histogram_panels(values: dict, bins=30, columns=4, xlabel=None) -> Figure:
    """One histogram per ``{title: values}``, with the mean marked."""
    fig, axes = _panels(len(values), columns)
    for ax, (title, data) in zip(axes, values.items()):
        data = np.asarray(data, dtype=float)
        ax.hist(data, bins=bins, color="tab:blue", alpha=0.8)
        ax.axvline(data.mean(), color="black", linestyle="--", label=f"mean {data.mean():.3f}")
        ax.set(title=title, xlabel=xlabel)
        ax.legend(fontsize=8)
    return fig


def overlaid_histograms(values: dict, bins=40, xlabel="cosine") -> Figure:
    """The distributions of ``{label: values}`` on one axis (e.g. per-image cosine per method)."""
    fig = Figure(figsize=(8, 3.6), layout="constrained")
    ax = fig.subplots()
    edges = np.histogram_bin_edges(np.concatenate([np.asarray(v, float) for v in values.values()]), bins)
    for label, data in values.items():
        ax.hist(data, bins=edges, histtype="step", linewidth=1.8, label=f"{label} (mean {np.mean(data):.3f})")
    ax.set(xlabel=xlabel, ylabel="images")
    ax.legend(fontsize=8)
    return fig


def image_grid(paths, captions, columns=4, wrap=38) -> Figure:
    """Images with their captions (long captions wrapped)."""
    fig, axes = _panels(len(paths), columns, width=3.2, height=3.9)
    for ax, path, caption in zip(axes, paths, captions):
        ax.imshow(open_image(path))
        ax.set_axis_off()
        ax.set_title(_wrap(caption, wrap), fontsize=7.5)
    return fig


def _wrap(text, width):
    """Word-wrap each line of ``text`` to ``width`` characters."""
    wrapped = []
    for paragraph in str(text).splitlines():
        line = ""
        for word in paragraph.split():
            if line and len(line) + 1 + len(word) > width:
                wrapped.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        wrapped.append(line)
    return "\n".join(wrapped)


def scatter_panels(points: dict, labels, title_suffix="") -> Figure:
    """2-D points per ``{title: (n, 2) array}``, coloured by the category in ``labels``."""
    labels = np.asarray(labels, dtype=object)
    categories = sorted(set(labels), key=str)
    palette = colormaps["tab10" if len(categories) <= 10 else "tab20"]
    colors = [palette(i % 20) for i in range(len(categories))]
    fig, axes = _panels(len(points), len(points), width=5, height=4.2)
    for ax, (title, xy) in zip(axes, points.items()):
        for category, color in zip(categories, colors):
            mask = labels == category
            ax.scatter(xy[mask, 0], xy[mask, 1], s=8, color=color, label=str(category), alpha=0.8)
        ax.set(title=f"{title}{title_suffix}", xticks=[], yticks=[])
    axes[-1].legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1, 0.5))
    return fig


def similarity_heatmap(matrix, row_labels, column_labels, title) -> Figure:
    """A similarity matrix with its values written in the cells."""
    n_rows, n_cols = matrix.shape
    fig = Figure(figsize=(1.2 + 0.75 * n_cols, 1 + 0.45 * n_rows), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="viridis")
    for (row, col), value in np.ndenumerate(matrix):
        ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                color="white" if value < matrix.mean() else "black")
    ax.set_xticks(range(n_cols), column_labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n_rows), [_wrap(label, 60) for label in row_labels], fontsize=7)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def grouped_means(frame, by_columns, value, ylabel="mean cosine") -> Figure:
    """Mean of ``value`` (with a 95% normal interval and the group size) per value of each
    column in ``by_columns``; one panel per column."""
    fig, axes = _panels(len(by_columns), len(by_columns), width=4.4)
    for ax, column in zip(axes, by_columns):
        stats = frame.groupby(column, observed=True)[value].agg(["mean", "std", "count"])
        half = 1.96 * stats["std"].fillna(0) / np.sqrt(stats["count"])
        positions = range(len(stats))
        ax.bar(positions, stats["mean"], yerr=half, color="tab:blue", capsize=3)
        ax.set_xticks(positions, [f"{k}\n(n={n})" for k, n in zip(stats.index, stats["count"])],
                      fontsize=8)
        low = float((stats["mean"] - half).min())
        ax.set(xlabel=column, ylabel=ylabel, ylim=(max(0.0, low - 0.05), 1.0))
    return fig

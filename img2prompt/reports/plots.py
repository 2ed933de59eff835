"""Figures of the study, drawn with seaborn on matplotlib Figure objects.

Built without pyplot's figure manager, so nothing depends on a backend: notebooks display
the returned figure inline, the run saves it with ``save_figure``. The same style
(seaborn's whitegrid) everywhere.
"""

import math

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from img2prompt.data.images import open_image
from img2prompt.errors import DataError
from img2prompt.storage.files import atomic_path

STYLE = "whitegrid"


def save_figure(fig: Figure, path, dpi=110):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


def _panels(n, columns, width=3.4, height=2.8, style=STYLE):
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    with sns.axes_style(style):
        fig = Figure(figsize=(width * columns, height * rows), layout="constrained")
        axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _curves(ax, history, columns, title, ylabel, mark=None):
    """Curves of ``columns`` of a history table against the epoch, the kept epoch marked."""
    long = history.melt(id_vars="epoch", value_vars=list(columns), var_name="", value_name=ylabel)
    long[""] = long[""].map(columns)
    sns.lineplot(data=long, x="epoch", y=ylabel, hue="", ax=ax)
    if mark:
        best = history[history["best"]]
        ax.scatter(best["epoch"], best[mark], color="black", zorder=3,
                   label=f"kept: epoch {int(best['epoch'].iloc[0])}")
    ax.set_title(title)
    ax.legend()


def plot_history(history) -> Figure:
    """Train/val loss and val cosine per epoch, the chosen epoch marked."""
    fig, (loss_ax, cos_ax) = _panels(2, 2, width=5, height=3.6)
    _curves(loss_ax, history, {"train_loss": "train", "val_loss": "validation"}, "Loss",
            "loss (1 − cosine)")
    _curves(cos_ax, history, {"val_cosine": "validation"}, "Validation cosine", "cosine", mark="val_cosine")
    return fig


def plot_tune_history(history, frozen=None) -> Figure:
    """Fine-tuning: training loss and validation cosine per epoch (epoch 0: the mapper on
    frozen features), the kept epoch marked; ``frozen`` (the mapper's own history) adds
    its validation cosine, epoch by epoch, for the side-by-side view."""
    fig, (loss_ax, cos_ax) = _panels(2, 2, width=5, height=3.6)
    _curves(loss_ax, history.dropna(subset=["train_loss"]), {"train_loss": "train"},
            "Fine-tuning loss", "loss (1 − cosine)")
    _curves(cos_ax, history, {"val_cosine": "fine-tuned (validation)"}, "Validation cosine", "cosine",
            mark="val_cosine")
    if frozen is not None:
        cos_ax.axhline(frozen.loc[frozen["best"], "val_cosine"].iloc[0], color="gray", linestyle="--",
                       label="frozen features (kept epoch)")
        cos_ax.legend()
    return fig


def plot_decoder_history(history) -> Figure:
    """The decoder's train/val cross-entropy per epoch and, when recorded, the validation
    cosine of its generated prompts; the kept epoch marked."""
    with_cosine = "val_cosine" in history
    fig, axes = _panels(2 if with_cosine else 1, 2, width=5, height=3.6)
    _curves(axes[0], history, {"train_loss": "train", "val_loss": "validation"}, "Decoder loss",
            "cross-entropy per token", mark="val_loss")
    axes[0].set_yscale("log")
    if with_cosine:
        _curves(axes[1], history, {"val_cosine": "validation"}, "Validation cosine of generated prompts",
                "cosine", mark="val_cosine")
    return fig


def bar_panels(counts: dict, columns=4, horizontal=False) -> Figure:
    """One bar chart per ``{title: pandas Series of counts}``."""
    fig, axes = _panels(len(counts), columns, height=3.2 if horizontal else 2.8)
    for ax, (title, series) in zip(axes, counts.items()):
        labels = [str(label) for label in series.index]
        if horizontal:
            sns.barplot(x=series.values, y=labels, color="tab:blue", orient="h", ax=ax)
        else:
            sns.barplot(x=labels, y=series.values, color="tab:blue", ax=ax)
            ax.tick_params(axis="x", labelrotation=60 if len(labels) > 3 else 0, labelsize=8)
        ax.set_title(title)
    return fig


def histogram_panels(values: dict, bins=30, columns=4, xlabel=None) -> Figure:
    """One histogram per ``{title: values}``, with the mean marked."""
    fig, axes = _panels(len(values), columns)
    for ax, (title, data) in zip(axes, values.items()):
        data = np.asarray(data, dtype=float)
        sns.histplot(data, bins=bins, color="tab:blue", ax=ax)
        ax.axvline(data.mean(), color="black", linestyle="--", label=f"mean {data.mean():.3f}")
        ax.set(title=title, xlabel=xlabel)
        ax.legend(fontsize=8)
    return fig


def overlaid_histograms(values: dict, bins=40, xlabel="cosine") -> Figure:
    """The distributions of ``{label: values}`` on one axis (e.g. per-image cosine per method)."""
    fig, (ax,) = _panels(1, 1, width=8, height=3.6)
    long = pd.DataFrame([(f"{label} (mean {np.mean(data):.3f})", value)
                         for label, data in values.items() for value in data], columns=["", xlabel])
    sns.histplot(data=long, x=xlabel, hue="", bins=bins, element="step", fill=False, linewidth=1.8, ax=ax)
    ax.set_ylabel("images")
    return fig


def image_grid(paths, captions, columns=4, wrap=38) -> Figure:
    """Images with their captions (long captions wrapped); an image that does not decode
    (found later, while it is embedded) gets its panel with the reason instead."""
    fig, axes = _panels(len(paths), columns, width=3.2, height=3.9, style="white")
    for ax, path, caption in zip(axes, paths, captions):
        try:
            ax.imshow(open_image(path))
        except DataError as error:
            ax.text(0.5, 0.5, _wrap(f"unreadable image: {error}", wrap), ha="center", va="center",
                    fontsize=7, transform=ax.transAxes)
        ax.set_axis_off()
        ax.set_title(_wrap(caption, wrap), fontsize=7.5)
    return fig


def example_grid(paths, truths, predictions, scores, label="PREDICTED", score_label="cosine",
                 columns=3) -> Figure:
    """Test images with their true prompt, a method's prompt and its score."""
    return image_grid(paths, [f"TRUE: {t}\n{label}: {p}\n({score_label} {s:.3f})"
                              for t, p, s in zip(truths, predictions, scores)], columns=columns, wrap=44)


def word_attention(path, words, shares, columns=6) -> Figure:
    """Where each written word looked: the image's centre square (what the encoder reads)
    under each word, with the share of the word's attention each grid cell got drawn over
    it (``PromptDecoder.cell_attention``)."""
    image = open_image(path)
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    fig, axes = _panels(len(words), columns, width=2.0, height=2.25, style="white")
    for ax, word, cells in zip(axes, words, shares):
        ax.imshow(square)
        ax.imshow(cells, extent=(0, side, side, 0), cmap="magma", alpha=0.55, interpolation="nearest",
                  vmin=0, vmax=max(float(cells.max()), 1e-6))
        ax.set_axis_off()
        ax.set_title(word, fontsize=10)
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
    labels = [str(label) for label in labels]
    order = sorted(set(labels))
    palette = "tab10" if len(order) <= 10 else "tab20"
    fig, axes = _panels(len(points), len(points), width=5, height=4.2)
    for index, (ax, (title, xy)) in enumerate(zip(axes, points.items())):
        sns.scatterplot(x=xy[:, 0], y=xy[:, 1], hue=labels, hue_order=order, palette=palette, s=10,
                        alpha=0.8, linewidth=0, legend=index == len(points) - 1, ax=ax)
        ax.set(title=f"{title}{title_suffix}", xticks=[], yticks=[])
    legend = axes[-1].get_legend()
    if legend:
        sns.move_legend(axes[-1], "center left", bbox_to_anchor=(1, 0.5), fontsize=7, markerscale=2)
    return fig


def similarity_heatmap(matrix, row_labels, column_labels, title) -> Figure:
    """A similarity matrix with its values written in the cells."""
    n_rows, n_cols = matrix.shape
    fig, (ax,) = _panels(1, 1, width=1.6 + 0.75 * n_cols, height=1 + 0.45 * n_rows, style="white")
    sns.heatmap(matrix, annot=True, fmt=".2f", annot_kws={"fontsize": 7}, cmap="viridis", ax=ax,
                xticklabels=column_labels, yticklabels=[_wrap(label, 60) for label in row_labels],
                cbar_kws={"shrink": 0.8})
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    ax.tick_params(axis="y", labelrotation=0, labelsize=7)
    ax.set_title(title)
    return fig


def accuracy_heatmap(accuracy: pd.DataFrame, title="attribute named right") -> Figure:
    """Share of test images whose prompt states the true value, per attribute family (rows)
    and method (columns)."""
    fig, (ax,) = _panels(1, 1, width=1.8 + 1.1 * accuracy.shape[1], height=0.9 + 0.32 * accuracy.shape[0],
                         style="white")
    sns.heatmap(accuracy, annot=True, fmt=".0%", vmin=0, vmax=1, cmap="RdYlGn", ax=ax,
                cbar_kws={"format": "{x:.0%}"})
    ax.set_title(title)
    return fig


def grouped_means(frame, by_columns, value, ylabel="mean cosine") -> Figure:
    """Mean of ``value`` with its 95% interval (seeded bootstrap) per value of each column in
    ``by_columns``, the group sizes under the bars; one panel per column."""
    fig, axes = _panels(len(by_columns), len(by_columns), width=4.4)
    for ax, column in zip(axes, by_columns):
        counts = frame.groupby(column, observed=True)[value].count()
        sns.barplot(data=frame, x=column, y=value, order=list(counts.index), errorbar=("ci", 95),
                    seed=0, color="tab:blue", capsize=0.2, ax=ax)
        ax.set_xticks(range(len(counts)), [f"{k}\n(n={n})" for k, n in counts.items()], fontsize=8)
        low = float(frame.groupby(column, observed=True)[value].mean().min())
        ax.set(xlabel=column, ylabel=ylabel, ylim=(max(0.0, low - 0.1), 1.0))
    return fig

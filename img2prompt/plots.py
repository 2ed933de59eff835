"""Figures saved to the run dir."""

import matplotlib

matplotlib.use("Agg")  # files only; notebooks pick their own backend
import matplotlib.pyplot as plt  # noqa: E402

from .files import atomic_path  # noqa: E402


def plot_history(history, path):
    """Train/val loss and val cosine per epoch, the chosen epoch marked."""
    fig, (loss_ax, cos_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
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
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

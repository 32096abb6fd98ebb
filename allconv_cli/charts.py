"""PNG charts (matplotlib, Agg): learning curves, confusion matrices, ablation bars.

Each chart is written through ``atomic_write``, so a kill never leaves half a PNG.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import numpy as np
from matplotlib.ticker import MaxNLocator

from allconv_cli.util import atomic_write


def _save(fig, path: Path) -> Path:
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)


def learning_curves(history: list[dict], path: str | Path, title: str) -> Path:
    """Loss (left) and error % (right) per epoch: training, and whichever eval split was used,
    under ``title``, which names the run."""
    epochs = [m["epoch"] for m in history]
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax_loss.plot(epochs, [m["train_loss"] for m in history], ".-", label="train")  # a dot: one epoch shows
    ax_err.plot(epochs, [100 - m["train_accuracy"] for m in history], ".-", label="train")
    for split in ("val", "test"):
        points = [(m["epoch"], m) for m in history if f"{split}_loss" in m]
        if points:
            ax_loss.plot([e for e, _ in points], [m[f"{split}_loss"] for _, m in points], "o-", label=split)
            ax_err.plot([e for e, _ in points], [m[f"{split}_top1_error"] for _, m in points], "o-", label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_err.set(xlabel="epoch", ylabel="top-1 error %", title="error")
    for ax in (ax_loss, ax_err):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # epochs are whole: no tick at 1.5
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return _save(fig, Path(path))


def confusion_matrix(confusion: list[list[int]], classes: list[str], path: str | Path, title: str = "") -> Path:
    """Row-normalized confusion matrix (rows: true class, columns: predicted), in %."""

    counts = np.asarray(confusion, dtype=float)
    share = 100 * counts / counts.sum(1, keepdims=True).clip(min=1)
    k = len(classes)
    size = min(24, max(4.5, 0.45 * k))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=100)
    if k <= 30:
        ax.set_xticks(range(k), classes, rotation=60, ha="right")
        ax.set_yticks(range(k), classes)
        for i in range(k):
            for j in range(k):
                if share[i, j] >= 0.5:
                    ax.text(j, i, f"{share[i, j]:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 50 else "black")
    ax.set(xlabel="predicted", ylabel="true class", title=title or "confusion matrix (% of each true class)")
    return _save(fig, Path(path))


def ablation_bars(rows: list[dict], labels: list[str], paper: list[tuple[str, str]], path: str | Path) -> Path:
    """Test error per row (model, or model and --grid combination, named by ``labels``): ours (the
    mean, with the spread where there are several seeds) beside the paper's columns, given as (row
    key, legend label)."""

    x = np.arange(len(rows))
    seeds = rows[0]["seeds"]
    width = 0.8 / (1 + len(paper))
    offsets = (np.arange(1 + len(paper)) - len(paper) / 2) * width
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(rows)), 3.6))
    ax.bar(x + offsets[0], [r["test_error_mean"] for r in rows], width, capsize=3,
           label="allconv, one seed" if seeds == 1 else f"allconv, mean ± std over {seeds} seeds",
           yerr=None if seeds == 1 else [r["test_error_std"] for r in rows])  # one run has no spread to draw
    for offset, (key, label) in zip(offsets[1:], paper):
        ax.bar(x + offset, [np.nan if r[key] is None else r[key] for r in rows], width, label=label)
    ax.set_xticks(x, labels, rotation=20, ha="right")
    ax.set(ylabel="test error %", title="ablation: test error by model")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))

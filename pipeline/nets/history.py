"""What a training run shows: ``history.csv`` (one row per epoch) and the ``training.png`` curves."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from pipeline.io.atomic import atomic_path

HISTORY = "history.csv"
PLOT = "training.png"


def history_csv(history: list[dict[str, Any]]) -> str:
    keys = [
        "epoch",
        "lr",
        "train_loss",
        "sel_loss",
        "sel_oa",
        "sel_kappa",
        "sel_mean_f1",
        "precision",
        "seconds",
        "cpu_seconds",
    ]
    buf = io.StringIO()
    w = csv.DictWriter(buf, keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(history)
    return buf.getvalue()


def plot_history(history: list[dict[str, Any]], out: Path, title: str = "") -> None:
    """Loss, selection OA/kappa/F1 and learning rate per epoch, one PNG people look at instead of logs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True)
    axes[0].plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    if any(h.get("sel_loss") is not None for h in history):
        axes[0].plot(ep, [h.get("sel_loss") for h in history], "s-", label="model selection")
    axes[0].set(title="loss (eq. 1)", xlabel="epoch")
    axes[0].legend()
    for key, label in (("sel_oa", "OA"), ("sel_kappa", "kappa"), ("sel_mean_f1", "mean F1")):
        axes[1].plot(ep, [h.get(key) for h in history], "o-", label=label)
    axes[1].set(title="model selection (held-out training polygons)", xlabel="epoch", ylim=(0, 1))
    axes[1].legend()
    axes[2].plot(ep, [h["lr"] for h in history], "o-")
    axes[2].set(title="learning rate (eq. 3)", xlabel="epoch")
    fig.suptitle(title)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)

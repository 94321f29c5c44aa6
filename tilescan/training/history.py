"""A training run's history: a row per epoch in ``<MODEL>.ckpt/history.csv``, copied beside
the model with its learning curves (``<MODEL>.history.csv``, ``<MODEL>.curves.png``)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from ..outputs.files import write_text

FIELDS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds"]


def append_row(path: Path, row: dict) -> None:
    """One epoch's row (:data:`FIELDS`), with the header first in a new file."""
    new = not path.exists()
    with path.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)


def keep_upto(path: Path, epochs: int) -> None:
    """Drop the rows past epoch ``epochs`` (the epochs the checkpoint holds)."""
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        write_text(path, "".join(lines[:1] + [ln for ln in lines[1:] if int(ln.split(",", 1)[0]) <= epochs]))


def beside(out: Path) -> tuple[Path, Path]:
    """The history CSV and learning-curve PNG kept beside the model ``out``: their paths."""
    stem = out.name[: -len(".keras")]
    return out.with_name(stem + ".history.csv"), out.with_name(stem + ".curves.png")


def keep_beside(out: Path, ckpt: Path) -> None:
    """The history CSV and learning-curve PNG beside the model ``out`` (:func:`beside`)."""
    csv_path, png = beside(out)
    if (ckpt / "history.csv").exists():
        csv_path.write_text((ckpt / "history.csv").read_text())
        plot_history(ckpt / "history.csv", png)


def plot_history(history_csv: Path, png: Path) -> None:
    """Learning curves (loss and accuracy, train vs val) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(history_csv.open()))
    if not rows:
        return
    ep = [int(r["epoch"]) for r in rows]

    def col(k):
        return [float(r[k]) if r[k] not in ("", "None") else np.nan for r in rows]

    from matplotlib.ticker import MaxNLocator

    val_loss = np.array(col("val_loss"), dtype=np.float64)
    best = ep[int(np.nanargmin(val_loss))] if np.isfinite(val_loss).any() else None  # kept, unless min_delta asks more
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for ax, metric in ((a, "loss"), (b, "accuracy")):
        ax.plot(ep, col(metric), marker=".", label="train")  # markers: one epoch is a point, not an empty plot
        ax.plot(ep, col(f"val_{metric}"), marker=".", label="val")
        if best is not None:
            ax.axvline(best, color="grey", linestyle="--", linewidth=1, label=f"lowest val loss (epoch {best})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"learning curves ({png.name.removesuffix('.curves.png')})")  # the model's name, not its checkpoint folder's
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png)

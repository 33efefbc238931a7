"""Training-progress plot and context-label snapshots, written atomically as PNG."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from colabx._io import atomic_write  # noqa: E402

__all__ = ["context_snapshot", "progress_figure", "save_figure"]


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` as a PNG to ``path`` atomically and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(Path(path), lambda f: f.write(buf.getvalue()))


def _series(rows: Sequence[Mapping[str, float]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if v is not None and isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(r["epoch"])
            ys.append(v)
    return xs, ys


def progress_figure(rows: Sequence[Mapping[str, float]], path: Path) -> None:
    """``progress.png``: training loss, meta losses, validation DSC/precision/sensitivity,
    learning rates and epoch time, one panel each, against the epoch. ``rows`` are the CSV rows
    (one per epoch)."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0, 0]
    for key, label in (("train_loss", "train loss (Dice+CE)"), ("meta_l_seg", "meta L_seg"),
                       ("meta_l_roi", "meta L_ROI")):
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, ys, label=label)
    ax.set_title("losses")
    ax = axes[0, 1]
    for key in ("val_dsc", "val_precision", "val_sensitivity"):
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, ys, marker="o", label=key.removeprefix("val_"))
    ax.set_ylim(0, 1)
    ax.set_title("validation (mean over cases)")
    ax = axes[1, 0]
    for key in ("lr", "gen_lr"):
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, ys, label=key)
    ax.set_yscale("log")
    ax.set_title("learning rates")
    ax = axes[1, 1]
    xs, ys = _series(rows, "epoch_time")
    ax.plot(xs, ys)
    ax.set_title("epoch time (s)")
    for a in axes.flat:
        a.set_xlabel("epoch")
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def context_snapshot(image: np.ndarray, label: np.ndarray, targets: np.ndarray,
                     num_classes: int, path: Path, title: str = "") -> None:
    """One slice (the ROI's largest along the last axis) of the image, the labels and each context
    channel of the expanded targets ``[K, *S]`` (2D or 3D), saved as PNG."""
    if image.ndim == 3:
        area = (label > 0).sum(axis=(0, 1))
        k = int(area.argmax()) if area.any() else image.shape[-1] // 2
        image, label, targets = image[..., k], label[..., k], targets[..., k]
    ctx = [0, *range(num_classes, targets.shape[0])]
    n = 2 + len(ctx)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.8))
    lo, hi = np.percentile(image, (1, 99))
    axes[0].imshow(image.T, cmap="gray", origin="lower", vmin=lo, vmax=max(hi, lo + 1e-6))
    axes[0].set_title("image")
    axes[1].imshow(label.T, cmap="viridis", origin="lower", interpolation="nearest")
    axes[1].set_title("label")
    for a, ch in zip(axes[2:], ctx, strict=True):
        a.imshow(targets[ch].T, cmap="magma", vmin=0, vmax=1, origin="lower")
        a.set_title(f"context {0 if ch == 0 else ch - num_classes + 1}")
    for a in axes:
        a.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)

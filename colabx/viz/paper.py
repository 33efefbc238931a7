"""The paper's analysis figures from trained runs (``colabx figures``), written atomically as PNG.

* Fig. 3, :func:`logit_density_figure`: held-out voxels in the plane (ROI logit, largest context
  logit), ROI and background voxels in separate densities, with the decision line; one panel per
  run, so that vanilla and CoLab sit side by side.
* Fig. 8, :func:`context_map_figure`: per case, a slice through the ROI: image, reference, the
  network's argmax over all K channels (contexts in their own colours) and, for CoLab, the
  generator's context map (argmax and soft q of context 1).
* Fig. 11, :func:`intensity_histogram_figure`: intensity histograms of the ROI and of each context
  class near it, as the network assigns them (and manual context maps when the data has them).
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap, LogNorm  # noqa: E402

from colabx.viz.figures import save_figure  # noqa: E402

__all__ = ["CaseSlice", "context_map_figure", "intensity_histogram_figure",
           "logit_density_figure"]

_COLOURS = ["#000000", "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0",
            "#f032e6", "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8",
            "#800000", "#aaffc3"]


def logit_density_figure(panels: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
                         path: Path) -> None:
    """Fig. 3. ``panels``: (title, ROI logit, largest context logit, is-ROI mask) per run, each
    a flat array over held-out voxels."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    values = np.concatenate([np.concatenate([p[1], p[2]]) for p in panels])
    roi = np.concatenate([np.concatenate([p[1][p[3]], p[2][p[3]]]) for p in panels])
    lo, hi = np.percentile(values, [0.5, 99.5]) if values.size else (-1.0, 1.0)
    if roi.size:  # the ROI voxels are few: keep every one of them in view
        lo, hi = min(lo, float(roi.min())), max(hi, float(roi.max()))
    edges = np.linspace(lo, hi, 120)
    for ax, (title, roi, ctx, is_roi) in zip(axes[0], panels, strict=True):
        for mask, cmap, name in ((~is_roi, "Blues", "background"), (is_roi, "Reds", "ROI")):
            if mask.any():
                h, _, _ = np.histogram2d(ctx[mask], roi[mask], bins=[edges, edges])
                h = np.ma.masked_equal(h.T, 0)
                ax.pcolormesh(edges, edges, h, cmap=cmap, norm=LogNorm(vmin=0.5),
                              alpha=0.8)
                ax.plot([], [], "s", color=plt.get_cmap(cmap)(0.8),
                        label=f"{name} ({int(mask.sum())} voxels)")
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="decision line")
        ax.set_xlabel("largest context logit")
        ax.set_ylabel("ROI logit")
        ax.set_title(title)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    save_figure(fig, path)


@dataclass
class CaseSlice:
    """One row of Fig. 8: a slice's image, reference, the network's argmax over K channels, and
    the generator's argmax (context k shown as the channel it labels: 0, then c − 1 + k) and
    soft q of context 1 (None without a generator)."""

    title: str
    image: np.ndarray
    label: np.ndarray
    argmax: np.ndarray
    num_classes: int
    q_argmax: np.ndarray | None = None
    q1: np.ndarray | None = None


def context_map_figure(rows: Sequence[CaseSlice], path: Path) -> None:
    """Fig. 8: one row per case slice (ROI classes red/green/..., contexts in other colours)."""
    fig, axes = plt.subplots(len(rows), 5, figsize=(16, 3.8 * len(rows)), squeeze=False)
    for ax_row, r in zip(axes, rows, strict=True):
        k = int(max(r.argmax.max(), r.label.max(),
                    0 if r.q_argmax is None else r.q_argmax.max())) + 1
        cmap = ListedColormap(_COLOURS[:max(k, 2)])
        panels = [("image", r.image, "gray", None), ("reference", r.label, cmap, (0, k - 1)),
                  (f"network argmax (ROI 1..{r.num_classes - 1}, contexts 0, "
                   f"{r.num_classes}..)", r.argmax, cmap, (0, k - 1))]
        if r.q_argmax is not None:
            panels += [("generator context (argmax q, as channels)", r.q_argmax, cmap,
                        (0, k - 1)), ("generator q, context 1", r.q1, "viridis", (0, 1))]
        for ax, (name, img, cm, lim) in zip(ax_row, panels, strict=False):
            ax.imshow(img.T, cmap=cm, origin="lower", interpolation="nearest",
                      **({} if lim is None else {"vmin": lim[0], "vmax": lim[1]}))
            # a long run/case title is wrapped to the panel's width instead of running off it
            title = "\n".join([*textwrap.wrap(r.title, 30), name]) if name == "image" else name
            ax.set_title(title, fontsize=9)
        for ax in ax_row:
            ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)


def intensity_histogram_figure(groups: Sequence[tuple[str, Mapping[str, np.ndarray]]],
                               path: Path) -> None:
    """Fig. 11: per group (a run, or the manual context maps), one density histogram per class
    (ROI and each context) of the image intensities."""
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4), squeeze=False)
    everything = [v for _, g in groups for v in g.values() if v.size]
    values = np.concatenate(everything) if everything else np.zeros(1)
    edges = np.linspace(*np.percentile(values, [0.5, 99.5]), 80)
    for ax, (title, classes) in zip(axes[0], groups, strict=True):
        top = 0.0
        for i, (name, v) in enumerate(classes.items()):
            if v.size:
                dens, _, _ = ax.hist(v, bins=edges, density=True, histtype="step", lw=1.5,
                                     color=_COLOURS[(i + 1) % len(_COLOURS)],
                                     label=f"{name} ({v.size})")
                top = max(top, float(np.max(dens[1:-1])))  # not the clipped extremes' spikes
        if top > 0:
            ax.set_ylim(0, 1.3 * top)
        ax.set_title(title)
        ax.set_xlabel("intensity (normalised)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)

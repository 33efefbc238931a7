"""``colabx figures``: the paper's analysis figures and the context-coherence numbers of trained
runs, on their held-out cases (:mod:`colabx.inference.analysis`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from colabx._io import atomic_write_text, json_safe
from colabx.inference.analysis import case_outputs, held_out_cases, load_run, neighbour_ratio
from colabx.viz.paper import (
    CaseSlice,
    context_map_figure,
    intensity_histogram_figure,
    logit_density_figure,
)

__all__ = ["FIGURES", "write_figures"]

FIGURES = ("fig3_logit_density.png", "fig8_context_maps.png", "fig11_intensity_histograms.png")
_MAX_VOXELS = 200_000  # per run in Fig. 3 (a fixed random subset beyond)


def _roi_slice(label: np.ndarray) -> tuple[slice | int, ...]:
    """The index of the 2D view Fig. 8 shows: a 2D case whole, a 3D case's slice with the most
    ROI voxels along the last axis."""
    if label.ndim == 2:
        return (slice(None), slice(None))
    counts = (label > 0).reshape(-1, label.shape[-1]).sum(0)
    return (slice(None),) * (label.ndim - 1) + (int(np.argmax(counts)),)


def write_figures(runs: list[str | os.PathLike[str]], out_dir: str | os.PathLike[str], *,
                  cases: list[str] | None = None, checkpoint: str = "final",
                  max_cases: int = 3, overlap: float = 0.5) -> dict[str, Any]:
    """Write :data:`FIGURES` and ``figures.json`` into ``out_dir`` for ``runs`` (their held-out
    cases, ``cases`` when given, at most ``max_cases`` of them in Fig. 8).

    ``figures.json`` holds per run and case the generator's :func:`neighbour_ratio` per axis
    (CoLab runs), and per run its mean over cases.

    Returns:
        The content of ``figures.json``.
    """
    out = Path(out_dir)
    rng = np.random.default_rng(0)
    density, slices, histograms = [], [], []
    report: dict[str, Any] = {"runs": {}}
    manual: dict[str, list[np.ndarray]] = {}
    for run_dir in runs:
        run = load_run(run_dir, checkpoint)
        c, margin = run.plan["num_classes"], float(run.config["margin"])
        roi_l, ctx_l, is_roi, ratios = [], [], [], {}
        classes: dict[str, list[np.ndarray]] = {"ROI": []}
        for k, case in enumerate(held_out_cases(run, cases)):
            o = case_outputs(run, case, overlap)
            label = torch.from_numpy(np.asarray(case.label).astype(np.int64))
            z = o.logits
            ctx_channels = [0, *range(c, z.shape[0])]
            roi_l.append(z[1:c].amax(0).flatten().numpy())
            ctx_l.append(z[ctx_channels].amax(0).flatten().numpy())
            is_roi.append((label > 0).flatten().numpy())
            img = np.asarray(case.image[0])
            near = (np.asarray(case.distance) <= margin) & (np.asarray(case.label) == 0)
            classes["ROI"].append(img[np.asarray(case.label) > 0])
            ctx_arg = z[ctx_channels].argmax(0).numpy()
            for j in range(len(ctx_channels)):
                classes.setdefault(f"context {j}", []).append(img[near & (ctx_arg == j)])
            if case.context is not None:
                cm = np.asarray(case.context)
                for j in np.unique(cm[near]):
                    manual.setdefault(f"organ {int(j)}", []).append(img[near & (cm == j)])
            if o.q is not None:
                ratios[case.id] = neighbour_ratio(o.q)
            if k < max_cases:
                pick = _roi_slice(np.asarray(case.label))
                slices.append(CaseSlice(
                    f"{run.name} / {case.id}", img[pick], np.asarray(case.label)[pick],
                    z.argmax(0).numpy()[pick], c,
                    None if o.q is None else _as_channels(o.q.argmax(0).numpy()[pick], c),
                    None if o.q is None else o.q[min(1, o.q.shape[0] - 1)].numpy()[pick]))
        r, x, m = (np.concatenate(v) for v in (roi_l, ctx_l, is_roi))
        if r.size > _MAX_VOXELS:
            keep = rng.choice(r.size, _MAX_VOXELS, replace=False)
            r, x, m = r[keep], x[keep], m[keep]
        title = f"{run.name} ({run.config['mode']})"
        density.append((title, r, x, m))
        histograms.append((title, {n: np.concatenate(v) for n, v in classes.items()}))
        entry: dict[str, Any] = {"mode": run.config["mode"], "cases": sorted(ratios)}
        if ratios:
            entry["neighbour_ratio"] = ratios
            entry["neighbour_ratio_mean"] = np.nanmean(list(ratios.values()), axis=0).tolist()
        report["runs"][str(run_dir)] = entry
    if manual:
        histograms.append(("manual context maps", {n: np.concatenate(v)
                                                    for n, v in manual.items()}))
    logit_density_figure(density, out / FIGURES[0])
    context_map_figure(slices, out / FIGURES[1])
    intensity_histogram_figure(histograms, out / FIGURES[2])
    atomic_write_text(out / "figures.json", json.dumps(json_safe(report), indent=1,
                                                       allow_nan=False) + "\n")
    return report


def _as_channels(contexts: np.ndarray, num_classes: int) -> np.ndarray:
    """Generator context k as the segmentation channel it labels (0, then c − 1 + k), so that
    both maps share colours."""
    return np.where(contexts == 0, 0, contexts + num_classes - 1)

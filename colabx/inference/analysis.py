"""What a trained run learned, on its held-out cases: the networks' outputs in the training grid
and the coherence of the generator's context maps.

Held-out cases are the labelled test cases (``imagesTs``/``labelsTs``), preprocessed in memory
as the training cases were, or, without them, the run's validation cases.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from colabx.checkpoint import load_checkpoint
from colabx.data.preprocessing import (
    PreprocessedCase,
    load_preprocessed,
    preprocess_held_out_case,
)
from colabx.inference.sliding_window import sliding_window_logits
from colabx.models.plan import NetworkPlan, build_networks

__all__ = ["CaseOutputs", "TrainedRun", "case_outputs", "held_out_cases", "load_run",
           "neighbour_ratio"]


@dataclass
class TrainedRun:
    """A run's networks (eval mode) and what its checkpoint records.

    Attributes:
        f: the segmentation network; ``g``: the task generator (CoLab) or None.
        plan: the network plan; ``plans``: the preprocessing plans; ``config``: the options;
        ``dataset``: the checkpoint's dataset entry (root, labels, validation ids).
        name: the run folder's name.
    """

    f: torch.nn.Module
    g: torch.nn.Module | None
    plan: dict[str, Any]
    plans: dict[str, Any]
    config: dict[str, Any]
    dataset: dict[str, Any]
    name: str


def load_run(run: str | os.PathLike[str], checkpoint: str = "final",
             device: str | torch.device = "cpu") -> TrainedRun:
    """Both networks of a run directory's ``checkpoint_{checkpoint}.pth``."""
    path = Path(run) / f"checkpoint_{checkpoint}.pth"
    state = load_checkpoint(path)
    f, g = build_networks(NetworkPlan(**state["network_plan"]), torch.device(device))
    f.load_state_dict(state["model"])
    f.eval()
    if g is not None:
        g.load_state_dict(state["generator"])
        g.eval()
    return TrainedRun(f, g, state["network_plan"], state["preprocessing_plans"], state["config"],
                      state["dataset"], Path(run).name)


def held_out_cases(run: TrainedRun, ids: list[str] | None = None) -> list[PreprocessedCase]:
    """The run's labelled test cases in the training grid, else its validation cases; only
    ``ids`` when given.

    Raises:
        ValueError: none of ``ids`` is a held-out case, or the run has no held-out case.
    """
    from colabx.data import load_dataset

    ds = load_dataset(run.dataset["root"])
    tests = [c for c in ds.test_cases if c.label is not None]
    known = [c.id for c in tests] if tests else list(run.dataset["val_ids"])
    chosen = known if not ids else [i for i in ids if i in known]
    if ids and len(chosen) != len(ids):
        missing = sorted(set(ids) - set(known))
        raise ValueError(f"cases: {missing} are not held-out cases of {run.name} ({known})")
    if not chosen:
        raise ValueError(f"{run.name}: no labelled test case and no validation case")
    if tests:
        by_id = {c.id: c for c in tests}
        return [preprocess_held_out_case(ds, by_id[i], run.plans) for i in chosen]
    pre = load_preprocessed(run.dataset["preprocessed"])
    return [pre.load_case(i, mmap=False) for i in chosen]


@dataclass
class CaseOutputs:
    """``logits``: the segmentation network's ``[K, *S]``; ``q``: the generator's softmax
    ``[t, *S]`` (None without a generator); both float32 on the CPU, in the case's grid."""

    logits: torch.Tensor
    q: torch.Tensor | None


def case_outputs(run: TrainedRun, case: PreprocessedCase, overlap: float = 0.5) -> CaseOutputs:
    """Sliding-window outputs of both networks on one preprocessed case."""
    x = torch.from_numpy(np.ascontiguousarray(case.image))
    patch = run.plan["patch_size"]
    logits = sliding_window_logits(run.f, x, patch, overlap=overlap)[0].cpu()
    q = None
    if run.g is not None:
        q = torch.softmax(sliding_window_logits(run.g, x, patch, overlap=overlap)[0], 0).cpu()
    return CaseOutputs(logits, q)


def neighbour_ratio(q: torch.Tensor, region: torch.Tensor | None = None) -> list[float]:
    """Per spatial axis of ``q [t, *S]``: the mean ``|q[i+1] − q[i]|`` over the mean
    ``|q[i+2] − q[i]|`` (channels and positions averaged; positions whose three voxels lie in
    ``region`` when given). About 0.5 for a smooth map, far above 1 when neighbouring voxels
    alternate (a checkerboard; +inf for a perfect one); NaN for a constant map."""
    out = []
    for axis in range(1, q.dim()):
        n = q.shape[axis]
        if n < 3:
            out.append(float("nan"))
            continue
        a, b, c = (q.narrow(axis, k, n - 2) for k in range(3))
        one, two = (b - a).abs(), (c - a).abs()
        if region is not None:
            r = region.narrow(axis - 1, 0, n - 2) & region.narrow(axis - 1, 1, n - 2) & \
                region.narrow(axis - 1, 2, n - 2)
            one, two = one[:, r], two[:, r]
        num = float(one.double().mean()) if one.numel() else 0.0
        den = float(two.double().mean()) if two.numel() else 0.0
        out.append(num / den if den > 0 else float("inf") if num > 0 else float("nan"))
    return out

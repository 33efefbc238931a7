"""The trainer's evaluations: validation in the preprocessed grid, context-label snapshots and the
final held-out evaluation in each case's original grid.

Metrics (``colabx.inference.metrics``) are per ROI class; the trainer reports their mean over
classes and cases: DSC, sensitivity and precision (precision of a case with no predicted voxel is
undefined, left out of the mean and counted beside it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from colabx.data.datasets import Dataset
from colabx.data.preprocessing import PreprocessedCase, PreprocessedDataset
from colabx.data.sampling import sample_patch
from colabx.inference import (
    evaluate_case,
    predict_case,
    predict_raw_case,
    save_prediction,
    summarize,
    write_summary,
)

__all__ = ["Evaluator", "final_evaluation", "format_metrics", "snapshot", "validate"]

#: ``targets(x, y, d, context)``: the training targets of a batch (one tensor or one per level).
TargetsFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], "Tensor | list[Tensor]"]


@dataclass
class Evaluator:
    """What the evaluations read: the segmentation net ``f`` (``K = num_classes + t − 1``
    outputs), the sliding-window settings, the dataset and its preprocessed cases."""

    f: torch.nn.Module
    num_classes: int
    patch_size: Sequence[int]
    overlap: float
    amp: torch.dtype | None
    dataset: Dataset
    pre: PreprocessedDataset

    def score_preprocessed(self, ids: Sequence[str], hd95: bool) -> dict[str, dict]:
        """Per-class metrics of each case in ``ids``, predicted by sliding window in the
        preprocessed grid."""
        out = {}
        for cid in ids:
            case = self.pre.load_case(cid)
            pred = predict_case(self.f, np.asarray(case.image), self.num_classes,
                                self.patch_size, overlap=self.overlap, amp=self.amp)
            out[cid] = evaluate_case(pred.cpu(), np.array(case.label), self.num_classes,
                                     case.spacing, ignore_label=self.dataset.ignore_label,
                                     compute_hd95=hd95)
        return out


def validate(ev: Evaluator, ids: Sequence[str]) -> dict[str, float]:
    """Sliding-window prediction of the validation cases ``ids`` (preprocessed grid): the mean
    DSC, sensitivity and precision over ROI classes and cases."""
    fg = summarize(ev.score_preprocessed(ids, hd95=False).values())["foreground_mean"]
    return {"val_dsc": fg["dice"], "val_sensitivity": fg["sensitivity"],
            "val_precision": fg["precision"]}


def snapshot(case: PreprocessedCase, patch_size: Sequence[int], targets: TargetsFn,
             num_classes: int, device: torch.device, path: Path, title: str) -> None:
    """A PNG of a fixed ROI-centred patch of ``case``: its image, labels and the context
    channels of ``targets`` on it (called without gradient)."""
    from colabx.viz.figures import context_snapshot

    p = sample_patch(case, patch_size, np.random.default_rng(0), force_roi=True)
    x = torch.from_numpy(p["image"])[None].to(device)
    y = torch.from_numpy(p["label"].astype(np.int64))[None].to(device)
    d = torch.from_numpy(p["distance"])[None].to(device)
    ctx = p.get("context")
    ctx = None if ctx is None else torch.from_numpy(ctx.astype(np.int64))[None].to(device)
    with torch.no_grad():
        out = targets(x, y, d, ctx)
    first = (out[0] if isinstance(out, list) else out)[0].float().cpu().numpy()
    context_snapshot(p["image"][0], p["label"], first, num_classes, path, title=title)


def final_evaluation(ev: Evaluator, val_ids: Sequence[str], out: Path, mode: str,
                     echo: Callable[[str], None]) -> dict[str, Any]:
    """Evaluate the final model on the held-out cases and print the metrics with ``echo``.

    Test cases with labels (``imagesTs``/``labelsTs``) are predicted from their raw files and
    scored in their original grid; predictions go to ``out/predictions_test/``. Without
    labelled test cases the validation cases ``val_ids`` are scored in the preprocessed grid.
    The result is written to ``out/evaluation.json`` (+ ``evaluation.csv``).
    """
    c, dataset = ev.num_classes, ev.dataset
    tests = [k for k in dataset.test_cases if k.label is not None]
    cases: dict[str, Any] = {}
    if tests:
        where = f"{len(tests)} held-out test cases (imagesTs/labelsTs, original grid)"
        out_dir = out / "predictions_test"
        for k in tests:
            label, _ = predict_raw_case(ev.f, k.images, ev.pre.plans, ev.patch_size,
                                        num_classes=c, overlap=ev.overlap, amp=ev.amp)
            save_prediction(label, k.images[0], out_dir / f"{k.id}{dataset.file_ending}")
            ref = dataset.load_case(k)
            cases[k.id] = {"metrics": evaluate_case(label, ref.label, c, ref.spacing,
                                                    ignore_label=dataset.ignore_label)}
    else:
        where = f"{len(val_ids)} validation cases (preprocessed grid)"
        cases = {cid: {"metrics": m}
                 for cid, m in ev.score_preprocessed(val_ids, hd95=True).items()}
    result = summarize(c_["metrics"] for c_ in cases.values())
    classes = {n: v for n, v in dataset.labels.items()
               if v != 0 and v != dataset.ignore_label}
    result.update({"evaluated_on": where, "mode": mode, "labels": classes, "cases": cases})
    write_summary(result, out / "evaluation.json")
    echo(f"final evaluation on {where}:")
    echo(format_metrics(result))
    return result


def format_metrics(result: dict[str, Any]) -> str:
    """A per-case table and the mean: DSC, sensitivity, precision, HD95 per ROI class."""
    names = {v: n for n, v in (result.get("labels") or {}).items()}
    rows = [f"{'case':<24} {'class':<12} {'DSC':>7} {'sens':>7} {'prec':>7} {'HD95':>8}"]

    def fmt(v: float, w: int = 7) -> str:
        return f"{v:>{w}.3f}" if isinstance(v, (int, float)) and math.isfinite(v) else \
            f"{'n/a':>{w}}"

    for cid, case in result.get("cases", {}).items():
        for j, m in case["metrics"].items():
            rows.append(f"{cid:<24} {names.get(j, str(j)):<12} {fmt(m['dice'])} "
                        f"{fmt(m['sensitivity'])} {fmt(m['precision'])} {fmt(m['hd95'], 8)}")
    fg = result["foreground_mean"]
    rows.append(f"{'mean':<24} {'(all ROI)':<12} {fmt(fg['dice'])} {fmt(fg['sensitivity'])} "
                f"{fmt(fg['precision'])} {fmt(fg['hd95'], 8)}")
    undefined = {m: n for m, n in (result.get("foreground_undefined") or {}).items() if n}
    if undefined:
        why = {"sensitivity": "empty reference", "precision": "nothing predicted",
               "hd95": "not computed", "dice": "not computed"}
        # counted per class and case: with several ROI classes they are not cases
        unit = "case(s)" if len(result.get("mean") or {}) <= 1 else "(class, case) pair(s)"
        rows.append("undefined, left out of the mean: " + ", ".join(
            f"{m} in {n} {unit} ({why.get(m, 'undefined')})" for m, n in undefined.items()))
    return "\n".join(rows)

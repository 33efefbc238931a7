"""The trainer's evaluations: validation in the preprocessed grid, context-label snapshots and the
final held-out evaluation in each case's original grid.

Metrics (``colabx.inference.metrics``) are per ROI class; the trainer reports their mean over
classes and cases: DSC, sensitivity and precision (precision of a case with no predicted voxel is
undefined, left out of the mean and counted beside it).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from colabx.data.sampling import sample_patch
from colabx.inference import (
    evaluate_case,
    predict_case,
    predict_raw_case,
    save_prediction,
    summarize,
    write_summary,
)

if TYPE_CHECKING:
    from colabx.train.trainer import Trainer

__all__ = ["final_evaluation", "format_metrics", "snapshot", "validate"]


def _score_preprocessed(tr: Trainer, ids: list[str], hd95: bool) -> dict[str, dict]:
    """Per-class metrics of each case in ``ids``, predicted by sliding window in the
    preprocessed grid."""
    out = {}
    for cid in ids:
        case = tr.pre.load_case(cid)
        pred = predict_case(tr.f, np.asarray(case.image), tr.num_classes, tr.plan.patch_size,
                            overlap=tr.cfg.overlap, amp=tr.amp_dtype)
        out[cid] = evaluate_case(pred.cpu(), np.array(case.label), tr.num_classes, case.spacing,
                                 ignore_label=tr.dataset.ignore_label, compute_hd95=hd95)
    return out


def validate(tr: Trainer) -> dict[str, float]:
    """Sliding-window prediction of the validation cases (preprocessed grid)."""
    cfg = tr.cfg
    ids = tr.val_ids[: cfg.val_cases] if cfg.val_cases else tr.val_ids
    fg = summarize(_score_preprocessed(tr, ids, hd95=False).values())["foreground_mean"]
    return {"val_dsc": fg["dice"], "val_sensitivity": fg["sensitivity"],
            "val_precision": fg["precision"]}


def snapshot(tr: Trainer, epoch: int) -> None:
    """``snapshots/epoch_XXXX.png``: a fixed ROI-centred patch of the first validation (or
    training) case, its labels and the context channels of its current targets."""
    from colabx.viz.figures import context_snapshot

    cid = (tr.val_ids or tr.train_ids)[0]
    case = tr.pre.load_case(cid)
    p = sample_patch(case, tr.plan.patch_size, np.random.default_rng(0), force_roi=True)
    x = torch.from_numpy(p["image"])[None].to(tr.device)
    y = torch.from_numpy(p["label"].astype(np.int64))[None].to(tr.device)
    d = torch.from_numpy(p["distance"])[None].to(tr.device)
    with torch.no_grad():
        if tr.meta is not None:
            tr.g.eval()
            out = tr.meta.labels(x, y, d)
            tr.g.train()
        else:
            ctx = p.get("context")
            ctx = None if ctx is None else torch.from_numpy(ctx.astype(np.int64))[None]
            out = tr.fixed.targets(x, y, d, None if ctx is None else ctx.to(tr.device))
    targets = (out[0] if isinstance(out, list) else out)[0].float().cpu().numpy()
    context_snapshot(p["image"][0], p["label"], targets, tr.num_classes,
                     tr.out / "snapshots" / f"epoch_{epoch:04d}.png",
                     title=f"{tr.cfg.mode}, epoch {epoch}, case {cid}")


def final_evaluation(tr: Trainer) -> dict[str, Any]:
    """Evaluate the final model on the held-out cases and print the metrics.

    Test cases with labels (``imagesTs``/``labelsTs``) are predicted from their raw files and
    scored in their original grid; predictions go to ``predictions_test/``. Without labelled test
    cases the validation cases are scored in the preprocessed grid. The result is written to
    ``evaluation.json`` (+ ``evaluation.csv``).
    """
    cfg, c = tr.cfg, tr.num_classes
    tests = [k for k in tr.dataset.test_cases if k.label is not None]
    cases: dict[str, Any] = {}
    if tests:
        where = f"{len(tests)} held-out test cases (imagesTs/labelsTs, original grid)"
        out_dir = tr.out / "predictions_test"
        for k in tests:
            label, _ = predict_raw_case(tr.f, k.images, tr.pre.plans, tr.plan.patch_size,
                                        num_classes=c, overlap=cfg.overlap, amp=tr.amp_dtype)
            save_prediction(label, k.images[0], out_dir / f"{k.id}{tr.dataset.file_ending}")
            ref = tr.dataset.load_case(k)
            cases[k.id] = {"metrics": evaluate_case(label, ref.label, c, ref.spacing,
                                                    ignore_label=tr.dataset.ignore_label)}
    else:
        where = f"{len(tr.val_ids)} validation cases (preprocessed grid)"
        cases = {cid: {"metrics": m}
                 for cid, m in _score_preprocessed(tr, tr.val_ids, hd95=True).items()}
    result = summarize(c_["metrics"] for c_ in cases.values())
    classes = {n: v for n, v in tr.dataset.labels.items()
               if v != 0 and v != tr.dataset.ignore_label}
    result.update({"evaluated_on": where, "mode": cfg.mode, "labels": classes, "cases": cases})
    write_summary(result, tr.out / "evaluation.json")
    tr.echo(f"final evaluation on {where}:")
    tr.echo(format_metrics(result))
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
        rows.append("undefined, left out of the mean: " + ", ".join(
            f"{m} in {n} case(s) ({why.get(m, 'undefined')})" for m, n in undefined.items()))
    return "\n".join(rows)

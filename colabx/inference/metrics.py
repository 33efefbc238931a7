"""Segmentation metrics per class: Dice, sensitivity, precision, voxel counts and HD95.

Conventions (class ``j >= 1`` of a prediction ``P`` and reference ``R``, counted over the voxels
that are not the reference's ignore label):

* ``tp, fp, fn``: voxel counts; ``n_pred = tp + fp``, ``n_ref = tp + fn``.
* ``dice = 2 tp / (2 tp + fp + fn)``.
* ``sensitivity = tp / n_ref`` (recall); ``precision = tp / n_pred``.
* ``hd95``: the symmetric 95th-percentile Hausdorff distance between the surfaces, in mm when a
  spacing is given (else voxels): ``max(q95(d(S_P, S_R)), q95(d(S_R, S_P)))``, where ``d(A, B)``
  are the distances from every voxel of surface A to the nearest voxel of surface B and q95 the
  linear-interpolated 95th percentile (the definition of MONAI's ``compute_hausdorff_distance``
  with ``percentile=95``, the BraTS toolkits and DeepMind's ``surface-distance`` up to its surfel
  weighting). A surface voxel is a mask voxel with a face neighbour (4-connectivity in 2D,
  6 in 3D) outside the mask or outside the array (MedPy's erosion border). Distances come from
  :func:`colabx.distance_transform` on the bounding box of ``P ∪ R`` (exact: every surface voxel
  lies inside it).

Empty masks, so that predicting nothing is never rewarded:

=================  =====  ===========  =========  =======================================
P / R              dice   sensitivity  precision  hd95
=================  =====  ===========  =========  =======================================
empty / empty      1      undefined    undefined  0
empty / non-empty  0      0            undefined  the image diagonal (the penalty)
non-empty / empty  0      undefined    0          the image diagonal (the penalty)
=================  =====  ===========  =========  =======================================

The image diagonal is ``sqrt(sum((n_a * spacing_a)^2))`` over the array's axes, the largest
distance two voxels of the image can have, as the BraTS challenge scores a missed or invented
tumour (373.13 mm, its 240×240×155 1-mm grid). MONAI agrees on dice (with
``ignore_empty=False``), sensitivity and precision (``ConfusionMatrixMetric``: NaN where
undefined) and returns NaN for HD95 whenever a mask is empty; colabx gives the finite values
above instead, so that a mean over cases stays comparable between models that miss different
cases. Undefined values are NaN (``null`` in JSON); :func:`summarize` leaves them out of the
means and reports beside every mean how many cases were undefined.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from colabx._io import atomic_write_text
from colabx.data.datasets import check_same_grid
from colabx.data.image_io import DatasetError, folder_ending, read_label_map
from colabx.inference.postprocess import POSTPROCESSING
from colabx.inference.postprocess import postprocess as apply_postprocess
from colabx.ops.distance_transform import compute_distance_transform

__all__ = [
    "CAN_BE_UNDEFINED",
    "METRICS",
    "evaluate_case",
    "evaluate_folders",
    "hd95",
    "image_diagonal",
    "summarize",
    "write_summary",
]

#: Keys of each class's entry in :func:`evaluate_case`'s result, in CSV column order.
METRICS = ("dice", "sensitivity", "precision", "hd95", "tp", "fp", "fn", "n_pred", "n_ref")


def _as_tensor(x: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must be an integer (or bool) label map, got {t.dtype}")
    return t


def _surface(mask: torch.Tensor) -> torch.Tensor:
    """Mask voxels with a face neighbour outside the mask or outside the array."""
    nd = mask.dim()
    padded = mask.new_zeros([n + 2 for n in mask.shape])
    padded[(slice(1, -1),) * nd] = mask
    inner = mask.clone()
    for ax in range(nd):
        for start in (0, 2):
            sl = [slice(1, -1)] * nd
            sl[ax] = slice(start, start + mask.shape[ax])
            inner &= padded[tuple(sl)]
    return mask & ~inner


def _q95(d: torch.Tensor) -> float:
    return float(np.percentile(d.double().cpu().numpy(), 95))


def image_diagonal(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    """``sqrt(sum((n_a * spacing_a)^2))``: HD95's penalty when exactly one mask is empty."""
    sp = [1.0] * len(shape) if spacing is None else [float(s) for s in spacing]
    return math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, sp, strict=True)))


def hd95(pred: torch.Tensor, ref: torch.Tensor, spacing: Sequence[float] | None = None) -> float:
    """Symmetric 95th-percentile Hausdorff distance of two boolean masks ``[*S]`` (2D or 3D),
    defined as in the module docstring: 0 when both are empty, the image diagonal
    (:func:`image_diagonal`) when exactly one is."""
    if pred.shape != ref.shape or pred.dim() not in (2, 3):
        raise ValueError(f"pred and ref must be 2D or 3D masks of one shape, got "
                         f"{tuple(pred.shape)} and {tuple(ref.shape)}")
    pred, ref = pred.bool(), ref.bool()
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return 0.0
    if not has_pred or not has_ref:
        return image_diagonal(pred.shape, spacing)
    union = pred | ref
    box = []
    for ax in range(union.dim()):
        other = [a for a in range(union.dim()) if a != ax]
        nz = torch.nonzero(union.any(dim=other) if other else union).flatten()
        box.append(slice(int(nz[0]), int(nz[-1]) + 1))
    # Surfaces of the cropped masks equal those of the full ones: voxels beyond the box are
    # background, which the array border rule treats alike.
    sp, sr = _surface(pred[tuple(box)]), _surface(ref[tuple(box)])
    dist = compute_distance_transform(torch.stack([sr, sp]), spacing)
    return max(_q95(dist[0][sp]), _q95(dist[1][sr]))


def evaluate_case(
    pred: np.ndarray | torch.Tensor,
    ref: np.ndarray | torch.Tensor,
    num_classes: int,
    spacing: Sequence[float] | None = None,
    *,
    ignore_label: int | None = None,
    compute_hd95: bool = True,
) -> dict[int, dict[str, float | int]]:
    """Per-class metrics of one case (definitions in the module docstring).

    Args:
        pred: integer label map ``[*S]`` with values in ``[0, num_classes)``.
        ref: integer reference ``[*S]``, values in ``[0, num_classes)`` or ``ignore_label``.
        num_classes: ``c``, classes including background; classes ``1..c-1`` are evaluated.
        spacing: voxel size per axis (mm) for HD95; None = voxel units.
        ignore_label: reference value whose voxels are left out of every metric.
        compute_hd95: False skips the distance transforms (``hd95`` is then NaN).

    Empty prediction or reference: see the table in the module docstring.

    Returns:
        ``{j: {"dice", "sensitivity", "precision", "hd95": float, "tp", "fp", "fn", "n_pred",
        "n_ref": int}}`` for ``j = 1..c-1``.

    Raises:
        ValueError: shape mismatch, values out of range, bad ``num_classes`` or ``spacing``.
        TypeError: non-integer label maps.
    """
    p, r = _as_tensor(pred, "pred"), _as_tensor(ref, "ref")
    if p.shape != r.shape:
        raise ValueError(f"pred shape {tuple(p.shape)} differs from ref shape {tuple(r.shape)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if spacing is not None:
        try:
            spacing = tuple(float(s) for s in spacing)
        except (TypeError, ValueError):
            raise ValueError(f"spacing must be numbers, got {spacing!r}") from None
        if len(spacing) != p.dim() or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"spacing must be {p.dim()} finite values > 0, got {spacing}")
    p, r = p.to(r.device).long(), r.long()
    valid = None if ignore_label is None else r != ignore_label
    for name, t in (("pred", p), ("ref", r)):
        v = t if valid is None else t[valid]
        bad = (v < 0) | (v >= num_classes)
        if bool(bad.any()):
            vals = torch.unique(v[bad])[:10].tolist()
            raise ValueError(f"{name} has value(s) {vals} outside [0, {num_classes}) "
                             f"(num_classes={num_classes})")
    pv, rv = (p, r) if valid is None else (p[valid], r[valid])
    conf = torch.bincount((rv * num_classes + pv).flatten(),
                          minlength=num_classes * num_classes).view(num_classes, num_classes)
    conf = conf.cpu().tolist()  # conf[ref][pred]
    out: dict[int, dict[str, float | int]] = {}
    for j in range(1, num_classes):
        tp = conf[j][j]
        n_pred = sum(row[j] for row in conf)
        n_ref = sum(conf[j])
        fp, fn = n_pred - tp, n_ref - tp
        denom = 2 * tp + fp + fn
        h = math.nan
        if compute_hd95:  # hd95 applies the empty-mask conventions itself
            pm, rm = p == j, r == j
            if valid is not None:
                pm, rm = pm & valid, rm & valid
            h = hd95(pm, rm, spacing)
        out[j] = {
            "dice": 2 * tp / denom if denom else 1.0,
            "sensitivity": tp / n_ref if n_ref else math.nan,
            "precision": tp / n_pred if n_pred else math.nan,
            "hd95": h,
            "tp": tp, "fp": fp, "fn": fn, "n_pred": n_pred, "n_ref": n_ref,
        }
    return out


def _nanmean(values: Iterable[float]) -> float:
    v = [float(x) for x in values if not math.isnan(float(x))]
    return sum(v) / len(v) if v else math.nan


#: Metrics that can be undefined (NaN) for a case; :func:`summarize` counts those cases.
CAN_BE_UNDEFINED = ("dice", "sensitivity", "precision", "hd95")


def summarize(per_case: Iterable[Mapping[int, Mapping[str, float]]]) -> dict[str, Any]:
    """NaN-aware means of :func:`evaluate_case` results.

    Returns:
        ``{"num_cases": n, "mean": {j: {metric: mean over cases}}, "foreground_mean": {metric:
        mean over classes of the class means}, "undefined": {j: {metric: cases}},
        "foreground_undefined": {metric: (class, case) pairs}}``; every metric of
        :data:`METRICS` (counts included) is averaged, NaN entries skipped; ``undefined``
        counts them for :data:`CAN_BE_UNDEFINED` (e.g. precision of cases with nothing
        predicted).
    """
    cases = list(per_case)
    classes = sorted({j for c in cases for j in c})
    mean = {j: {m: _nanmean(c[j][m] for c in cases if j in c) for m in METRICS}
            for j in classes}
    fg = {m: _nanmean(mean[j][m] for j in classes) for m in METRICS}
    undefined = {j: {m: sum(1 for c in cases if j in c and math.isnan(float(c[j][m])))
                     for m in CAN_BE_UNDEFINED} for j in classes}
    fg_undefined = {m: sum(undefined[j][m] for j in classes) for m in CAN_BE_UNDEFINED}
    return {"num_cases": len(cases), "mean": mean, "foreground_mean": fg,
            "undefined": undefined, "foreground_undefined": fg_undefined}


def _label_map(labels: Mapping[str, int] | str | os.PathLike[str]) -> dict[str, int]:
    """name → value from a mapping or a dataset.json (nnU-Net v2 name → int, or MSD
    ``{"0": "background"}``)."""
    if isinstance(labels, (str, os.PathLike)):
        path = Path(labels)
        try:
            js = json.loads(path.read_text(encoding="utf-8"))
            raw = js["labels"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"{path}: cannot read 'labels' from dataset.json ({e})") from e
        if not isinstance(raw, dict):
            raise DatasetError(f"{path}: dataset.json 'labels' must be an object")
        if all(isinstance(v, int) and not isinstance(v, bool) for v in raw.values()):
            return {str(k): v for k, v in raw.items()}
        try:
            return {str(v): int(k) for k, v in raw.items()}
        except ValueError as e:
            raise DatasetError(f"{path}: dataset.json 'labels' are neither name → int (nnU-Net "
                               "v2) nor integer string → name (MSD)") from e
    out = {str(k): v for k, v in labels.items()}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in out.values()):
        raise ValueError(f"labels must map names to non-negative ints, got {dict(labels)}")
    return out


def _case_files(folder: Path, ending: str, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: {what} folder does not exist")
    return {p.name[: -len(ending)]: p for p in sorted(folder.iterdir())
            if p.is_file() and p.name.endswith(ending) and not p.name.startswith(".")}


def evaluate_folders(
    pred_dir: str | os.PathLike[str],
    ref_dir: str | os.PathLike[str],
    labels: Mapping[str, int] | str | os.PathLike[str],
    file_ending: str | None = None,
    *,
    compute_hd95: bool = True,
    progress: bool = False,
    postprocess: str = "none",
) -> dict[str, Any]:
    """Evaluate every prediction file against the reference of the same name.

    Args:
        pred_dir: folder of predicted label maps ``{case}{file_ending}``.
        ref_dir: folder of reference label maps with the same names.
        labels: name → value, or the path of a dataset.json (nnU-Net v2 or MSD). Every nonzero
            value except an ``"ignore"`` label is evaluated; ignore voxels of the reference are
            left out.
        file_ending: ending of the label files; None: the one ending of the reference
            folder's files (``.nii.gz``, ``.nii``, ``.nrrd`` or ``.mha``).
        compute_hd95: False skips HD95.
        progress: show a tqdm bar.
        postprocess: applied to each prediction before scoring
            (:data:`~colabx.inference.postprocess.POSTPROCESSING`; the files are unchanged).

    Returns:
        :func:`summarize`'s dict plus ``"labels"`` (name → value, evaluated classes),
        ``"prediction_folder"``, ``"reference_folder"`` and ``"cases"``: case id →
        ``{"prediction": path, "reference": path, "metrics": {value: {...}}}``.

    Raises:
        DatasetError: case sets differ, a file is unreadable, geometry (shape, spacing, affine)
            differs between a prediction and its reference, or a value is not a declared label;
            the message names the file.
    """
    if postprocess not in POSTPROCESSING:
        raise ValueError(f"postprocess: must be one of {', '.join(POSTPROCESSING)}, got "
                         f"{postprocess!r}")
    label_map = _label_map(labels)
    ignore = label_map.get("ignore")
    classes = {n: v for n, v in label_map.items() if v != 0 and n != "ignore"}
    if not classes:
        raise ValueError(f"labels declare no class to evaluate: {label_map}")
    num_classes = max(classes.values()) + 1
    allowed = set(label_map.values())
    pdir, rdir = Path(pred_dir), Path(ref_dir)
    if file_ending is None:
        file_ending = folder_ending(rdir, "reference")
    preds = _case_files(pdir, file_ending, "prediction")
    refs = _case_files(rdir, file_ending, "reference")
    missing = sorted(set(refs) - set(preds))
    if missing:
        raise DatasetError(f"{pdir / (missing[0] + file_ending)}: prediction missing for "
                           f"{len(missing)} reference case(s) of {rdir}: {_some(missing)}")
    extra = sorted(set(preds) - set(refs))
    if extra:
        raise DatasetError(f"{preds[extra[0]]}: no reference {rdir / (extra[0] + file_ending)} "
                           f"for {len(extra)} prediction(s): {_some(extra)}")
    if not refs:
        raise DatasetError(f"{rdir}: no reference files ending with {file_ending!r}")

    ids = sorted(refs)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(ids), desc="evaluating", unit="case")
    cases: dict[str, Any] = {}
    try:
        for cid in ids:
            r = read_label_map(refs[cid], "reference", allowed)
            p = read_label_map(preds[cid], "prediction", allowed - {ignore})
            if p.data.shape != r.data.shape:
                raise DatasetError(f"{p.path}: prediction shape {p.data.shape} differs from "
                                   f"reference shape {r.data.shape} ({r.path})")
            check_same_grid(r, p, "prediction")
            pred = p.data if postprocess == "none" else apply_postprocess(p.data, postprocess)
            m = evaluate_case(pred, r.data, num_classes, r.spacing, ignore_label=ignore,
                              compute_hd95=compute_hd95)
            cases[cid] = {"prediction": str(p.path), "reference": str(r.path),
                          "metrics": {v: m[v] for v in sorted(classes.values())}}
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    result = summarize(c["metrics"] for c in cases.values())
    result.update({"labels": classes, "prediction_folder": str(pdir),
                   "reference_folder": str(rdir), "postprocess": postprocess, "cases": cases})
    return result


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    return x


def check_summary_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as the JSON summary's, refused if it ends in ``.csv``: the per-case CSV beside it
    takes that name and would replace the JSON.

    Raises:
        ValueError: ``path`` ends in ``.csv``.
    """
    out = Path(path)
    if out.suffix.lower() == ".csv":
        raise ValueError(f"{out}: the summary is JSON and its per-case CSV is written beside it "
                         f"as {out.name}, so the summary's path cannot end in .csv; give "
                         f"{out.with_suffix('.json')}")
    return out


def write_summary(result: Mapping[str, Any], path: str | os.PathLike[str]) -> list[Path]:
    """Write an evaluation result as JSON (NaN → ``null``), and, when it has ``"cases"``, a CSV
    of per-case rows beside it (``path`` with suffix ``.csv``: columns case, class, name and
    :data:`METRICS`; NaN written as ``nan``). Both files are written atomically.

    Returns:
        The paths written.

    Raises:
        ValueError: ``path`` ends in ``.csv`` (:func:`check_summary_path`).
    """
    out = check_summary_path(path)
    text = json.dumps(_jsonable(result), indent=1, allow_nan=False)
    atomic_write_text(out, text)
    written = [out]
    if "cases" in result:
        names = {v: n for n, v in result.get("labels", {}).items()}
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["case", "class", "name", *METRICS])
        for cid, case in result["cases"].items():
            for j, m in case["metrics"].items():
                w.writerow([cid, j, names.get(j, ""), *(m[k] for k in METRICS)])
        csv_path = out.with_suffix(".csv")
        atomic_write_text(csv_path, buf.getvalue())
        written.append(csv_path)
    return written


def _some(names: list[str], shown: int = 5) -> str:
    """Up to ``shown`` names, with how many more there are."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more

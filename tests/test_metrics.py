"""Metrics: hand-computed cases, the empty-mask conventions, HD95 against a brute-force numpy
recomputation (scipy erosion surfaces, all pairwise distances), folder evaluation and the
summary files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from colabx.data.nifti import DatasetError
from colabx.inference import (
    METRICS,
    evaluate_case,
    evaluate_folders,
    hd95,
    summarize,
    write_summary,
)


def _brute_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """max of the two directed 95th percentiles of surface-to-surface distances, surfaces from
    scipy's face-connectivity erosion with a background border."""
    st = ndi.generate_binary_structure(a.ndim, 1)
    sa = a & ~ndi.binary_erosion(a, st, border_value=0)
    sb = b & ~ndi.binary_erosion(b, st, border_value=0)
    pa = np.argwhere(sa) * np.asarray(spacing, np.float64)
    pb = np.argwhere(sb) * np.asarray(spacing, np.float64)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_hand_computed_counts_and_scores():
    ref = np.array([[0, 1, 1, 1, 0, 2, 2]])
    pred = np.array([[1, 1, 1, 0, 0, 2, 0]])
    m = evaluate_case(pred, ref, 3, compute_hd95=False)
    assert (m[1]["tp"], m[1]["fp"], m[1]["fn"]) == (2, 1, 1)
    assert m[1]["dice"] == pytest.approx(4 / 6)
    assert m[1]["sensitivity"] == pytest.approx(2 / 3)
    assert m[1]["precision"] == pytest.approx(2 / 3)
    assert (m[2]["tp"], m[2]["fp"], m[2]["fn"], m[2]["n_pred"], m[2]["n_ref"]) == (1, 0, 1, 1, 2)
    assert m[2]["dice"] == pytest.approx(2 / 3)
    assert m[2]["sensitivity"] == pytest.approx(0.5)
    assert m[2]["precision"] == 1.0
    assert math.isnan(m[1]["hd95"])  # not computed
    assert set(m) == {1, 2} and set(m[1]) == set(METRICS)


def test_empty_conventions():
    z = np.zeros((5, 6), np.uint8)
    one = z.copy()
    one[2, 3] = 1
    both_empty = evaluate_case(z, z, 2)[1]
    assert both_empty["dice"] == 1.0
    assert all(math.isnan(both_empty[k]) for k in ("sensitivity", "precision", "hd95"))
    missed = evaluate_case(z, one, 2)[1]  # nothing predicted
    assert missed["dice"] == 0.0 and missed["sensitivity"] == 0.0
    assert math.isnan(missed["precision"]) and math.isnan(missed["hd95"])
    spurious = evaluate_case(one, z, 2)[1]  # nothing to find
    assert spurious["dice"] == 0.0 and spurious["precision"] == 0.0
    assert math.isnan(spurious["sensitivity"]) and math.isnan(spurious["hd95"])


def test_hd95_hand_computed():
    a = np.zeros((6, 7), bool)
    b = a.copy()
    a[0, 0] = True
    b[3, 4] = True
    assert hd95(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(5.0)
    assert hd95(torch.from_numpy(a), torch.from_numpy(b), (2.0, 1.0)) == pytest.approx(
        math.hypot(6, 4))
    # Identical masks: 0. A square and the same square shifted by 2 along x (spacing 0.5): every
    # surface voxel is within 1 mm of the other surface, most exactly 1 mm away.
    s = np.zeros((12, 12), bool)
    s[2:7, 2:7] = True
    assert hd95(torch.from_numpy(s), torch.from_numpy(s)) == 0.0
    t = np.roll(s, 2, axis=0)
    assert hd95(torch.from_numpy(s), torch.from_numpy(t), (0.5, 1.0)) == pytest.approx(1.0)


@pytest.mark.parametrize("shape,spacing", [((17, 23), (0.7, 1.3)), ((9, 14, 11), (2.5, 0.8, 1.0))])
def test_hd95_matches_brute_force(shape, spacing):
    rng = np.random.default_rng(3)
    for _ in range(3):
        a = ndi.binary_dilation(rng.random(shape) > 0.97, iterations=2)
        b = ndi.binary_dilation(rng.random(shape) > 0.97, iterations=1)
        a[(0,) * len(shape)] = True  # a voxel on the array border: surface by the border rule
        got = hd95(torch.from_numpy(a), torch.from_numpy(b), spacing)
        assert got == pytest.approx(_brute_hd95(a, b, spacing), rel=1e-5, abs=1e-5)


def test_counts_match_numpy_multiclass_and_ignore():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 4, size=(8, 9, 10))
    pred = rng.integers(0, 4, size=(8, 9, 10))
    ref[0] = 255  # ignore label
    m = evaluate_case(torch.from_numpy(pred), ref, 4, (1.0, 2.0, 3.0), ignore_label=255)
    keep = ref != 255
    for j in (1, 2, 3):
        p, r = (pred == j) & keep, (ref == j) & keep
        tp, fp, fn = int((p & r).sum()), int((p & ~r).sum()), int((~p & r).sum())
        assert (m[j]["tp"], m[j]["fp"], m[j]["fn"]) == (tp, fp, fn)
        assert m[j]["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
        assert m[j]["hd95"] == pytest.approx(_brute_hd95(p, r, (1.0, 2.0, 3.0)), rel=1e-5)


def test_evaluate_case_errors():
    a = np.zeros((4, 4), np.int64)
    with pytest.raises(ValueError, match="shape"):
        evaluate_case(a, np.zeros((4, 5), np.int64), 2)
    with pytest.raises(ValueError, match=r"pred has value\(s\) \[3\]"):
        evaluate_case(a + 3, a, 3)
    with pytest.raises(TypeError, match="ref must be an integer"):
        evaluate_case(a, a.astype(np.float32), 2)
    with pytest.raises(ValueError, match="spacing"):
        evaluate_case(a, a, 2, (1.0, 0.0))
    with pytest.raises(ValueError, match="num_classes"):
        evaluate_case(a, a, 1)


def test_summarize_nan_aware():
    nan = math.nan
    cases = [
        {1: dict.fromkeys(METRICS, 1.0) | {"precision": nan}, 2: dict.fromkeys(METRICS, 0.0)},
        {1: dict.fromkeys(METRICS, 0.5) | {"precision": nan}, 2: dict.fromkeys(METRICS, nan)},
    ]
    s = summarize(cases)
    assert s["num_cases"] == 2
    assert s["mean"][1]["dice"] == pytest.approx(0.75)
    assert math.isnan(s["mean"][1]["precision"])
    assert s["mean"][2]["dice"] == 0.0
    assert s["foreground_mean"]["dice"] == pytest.approx(0.375)
    assert s["foreground_mean"]["precision"] == 0.0  # class 1 undefined, class 2 is 0


def _save(path: Path, arr: np.ndarray, spacing=(1.0, 1.0, 2.0), shift=0.0) -> None:
    a = np.diag([*spacing, 1.0])
    a[0, 3] = shift
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr.astype(np.uint8), a), str(path))


def _folders(tmp_path: Path, n: int = 3):
    rng = np.random.default_rng(1)
    refs = {}
    for k in range(n):
        ref = np.zeros((10, 12, 6), np.uint8)
        ref[2:7, 3:9, 1:5] = 1
        ref[3:5, 4:6, 2:4] = 2
        pred = ref.copy()
        pred[rng.random(ref.shape) > 0.9] = 0
        if k == n - 1:
            pred[pred == 2] = 1  # class 2 missed entirely in one case
        _save(tmp_path / "ref" / f"c{k}.nii.gz", ref)
        _save(tmp_path / "pred" / f"c{k}.nii.gz", pred)
        refs[f"c{k}"] = (pred, ref)
    return refs


def test_evaluate_folders_and_write_summary(tmp_path):
    refs = _folders(tmp_path)
    labels = {"background": 0, "organ": 1, "tumour": 2}
    res = evaluate_folders(tmp_path / "pred", tmp_path / "ref", labels)
    assert res["num_cases"] == 3 and res["labels"] == {"organ": 1, "tumour": 2}
    for cid, (pred, ref) in refs.items():
        want = evaluate_case(pred, ref, 3, (1.0, 1.0, 2.0))
        got = res["cases"][cid]["metrics"]
        for j in (1, 2):
            for k in METRICS:
                assert got[j][k] == pytest.approx(want[j][k], nan_ok=True)
    assert res["cases"]["c2"]["metrics"][2]["dice"] == 0.0
    assert res["mean"][2]["dice"] == pytest.approx(
        np.mean([res["cases"][c]["metrics"][2]["dice"] for c in refs]))
    # dataset.json in both layouts gives the same result
    for js in ({"labels": labels}, {"labels": {"0": "background", "1": "organ", "2": "tumour"}}):
        (tmp_path / "dataset.json").write_text(json.dumps(js))
        r2 = evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "dataset.json",
                              compute_hd95=False)
        assert r2["mean"][1]["dice"] == pytest.approx(res["mean"][1]["dice"])

    (tmp_path / "out").mkdir()
    paths = write_summary(res, tmp_path / "out" / "summary.json")
    js = json.loads(paths[0].read_text())  # strict JSON: NaN became null
    assert js["cases"]["c2"]["metrics"]["2"]["hd95"] is None
    assert js["mean"]["1"]["dice"] == pytest.approx(res["mean"][1]["dice"])
    rows = paths[1].read_text().splitlines()
    assert rows[0].split(",")[:3] == ["case", "class", "name"] and len(rows) == 1 + 3 * 2
    assert rows[-1].startswith("c2,2,tumour,0.0,")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.csv", "summary.json"]


def test_evaluate_folders_errors(tmp_path):
    _folders(tmp_path, 2)
    labels = {"background": 0, "organ": 1, "tumour": 2}
    (tmp_path / "pred" / "c1.nii.gz").rename(tmp_path / "c1.nii.gz")
    with pytest.raises(DatasetError, match=r"pred/c1\.nii\.gz: prediction missing"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", labels)
    _save(tmp_path / "pred" / "c9.nii.gz", np.zeros((10, 12, 6)))
    (tmp_path / "c1.nii.gz").rename(tmp_path / "pred" / "c1.nii.gz")
    with pytest.raises(DatasetError, match=r"c9\.nii\.gz: no reference"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", labels)
    (tmp_path / "pred" / "c9.nii.gz").unlink()
    _save(tmp_path / "pred" / "c1.nii.gz", np.zeros((10, 12, 6)), shift=3.0)
    with pytest.raises(DatasetError, match=r"pred/c1\.nii\.gz: prediction affine differs"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", labels)
    _save(tmp_path / "pred" / "c1.nii.gz", np.full((10, 12, 6), 5))
    with pytest.raises(DatasetError, match=r"pred/c1\.nii\.gz: prediction map has value\(s\) "
                                           r"\[5\]"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", labels)
    _save(tmp_path / "pred" / "c1.nii.gz", np.zeros((10, 12, 7)))
    with pytest.raises(DatasetError, match=r"pred/c1\.nii\.gz: prediction shape"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", labels)
    with pytest.raises(DatasetError, match="does not exist"):
        evaluate_folders(tmp_path / "nope", tmp_path / "ref", labels)

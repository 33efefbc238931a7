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

from colabx.data.image_io import DatasetError
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
    diagonal = math.hypot(5 * 2.0, 6 * 0.5)  # the penalty: the image's diagonal in mm
    both_empty = evaluate_case(z, z, 2, (2.0, 0.5))[1]
    assert both_empty["dice"] == 1.0 and both_empty["hd95"] == 0.0
    assert all(math.isnan(both_empty[k]) for k in ("sensitivity", "precision"))
    missed = evaluate_case(z, one, 2, (2.0, 0.5))[1]  # nothing predicted
    assert missed["dice"] == 0.0 and missed["sensitivity"] == 0.0
    assert math.isnan(missed["precision"]) and missed["hd95"] == pytest.approx(diagonal)
    spurious = evaluate_case(one, z, 2, (2.0, 0.5))[1]  # nothing to find
    assert spurious["dice"] == 0.0 and spurious["precision"] == 0.0
    assert math.isnan(spurious["sensitivity"]) and spurious["hd95"] == pytest.approx(diagonal)


def test_missing_a_case_is_never_better_than_one_stray_voxel():
    """A case predicted empty must not score a better mean HD95 or precision than the same case
    with the lesion found plus one stray voxel far away."""
    ref = np.zeros((40, 40, 20), np.int64)
    ref[5:9, 5:9, 5:9] = 1
    found = ref.copy()
    found[35, 35, 18] = 1
    good = np.zeros_like(ref)
    good[20:24, 20:24, 10:14] = 1
    sp = (1.0, 1.0, 2.5)
    for other in (good,):
        empty = summarize([evaluate_case(np.zeros_like(ref), ref, 2, sp),
                           evaluate_case(other, other, 2, sp)])
        stray = summarize([evaluate_case(found, ref, 2, sp), evaluate_case(other, other, 2, sp)])
        assert empty["foreground_mean"]["hd95"] > stray["foreground_mean"]["hd95"]
        assert empty["foreground_undefined"]["precision"] == 1
        assert stray["foreground_undefined"]["precision"] == 0


def test_undefined_counts_are_reported_beside_the_means(tmp_path):
    from colabx.train.evaluation import format_metrics

    z = np.zeros((6, 6), np.int64)
    one = z.copy()
    one[1:3, 1:3] = 1
    s = summarize([evaluate_case(z, one, 2), evaluate_case(one, one, 2), evaluate_case(z, z, 2)])
    assert s["undefined"][1] == {"dice": 0, "sensitivity": 1, "precision": 2, "hd95": 0}
    assert s["foreground_undefined"]["precision"] == 2
    assert s["mean"][1]["precision"] == 1.0  # the one defined case
    text = format_metrics({**s, "cases": {}})
    assert "precision in 2 case(s) (nothing predicted)" in text
    assert "sensitivity in 1 case(s) (empty reference)" in text
    write_summary(s, tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text())["foreground_undefined"]["precision"] == 2
    # two ROI classes: the counts are per (class, case), and say so
    two = z.copy()
    two[4:, 4:] = 2
    s2 = summarize([evaluate_case(z, two, 3), evaluate_case(two, two, 3)])
    assert s2["foreground_undefined"]["sensitivity"] == 2  # class 1 in both cases
    assert "sensitivity in 2 (class, case) pair(s) (empty reference)" in \
        format_metrics({**s2, "cases": {}})


@pytest.mark.parametrize("far_in", ["pred", "ref"])
def test_hd95_is_symmetric_with_the_far_blob_on_either_side(far_in):
    """A far-away extra blob raises HD95 whichever mask holds it (a one-directional HD95 would
    see it from one side only)."""
    a = np.zeros((30, 30, 12), bool)
    a[4:9, 4:9, 3:7] = True
    b = a.copy()
    b[24:27, 24:27, 8:10] = True  # far blob, 8 % of b's surface
    pred, ref = (b, a) if far_in == "pred" else (a, b)
    sp = (0.8, 0.8, 2.0)
    got = hd95(torch.from_numpy(pred), torch.from_numpy(ref), sp)
    assert got == pytest.approx(_brute_hd95(pred, ref, sp), rel=1e-6)
    assert got > 10.0
    assert got == pytest.approx(hd95(torch.from_numpy(ref), torch.from_numpy(pred), sp))


def _monai_scores(pred: np.ndarray, ref: np.ndarray, spacing):
    """MONAI's DiceMetric (ignore_empty=False), HausdorffDistanceMetric(percentile=95) and the
    confusion-matrix precision and sensitivity of class 1."""
    monai = pytest.importorskip("monai.metrics")

    def onehot(m):
        t = torch.from_numpy(m.astype(np.int64))
        return torch.stack([t == 0, t == 1])[None].float()

    p, r = onehot(pred), onehot(ref)
    dice = monai.DiceMetric(include_background=False, ignore_empty=False)(p, r).item()
    hd = monai.HausdorffDistanceMetric(include_background=False, percentile=95)(
        p, r, spacing=list(spacing)).item()
    cm = monai.get_confusion_matrix(p, r, include_background=False)
    prec = monai.compute_confusion_matrix_metric("precision", cm).item()
    sens = monai.compute_confusion_matrix_metric("sensitivity", cm).item()
    return dice, sens, prec, hd


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("seed", range(6))
def test_metrics_against_monai_on_random_anisotropic_cases(seed):
    """MONAI (an independent implementation) agrees on every case where both define a value;
    where a mask is empty, MONAI's HD95 is NaN and colabx's is the documented 0 / diagonal."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(9, 24, size=3))
    spacing = tuple(float(v) for v in rng.uniform(0.5, 3.0, size=3))
    blobs = [ndi.binary_dilation(rng.random(shape) > 0.985, iterations=2) for _ in range(2)]
    cases = [(blobs[0], blobs[1]), (np.zeros(shape, bool), blobs[1]),
             (blobs[0], np.zeros(shape, bool)), (np.zeros(shape, bool), np.zeros(shape, bool))]
    for pred, ref in cases:
        ours = evaluate_case(pred.astype(np.int64), ref.astype(np.int64), 2, spacing)[1]
        dice, sens, prec, hd = _monai_scores(pred, ref, spacing)
        assert ours["dice"] == pytest.approx(dice, abs=1e-6)
        for name, theirs in (("sensitivity", sens), ("precision", prec)):
            assert math.isnan(ours[name]) == math.isnan(theirs), name
            if not math.isnan(theirs):
                assert ours[name] == pytest.approx(theirs, abs=1e-6), name
        if pred.any() and ref.any():
            assert ours["hd95"] == pytest.approx(hd, rel=1e-5)
        else:
            assert math.isnan(hd)  # MONAI leaves it undefined; colabx gives the penalty
            want = 0.0 if not pred.any() and not ref.any() else math.sqrt(
                sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True)))
            assert ours["hd95"] == pytest.approx(want)


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
    assert js["cases"]["c2"]["metrics"]["2"]["precision"] is None  # nothing predicted
    diagonal = math.sqrt(10**2 + 12**2 + (6 * 2.0) ** 2)
    assert js["cases"]["c2"]["metrics"]["2"]["hd95"] == pytest.approx(diagonal)
    assert js["undefined"]["2"]["precision"] == 1
    assert js["mean"]["1"]["dice"] == pytest.approx(res["mean"][1]["dice"])
    rows = paths[1].read_text().splitlines()
    assert rows[0].split(",")[:3] == ["case", "class", "name"] and len(rows) == 1 + 3 * 2
    assert rows[-1].startswith("c2,2,tumour,0.0,")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.csv", "summary.json"]
    # a summary path ending in .csv would be replaced by the per-case CSV: refused, nothing written
    with pytest.raises(ValueError, match=r"summary\.CSV: the summary is JSON.*cannot end in \.csv"):
        write_summary(res, tmp_path / "out" / "summary.CSV")
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
    for k in range(10, 17):
        _save(tmp_path / "pred" / f"c{k}.nii.gz", np.zeros((10, 12, 6)))
    with pytest.raises(DatasetError, match=r"no reference .* for 8 prediction\(s\): c10, c11, "
                                           r"c12, c13, c14 and 3 more$"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", labels)
    for k in [9, *range(10, 17)]:
        (tmp_path / "pred" / f"c{k}.nii.gz").unlink()
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

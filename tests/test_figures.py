"""``colabx figures`` on tiny trained runs (each PNG opened and checked for size and content) and
the context-coherence measure on maps of known structure."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from colabx.cli import main
from colabx.data.phantom import write_phantom
from colabx.inference.analysis import neighbour_ratio
from colabx.viz.run_figures import FIGURES

TINY = ["--epochs", "1", "--iterations", "2", "--base-features", "4", "--num-pool", "2",
        "--patch-size", "16", "16", "8", "--num-workers", "0", "--no-progress", "--threads", "1",
        "--val-cases", "1", "--snapshot-every", "0"]


def test_neighbour_ratio_tells_smooth_from_alternating():
    ramp = torch.linspace(0, 1, 40)
    smooth = torch.stack([ramp[:, None, None].expand(40, 6, 5)] * 2)
    assert neighbour_ratio(smooth)[0] == pytest.approx(0.5)
    checker = torch.zeros(2, 8, 9, 10)
    checker[0, ::2] = 1.0
    checker[1] = 1 - checker[0]
    r = neighbour_ratio(checker)
    assert r[0] > 20 and np.isnan(r[1]) and np.isnan(r[2])  # constant along the other axes
    region = torch.zeros(8, 9, 10, dtype=torch.bool)
    region[:4] = True
    assert neighbour_ratio(checker, region)[0] > 20


def test_figures_of_a_vanilla_and_a_colab_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLABX_CACHE", str(tmp_path / "cache"))
    data = write_phantom(tmp_path / "phantom", preset="tiny", num_cases=3, num_test=2)
    runs = []
    for mode in ("vanilla", "colab"):
        runs.append(tmp_path / mode)
        assert main(["train", str(data), "--mode", mode, "--out", str(runs[-1]), *TINY]) == 0
    out = tmp_path / "figs"
    assert main(["figures", *map(str, runs), "--out", str(out)]) == 0
    assert "neighbour ratio per axis" in capsys.readouterr().out
    for name, min_width in zip(FIGURES, (700, 1000, 700), strict=True):
        img = mpimg.imread(out / name)
        assert img.shape[1] >= min_width and img.shape[0] >= 250, name
        assert float(img[..., :3].std()) > 0.05, f"{name} is blank"
    report = json.loads((out / "figures.json").read_text())
    colab = report["runs"][str(runs[1])]
    assert len(colab["neighbour_ratio_mean"]) == 3 and len(colab["cases"]) == 2
    assert "neighbour_ratio" not in report["runs"][str(runs[0])]  # vanilla has no generator


def _phantom_2d(src, dst):
    """The tiny phantom as a 2D dataset: each case's axial slice with the most ROI voxels."""
    import shutil

    import nibabel as nib

    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (dst / sub).mkdir(parents=True)
        labels = sub.replace("images", "labels")
        for f in sorted((src / sub).glob("*.nii.gz")):
            cid = f.name.split("_0000")[0].removesuffix(".nii.gz")
            roi = np.asarray(nib.load(src / labels / f"{cid}.nii.gz").dataobj) > 0
            k = int(np.argmax(roi.sum((0, 1))))
            img = nib.load(f)
            sliced = nib.Nifti1Image(np.asarray(img.dataobj)[..., k], img.affine)
            nib.save(sliced, dst / sub / f.name)
    shutil.copy(src / "dataset.json", dst / "dataset.json")
    return dst


def test_figures_of_a_2d_run(tmp_path, monkeypatch):
    """Fig. 8 shows a 2D case whole (it sliced the last axis and drew a 1-D row, a crash)."""
    monkeypatch.setenv("COLABX_CACHE", str(tmp_path / "cache"))
    data = _phantom_2d(write_phantom(tmp_path / "phantom", preset="tiny", num_cases=3,
                                     num_test=2), tmp_path / "p2d")
    run = tmp_path / "colab2d"
    tiny_2d = [a for a in TINY if a != "8"]  # --patch-size 16 16
    assert main(["train", str(data), "--mode", "colab", "--out", str(run), *tiny_2d]) == 0
    out = tmp_path / "figs"
    assert main(["figures", str(run), "--out", str(out)]) == 0
    for name in FIGURES:
        img = mpimg.imread(out / name)
        assert float(img[..., :3].std()) > 0.05, f"{name} is blank"
    report = json.loads((out / "figures.json").read_text())
    assert len(report["runs"][str(run)]["neighbour_ratio_mean"]) == 2

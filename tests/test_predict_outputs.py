"""``colabx predict`` on the tiny phantom: probabilities and context maps in each input image's
geometry, MSD-named and 4D test images, and a ``.mha`` copy of the phantom that trains,
predicts and evaluates exactly as the NIfTI original."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from colabx.cli import main
from colabx.data.datasets import DatasetError
from colabx.data.image_io import read_image, write_image
from colabx.data.phantom import write_phantom
from colabx.inference.predict import predict_labels
from colabx.inference.run import predict_folder
from colabx.train.config import TrainConfig
from colabx.train.trainer import Trainer

CASE = "phantom_test_000"


def _cfg(dataset) -> TrainConfig:
    return TrainConfig(dataset=str(dataset), mode="colab", t=2, epochs=1, iterations=2,
                       batch_size=2, base_features=4, max_features=16, num_pool=2,
                       patch_size=[16, 16, 8], val_cases=1, num_workers=0, progress=False,
                       threads=1, snapshot_every=0, device="cpu", augment=False)


def _to_mha(src, dst):
    """A copy of an nnU-Net folder with every image file converted to .mha."""
    for p in sorted(src.rglob("*.nii.gz")):
        vol = read_image(p)
        out = dst / p.relative_to(src).parent / p.name.replace(".nii.gz", ".mha")
        write_image(vol.data, out, affine=vol.affine)
    js = json.loads((src / "dataset.json").read_text())
    (dst / "dataset.json").write_text(json.dumps({**js, "file_ending": ".mha"}))
    return dst


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    data = write_phantom(root / "phantom", preset="tiny", num_cases=3, num_test=1)
    tr = Trainer(_cfg(data), root / "run", echo=lambda s: None)
    tr.run()
    return root, data, tr


def _predict(run, images, out, *extra) -> int:
    return main(["predict", str(run), str(images), str(out), "--device", "cpu",
                 "--save-probabilities", "--save-contexts", *extra])


def _check_geometry(image_path, out, ending=".nii.gz"):
    """The probabilities, context map and label map of CASE in ``out`` have the image's
    spatial shape and affine; they agree with each other."""
    img = read_image(image_path)
    shape = img.data.shape[:3]
    npz = np.load(out / f"{CASE}.npz", allow_pickle=False)
    prob = npz["probabilities"]
    assert prob.dtype == np.float32 and prob.shape == (3, *shape)  # K = c + t - 1 = 3
    assert list(npz["channels"]) == ["context 0", "tumour", "context 1"]
    np.testing.assert_array_equal(npz["affine"], img.affine)
    np.testing.assert_allclose(npz["spacing"], img.spacing)
    np.testing.assert_allclose(prob.sum(0), 1.0, atol=1e-5)
    ctx, lab = read_image(out / "contexts" / f"{CASE}{ending}"), read_image(out / f"{CASE}{ending}")
    for v in (ctx, lab):
        assert v.data.shape == shape
        np.testing.assert_allclose(v.affine, img.affine, atol=1e-6)
    np.testing.assert_array_equal(ctx.data, np.where(prob[2] > prob[0], 1, 0))
    logp = torch.from_numpy(np.log(np.maximum(prob, 1e-30)))[None]
    agree = (predict_labels(logp, 2)[0].numpy() == lab.data).mean()
    assert agree > 0.999, agree  # softmax keeps the order of the logits (up to rounding ties)
    return prob, ctx.data, lab.data


def test_probabilities_and_contexts_in_the_image_geometry(trained, tmp_path, capsys):
    root, data, _ = trained
    out = tmp_path / "nnunet"
    assert _predict(root / "run", data / "imagesTs", out) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "colabx_predict.json", "contexts", f"{CASE}.nii.gz", f"{CASE}.npz"]
    marker = json.loads((out / "colabx_predict.json").read_text())
    assert marker["mirror"] is False and marker["probabilities"] and marker["contexts"]
    ref = _check_geometry(data / "imagesTs" / f"{CASE}_0000.nii.gz", out)
    # MSD naming ({case}.nii.gz) and one 4D file holding the channel give the same outputs
    msd, four = tmp_path / "msd_in", tmp_path / "4d_in"
    msd.mkdir()
    four.mkdir()
    shutil.copy(data / "imagesTs" / f"{CASE}_0000.nii.gz", msd / f"{CASE}.nii.gz")
    img = nib.load(str(msd / f"{CASE}.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., None], img.affine),
             str(four / f"{CASE}.nii.gz"))
    for src in (msd, four):
        dst = tmp_path / f"{src.name}_out"
        assert _predict(root / "run", src, dst) == 0
        got = _check_geometry(src / f"{CASE}.nii.gz", dst)
        for a, b in zip(got, ref, strict=True):
            np.testing.assert_array_equal(a, b)
    # --no-mirror is accepted; mirroring (on by default on CUDA) is asked for explicitly here
    assert main(["predict", str(root / "run"), str(msd), str(tmp_path / "m"), "--device",
                 "cpu", "--mirror"]) == 0
    assert json.loads((tmp_path / "m" / "colabx_predict.json").read_text())["mirror"] is True


def test_bad_inputs_are_clear_errors(trained, tmp_path, capsys):
    root, data, _ = trained
    run = root / "run"
    image = data / "imagesTs" / f"{CASE}_0000.nii.gz"
    both = tmp_path / "both"
    both.mkdir()
    shutil.copy(image, both / f"{CASE}_0000.nii.gz")
    shutil.copy(image, both / f"{CASE}.nii.gz")
    assert _predict(run, both, tmp_path / "o1") == 2
    assert "is both a whole image file and channel files" in capsys.readouterr().err
    two = tmp_path / "two"
    two.mkdir()
    img = nib.load(str(image))
    arr = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(np.stack([arr, arr], -1), img.affine), str(two / f"{CASE}.nii.gz"))
    assert _predict(run, two, tmp_path / "o2") == 2
    assert "image has 2 channels" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()  # nothing left behind
    four_digits = tmp_path / "four_digits"  # an MSD-style name that reads as a channel file
    four_digits.mkdir()
    shutil.copy(image, four_digits / "phantom_0007.nii.gz")
    assert _predict(run, four_digits, tmp_path / "o4") == 2
    assert "a name ending in _XXXX is channel XXXX of a case" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _predict(run, empty, tmp_path / "o3") == 2
    assert "holds no image files" in capsys.readouterr().err
    # files that are no image are left out, as nnU-Net's prediction does; an image of another
    # ending is still an error
    notes = tmp_path / "notes"
    notes.mkdir()
    shutil.copy(image, notes / f"{CASE}_0000.nii.gz")
    (notes / "README.txt").write_text("scans of 2026-12-03")
    assert main(["predict", str(run), str(notes), str(tmp_path / "o5"), "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "o5").iterdir()) == [
        "colabx_predict.json", f"{CASE}.nii.gz"]
    (notes / "other_0000.nii").write_bytes(b"")
    assert main(["predict", str(run), str(notes), str(tmp_path / "o6"), "--device", "cpu"]) == 2
    assert "mixes file endings" in capsys.readouterr().err
    with pytest.raises(DatasetError, match=r"other_0000\.nii: image file has the wrong file "
                                           r"ending \(expected '\.nii\.gz'\)"):
        predict_folder(run, notes, tmp_path / "o7", device="cpu", file_ending=".nii.gz",
                       progress=False)


def test_a_missing_run_or_checkpoint_is_named(trained, tmp_path, capsys):
    root, data, _ = trained
    images = data / "imagesTs"
    assert _predict(tmp_path / "nope" / "checkpoint_final.pth", images, tmp_path / "o") == 2
    assert f"{tmp_path / 'nope' / 'checkpoint_final.pth'}: no such checkpoint file" in \
        capsys.readouterr().err
    assert _predict(tmp_path / "nope", images, tmp_path / "o") == 2
    assert f"{tmp_path / 'nope'}: no such run folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_case_failing_midway_leaves_nothing_half_done(trained, tmp_path, capsys):
    root, data, _ = trained
    run = root / "run"
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(data / "imagesTs" / f"{CASE}_0000.nii.gz", inputs / "a_0000.nii.gz")
    raw = (data / "imagesTs" / f"{CASE}_0000.nii.gz").read_bytes()
    (inputs / "b_0000.nii.gz").write_bytes(raw[:len(raw) // 2])  # truncated: read fails late
    assert _predict(run, inputs, tmp_path / "new") == 2
    assert "b_0000.nii.gz" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # case a had been written: it goes with the folder
    assert _predict(run, inputs, tmp_path / "made" / "for" / "it") == 2
    assert not (tmp_path / "made").exists()  # so do the parent folders it created
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("kept")
    assert _predict(run, inputs, mine, "--overwrite") == 2
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_mha_copy_trains_predicts_and_evaluates_like_nifti(trained, tmp_path, capsys):
    root, data, nii = trained
    mha_data = _to_mha(data, tmp_path / "phantom_mha")
    mha = Trainer(_cfg(mha_data), tmp_path / "run", echo=lambda s: None)
    for cid in nii.pre.case_ids:  # the same preprocessed arrays
        a, b = nii.pre.load_case(cid), mha.pre.load_case(cid)
        for key in ("image", "label", "distance"):
            np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)
    assert mha.pre.target_spacing == nii.pre.target_spacing
    result = mha.run()
    for name, t in nii.f.state_dict().items():
        assert torch.equal(t, mha.f.state_dict()[name]), name
    ref = json.loads((root / "run" / "evaluation.json").read_text())
    assert result["foreground_mean"] == pytest.approx(ref["foreground_mean"], nan_ok=True)
    assert (tmp_path / "run" / "predictions_test" / f"{CASE}.mha").is_file()
    summaries = []
    for run, folder in ((root / "run", data), (tmp_path / "run", mha_data)):
        out = tmp_path / f"pred-{folder.name}"
        assert _predict(run, folder / "imagesTs", out) == 0
        assert main(["evaluate", str(out), str(folder / "labelsTs"), "--labels",
                     str(folder / "dataset.json")]) == 0
        summaries.append(json.loads((out / "summary.json").read_text()))
    assert summaries[0]["foreground_mean"] == summaries[1]["foreground_mean"]
    prob, ctx, lab = _check_geometry(mha_data / "imagesTs" / f"{CASE}_0000.mha",
                                     tmp_path / f"pred-{mha_data.name}", ".mha")
    ref_out = tmp_path / f"pred-{data.name}"
    np.testing.assert_array_equal(prob, np.load(ref_out / f"{CASE}.npz")["probabilities"])
    np.testing.assert_array_equal(lab, read_image(ref_out / f"{CASE}.nii.gz").data)
    np.testing.assert_array_equal(ctx, read_image(ref_out / "contexts" / f"{CASE}.nii.gz").data)


def _one_slice_copy(src, dst, axis):
    """A copy of an nnU-Net folder whose images and labels are each case's slice with the most
    ROI, stored as 3D files with that axis of size 1 (nnU-Net's 2D layout: ``(1, X, Y)`` for
    ``axis`` 0, ``(X, Y, 1)`` for 2), the affine placing the slice where it was."""
    for images in ("imagesTr", "imagesTs"):
        labels = images.replace("images", "labels")
        for f in sorted((src / images).glob("*.nii.gz")):
            cid = f.name.removesuffix("_0000.nii.gz")
            lab = nib.load(src / labels / f"{cid}.nii.gz")
            k = int(np.argmax((np.asarray(lab.dataobj) > 0).sum((0, 1))))
            for p, sub in ((f, images), (src / labels / f"{cid}.nii.gz", labels)):
                img = nib.load(p)
                data = np.asarray(img.dataobj)[..., k:k + 1]
                affine = img.affine.copy()
                affine[:3, 3] = img.affine[:3] @ np.array([0.0, 0.0, k, 1.0])
                if axis == 0:
                    data, affine = np.moveaxis(data, 2, 0), affine[:, [2, 0, 1, 3]]
                (dst / sub).mkdir(parents=True, exist_ok=True)
                nib.save(nib.Nifti1Image(data, affine), dst / sub / p.name)
    shutil.copy(src / "dataset.json", dst / "dataset.json")
    return dst


@pytest.mark.parametrize("axis", [0, 2])
def test_2d_data_in_one_slice_3d_files_trains_a_2d_network(cache, tmp_path, axis):
    """One-slice 3D files are 2D data (nnU-Net plans only its 2D configuration for them): read
    without the size-1 axis, a 2D network trained, predictions written in the files' 3D grid; a
    3D image to predict is refused, naming the file."""
    from dataclasses import replace

    from colabx.data.datasets import load_dataset

    src = write_phantom(tmp_path / "phantom", preset="tiny", num_cases=3, num_test=1)
    data = _one_slice_copy(src, tmp_path / "flat", axis)
    ds = load_dataset(data)
    assert ds.squeezed_axis == axis
    assert ds.load_case(ds.cases[0]).label.ndim == 2
    tr = Trainer(replace(_cfg(data), patch_size=[16, 16]), tmp_path / "run", echo=lambda s: None)
    assert tr.plan.spatial_dims == 2 and len(tr.pre.target_spacing) == 2
    tr.run()
    assert _predict(tmp_path / "run", data / "imagesTs", tmp_path / "pred") == 0
    image = nib.load(data / "imagesTs" / f"{CASE}_0000.nii.gz")
    for out in (tmp_path / "pred" / f"{CASE}.nii.gz",
                tmp_path / "pred" / "contexts" / f"{CASE}.nii.gz"):
        pred = nib.load(out)
        assert pred.shape == image.shape
        np.testing.assert_allclose(pred.affine, image.affine, atol=1e-6)
    whole = tmp_path / "whole"
    whole.mkdir()
    shutil.copy(src / "imagesTs" / f"{CASE}_0000.nii.gz", whole)
    assert _predict(tmp_path / "run", whole, tmp_path / "pred3d") == 2


def test_continue_predicts_only_the_cases_an_interrupted_run_left(trained, tmp_path, capsys):
    """--continue (nnU-Net's --continue_prediction) keeps the complete cases of an interrupted
    run of the same prediction and predicts the rest; without it a rerun predicts every case."""
    root, data, _ = trained
    run = root / "run"
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a", "b"):
        shutil.copy(data / "imagesTs" / f"{CASE}_0000.nii.gz", inputs / f"{name}_0000.nii.gz")
    out = tmp_path / "out"
    assert _predict(run, inputs, out) == 0
    full = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # as a kill after case a: b's label map (written last) missing, its other outputs there
    (out / "b.nii.gz").unlink()
    (out / "b.npz").write_bytes(b"stale")
    kept = (out / "a.nii.gz").stat()
    capsys.readouterr()
    assert _predict(run, inputs, out, "--continue") == 0
    assert "continuing: 1 of 2 cases already predicted" in capsys.readouterr().out
    assert (out / "a.nii.gz").stat().st_ino == kept.st_ino  # not written again
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == full
    assert _predict(run, inputs, out) == 0  # a rerun without --continue writes every case
    assert (out / "a.nii.gz").stat().st_ino != kept.st_ino
    assert _predict(run, inputs, out, "--continue", "--overwrite") == 2
    assert "continue_prediction keeps the outputs of an interrupted run" in \
        capsys.readouterr().err
    (out / "b.npz").unlink()  # a case with a requested output missing is not complete
    kept = (out / "a.nii.gz").stat()
    r = predict_folder(run, inputs, out, device="cpu", progress=False,
                       save_probabilities=True, save_contexts=True, continue_prediction=True)
    assert r == [out / "a.nii.gz", out / "b.nii.gz"]
    assert (out / "a.nii.gz").stat().st_ino == kept.st_ino
    assert (out / "b.npz").read_bytes() == full["b.npz"]

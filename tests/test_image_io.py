"""colabx.data.image_io: NIfTI and SimpleITK formats read into one convention, written back
atomically, and the same clear errors for every format."""

from __future__ import annotations

import json
import sys

import nibabel as nib
import numpy as np
import pytest

from colabx.data import load_dataset
from colabx.data.image_io import (
    DatasetError,
    folder_ending,
    read_geometry,
    read_image,
    read_label_map,
    write_image,
    write_label_map,
)

sitk = pytest.importorskip("SimpleITK")


def _oblique_affine() -> np.ndarray:
    """An affine with a rotation, a flipped axis and anisotropic spacing: conventions that
    differ between RAS and LPS, or between array orders, cannot all cancel."""
    a = np.radians(20.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, -1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rot * np.array([0.7, 0.9, 2.5])
    affine[:3, 3] = (-30.0, 12.5, 40.0)
    return affine


@pytest.fixture
def nifti(tmp_path):
    data = np.random.default_rng(0).integers(-100, 100, (7, 6, 5)).astype(np.int16)
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(data, _oblique_affine()), str(path))
    return path, data


@pytest.mark.parametrize("ending", [".mha", ".nrrd", ".nii"])
def test_copy_reads_as_the_nifti_file(tmp_path, nifti, ending):
    path, data = nifti
    vol = read_image(path)
    out = write_image(vol.data, tmp_path / f"copy{ending}", affine=vol.affine)
    copy = read_image(out)
    np.testing.assert_array_equal(copy.data, data)
    assert copy.data.dtype == np.int16
    np.testing.assert_allclose(copy.affine, vol.affine, atol=1e-6)
    np.testing.assert_allclose(copy.spacing, (0.7, 0.9, 2.5), atol=1e-6)
    shape, spacing, affine = read_geometry(out)
    assert shape == data.shape and np.allclose(spacing, copy.spacing)
    np.testing.assert_allclose(affine, copy.affine, atol=1e-6)


def test_geometry_convention_matches_simpleitk_reading_nifti(tmp_path, nifti):
    # independent of colabx's conversion: ITK's own NIfTI reader and ITK reading colabx's .mha
    # agree on the voxels' world positions (origin, direction, spacing) and the voxel order
    path, data = nifti
    vol = read_image(path)
    out = write_image(vol.data, tmp_path / "copy.mha", affine=vol.affine)
    a, b = sitk.ReadImage(str(path)), sitk.ReadImage(str(out))
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(b), data.transpose(2, 1, 0))


def test_label_map_written_in_the_reference_grid(tmp_path, nifti):
    path, data = nifti
    ref = write_image(data, tmp_path / "ref.mha", reference=path)
    lab = (data > 0).astype(np.int64)
    out = write_label_map(lab, ref, tmp_path / "lab.mha")
    back = read_label_map(out, "prediction", {0, 1})
    np.testing.assert_array_equal(back.data, lab)
    np.testing.assert_allclose(back.affine, read_image(ref).affine, atol=1e-9)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(ValueError, match="differs from the spatial shape"):
        write_label_map(lab[:3], ref, tmp_path / "x.mha")
    with pytest.raises(ValueError, match="exactly one of affine and reference"):
        write_image(data, tmp_path / "x.mha")


def test_unreadable_files_are_dataset_errors(tmp_path, nifti):
    path, data = nifti
    good = write_image(data, tmp_path / "good.mha", affine=np.eye(4))
    cut = tmp_path / "cut.mha"
    cut.write_bytes(good.read_bytes()[:-50])
    with pytest.raises(DatasetError, match=r"cut\.mha: cannot read image file"):
        read_image(cut)
    junk = tmp_path / "junk.nrrd"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match=r"junk\.nrrd: cannot read label file"):
        read_image(junk, "label")
    with pytest.raises(DatasetError, match=r"missing\.mha: image file is missing"):
        read_image(tmp_path / "missing.mha")
    with pytest.raises(DatasetError, match="unsupported file ending"):
        read_image(tmp_path / "x.tif")
    write_image(data, tmp_path / "good.nii", affine=np.eye(4))
    with pytest.raises(DatasetError, match=r"mixes file endings \(cut\.mha, good\.nii"):
        folder_ending(tmp_path, "input image")


def _mha_dataset(root, image_affine, label_affine):
    data = np.zeros((8, 8, 6), np.int16)
    data[2:6, 2:6, 1:5] = 50
    label = (data > 0).astype(np.uint8)
    write_image(data, root / "imagesTr" / "case_0000.mha", affine=image_affine)
    write_image(label, root / "labelsTr" / "case.mha", affine=label_affine)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "roi": 1},
        "numTraining": 1, "file_ending": ".mha"}))


def test_mha_dataset_gets_the_nifti_checks(tmp_path):
    shifted = np.eye(4)
    shifted[:3, 3] = (0.0, 0.0, 5.0)
    _mha_dataset(tmp_path / "ok", np.eye(4), np.eye(4))
    case = load_dataset(tmp_path / "ok").load_case("case")
    assert case.image.shape == (1, 8, 8, 6) and case.label.sum() == 64
    _mha_dataset(tmp_path / "bad", np.eye(4), shifted)
    with pytest.raises(DatasetError, match=r"case\.mha: label affine differs .* origin"):
        load_dataset(tmp_path / "bad").load_case("case")


def test_missing_simpleitk_is_a_clear_error(tmp_path, monkeypatch):
    _mha_dataset(tmp_path / "ds", np.eye(4), np.eye(4))
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # import fails as if not installed
    with pytest.raises(DatasetError, match=r"dataset\.json: .*pip install 'colabx\[sitk\]'"):
        load_dataset(tmp_path / "ds")
    with pytest.raises(DatasetError, match=r"case_0000\.mha: .*SimpleITK, which is not "
                       "installed"):
        read_image(tmp_path / "ds" / "imagesTr" / "case_0000.mha")

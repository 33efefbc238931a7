"""Dataset readers: nnU-Net v2 raw and MSD layouts, round-trips and every bad-input error."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from colabx.data import Case, DatasetError, check_foreground, load_dataset

SHAPE = (7, 9, 5)
SPACING = (0.8, 0.9, 2.5)


def _affine(spacing=SPACING, origin=(10.0, -5.0, 3.0)) -> np.ndarray:
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    return a


def _save(path: Path, arr: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(arr, _affine() if affine is None else affine)
    nib.save(img, str(path))
    return path


def _arrays(seed: int, n_channels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(n_channels, *SHAPE)).astype(np.float32) * 100 + np.arange(
        n_channels, dtype=np.float32
    ).reshape(-1, 1, 1, 1) * 1000  # channels clearly distinguishable
    label = rng.integers(0, 3, size=SHAPE).astype(np.uint8)
    context = rng.integers(0, 5, size=SHAPE).astype(np.uint8)
    return image, label, context


def make_nnunet(root: Path, n_cases: int = 2, n_channels: int = 2, context: bool = False,
                test: bool = False, ending: str = ".nii.gz") -> dict[str, tuple]:
    """Write a tiny nnU-Net v2 raw dataset; return case id → (image, label, context)."""
    root.mkdir(parents=True, exist_ok=True)
    js = {
        "name": "Tiny",
        "channel_names": {str(i): f"ch{i}" for i in range(n_channels)},
        "labels": {"background": 0, "organ": 1, "tumour": 2},
        "numTraining": n_cases,
        "file_ending": ending,
    }
    (root / "dataset.json").write_text(json.dumps(js))
    out = {}
    for k in range(n_cases):
        cid = f"case_{k:03d}"
        image, label, ctx = _arrays(k, n_channels)
        for c in range(n_channels):
            _save(root / "imagesTr" / f"{cid}_{c:04d}{ending}", image[c])
        _save(root / "labelsTr" / f"{cid}{ending}", label)
        if context:
            _save(root / "contextTr" / f"{cid}{ending}", ctx)
        out[cid] = (image, label, ctx)
    if test:
        image, _, _ = _arrays(99, n_channels)
        for c in range(n_channels):
            _save(root / "imagesTs" / f"test_000_{c:04d}{ending}", image[c])
        out["test_000"] = (image, None, None)
    return out


def make_msd(root: Path, n_cases: int = 2, n_channels: int = 2) -> dict[str, tuple]:
    """Write a tiny MSD dataset (4D channels-last images when n_channels > 1)."""
    root.mkdir(parents=True, exist_ok=True)
    training, out = [], {}
    for k in range(n_cases):
        cid = f"brain_{k:03d}"
        image, label, _ = _arrays(k, n_channels)
        arr = np.moveaxis(image, 0, -1) if n_channels > 1 else image[0]
        _save(root / "imagesTr" / f"{cid}.nii.gz", arr)
        _save(root / "labelsTr" / f"{cid}.nii.gz", label)
        training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
        out[cid] = (image, label)
    image, _, _ = _arrays(50, n_channels)
    _save(root / "imagesTs" / "brain_900.nii.gz",
          np.moveaxis(image, 0, -1) if n_channels > 1 else image[0])
    js = {
        "name": "TinyMSD",
        "modality": {str(i): f"mod{i}" for i in range(n_channels)},
        "labels": {"0": "background", "1": "edema", "2": "tumour"},
        "numTraining": n_cases,
        "training": training,
        "test": ["./imagesTs/brain_900.nii.gz"],
    }
    (root / "dataset.json").write_text(json.dumps(js))
    return out


def _edit_json(root: Path, **changes) -> None:
    p = root / "dataset.json"
    js = json.loads(p.read_text())
    for k, v in changes.items():
        if v is None:
            js.pop(k, None)
        else:
            js[k] = v
    p.write_text(json.dumps(js))


def _raises(match: str):
    return pytest.raises(DatasetError, match=match)


# -- round-trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n_channels", [1, 2])
def test_nnunet_roundtrip(tmp_path, n_channels):
    expected = make_nnunet(tmp_path / "ds", n_channels=n_channels, context=True, test=True)
    ds = load_dataset(tmp_path / "ds")
    assert ds.layout == "nnunet" and ds.name == "Tiny"
    assert ds.channel_names == tuple(f"ch{i}" for i in range(n_channels))
    assert ds.labels == {"background": 0, "organ": 1, "tumour": 2}
    assert [c.id for c in ds.cases] == ["case_000", "case_001"]
    assert [c.id for c in ds.test_cases] == ["test_000"]
    assert ds.test_cases[0].label is None
    for case in ds.cases:
        assert len(case.images) == n_channels
        assert [p.name for p in case.images] == [f"{case.id}_{i:04d}.nii.gz"
                                                 for i in range(n_channels)]
        d = ds.load_case(case)
        image, label, ctx = expected[case.id]
        assert d.image.dtype == np.float32 and d.image.shape == (n_channels, *SHAPE)
        np.testing.assert_array_equal(d.image, image)  # channel order kept
        assert np.issubdtype(d.label.dtype, np.integer)
        np.testing.assert_array_equal(d.label, label)
        np.testing.assert_array_equal(d.context, ctx)
        np.testing.assert_allclose(d.spacing, SPACING, rtol=0, atol=1e-6)
        np.testing.assert_allclose(d.affine, _affine(), atol=1e-6)
    t = ds.load_case("test_000")
    np.testing.assert_array_equal(t.image, expected["test_000"][0])
    assert t.label is None and t.context is None


def test_nnunet_uncompressed_nii(tmp_path):
    make_nnunet(tmp_path / "ds", n_channels=1, ending=".nii")
    ds = load_dataset(tmp_path / "ds")
    assert ds.file_ending == ".nii"
    assert ds.load_case(ds.cases[0]).image.shape == (1, *SHAPE)


def test_spacing_follows_array_axis_order(tmp_path):
    # A non-diagonal affine (axes permuted) still reports spacing per array axis (header zooms).
    root = tmp_path / "ds"
    make_nnunet(root, n_cases=1, n_channels=1)
    perm = np.zeros((4, 4))
    perm[0, 2], perm[1, 0], perm[2, 1], perm[3, 3] = 2.5, 0.8, 0.9, 1.0
    img = np.random.default_rng(0).normal(size=(7, 9, 5)).astype(np.float32)
    _save(root / "imagesTr" / "case_000_0000.nii.gz", img, perm)
    _save(root / "labelsTr" / "case_000.nii.gz", np.zeros(SHAPE, np.uint8), perm)
    d = load_dataset(root).load_case("case_000")
    np.testing.assert_allclose(d.spacing, (0.8, 0.9, 2.5), atol=1e-6)
    np.testing.assert_array_equal(d.image[0], img)


@pytest.mark.parametrize("n_channels", [1, 2])
def test_msd_roundtrip(tmp_path, n_channels):
    expected = make_msd(tmp_path / "msd", n_channels=n_channels)
    ds = load_dataset(tmp_path / "msd")
    assert ds.layout == "msd" and ds.num_channels == n_channels
    assert ds.labels == {"background": 0, "edema": 1, "tumour": 2}
    assert [c.id for c in ds.cases] == ["brain_000", "brain_001"]
    assert [c.id for c in ds.test_cases] == ["brain_900"]
    for case in ds.cases:
        d = ds.load_case(case)
        image, label = expected[case.id]
        assert d.image.dtype == np.float32 and d.image.shape == (n_channels, *SHAPE)
        np.testing.assert_array_equal(d.image, image)  # channels-last 4D → channel-first
        np.testing.assert_array_equal(d.label, label)
        np.testing.assert_allclose(d.spacing, SPACING, atol=1e-6)
        assert d.context is None
    assert ds.load_case("brain_900").image.shape == (n_channels, *SHAPE)


def test_nnunet_v1_split_channels_via_msd_json(tmp_path):
    root = tmp_path / "v1"
    expected = make_msd(root, n_cases=1, n_channels=2)
    image = expected["brain_000"][0]
    (root / "imagesTr" / "brain_000.nii.gz").unlink()
    for c in range(2):
        _save(root / "imagesTr" / f"brain_000_{c:04d}.nii.gz", image[c])
    ds = load_dataset(root)
    np.testing.assert_array_equal(ds.load_case("brain_000").image, image)


def test_check_foreground_counts(tmp_path):
    expected = make_nnunet(tmp_path / "ds", n_channels=1)
    counts = check_foreground(load_dataset(tmp_path / "ds"))
    assert counts == {k: int((v[1] > 0).sum()) for k, v in expected.items()}


def test_image_smaller_than_patch_is_fine(tmp_path):
    root = tmp_path / "ds"
    make_nnunet(root, n_cases=1, n_channels=1)
    _save(root / "imagesTr" / "case_000_0000.nii.gz", np.ones((2, 2, 3), np.float32))
    _save(root / "labelsTr" / "case_000.nii.gz", np.ones((2, 2, 3), np.uint8))
    assert load_dataset(root).load_case("case_000").image.shape[1:] == (2, 2, 3)


# -- dataset.json errors ---------------------------------------------------------------------------


def test_error_missing_dataset_json(tmp_path):
    (tmp_path / "ds").mkdir()
    with _raises(r"dataset\.json: dataset\.json is missing"):
        load_dataset(tmp_path / "ds")


def test_error_invalid_json(tmp_path):
    root = tmp_path / "ds"
    make_nnunet(root)
    (root / "dataset.json").write_text('{"channel_names": {"0": "CT"},')
    with _raises(r"dataset\.json: invalid JSON .*line 1"):
        load_dataset(root)


@pytest.mark.parametrize("key", ["labels", "numTraining", "file_ending"])
def test_error_nnunet_missing_required_key(tmp_path, key):
    root = tmp_path / "ds"
    make_nnunet(root)
    _edit_json(root, **{key: None})
    with _raises(rf"dataset\.json: .*nnU-Net v2 layout.* missing required key\(s\) \['{key}'\]"):
        load_dataset(root)


def test_error_msd_missing_required_key(tmp_path):
    root = tmp_path / "msd"
    make_msd(root)
    _edit_json(root, labels=None)
    with _raises(r"MSD layout.* missing required key\(s\) \['labels'\]"):
        load_dataset(root)


def test_error_unknown_layout(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "dataset.json").write_text('{"name": "x"}')
    with _raises(r"missing required keys: neither nnU-Net v2"):
        load_dataset(root)


def test_error_unsupported_file_ending_in_json(tmp_path):
    root = tmp_path / "ds"
    make_nnunet(root)
    _edit_json(root, file_ending=".tif")
    with _raises(r"file_ending '\.tif' is not supported"):
        load_dataset(root)


def test_error_wrong_file_ending_on_disk(tmp_path):
    root = tmp_path / "ds"
    make_nnunet(root)
    (root / "imagesTr" / "case_002_0000.nrrd").write_bytes(b"x")
    with _raises(r"case_002_0000\.nrrd: image file has the wrong file ending"):
        load_dataset(root)


def test_files_that_are_no_image_are_left_out(tmp_path):
    """Notes, spreadsheets and the like beside the cases are ignored, as nnU-Net ignores files
    without the dataset's ending; the cases are found as without them."""
    root = tmp_path / "ds"
    make_nnunet(root)
    before = load_dataset(root)
    for sub in ("imagesTr", "labelsTr"):
        (root / sub / "notes.txt").write_text("scanner protocol")
        (root / sub / "volumes.csv").write_text("case,ml\n")
    after = load_dataset(root)
    assert [c.id for c in after.cases] == [c.id for c in before.cases]


def test_error_wrong_file_ending_label(tmp_path):
    root = tmp_path / "ds"
    make_nnunet(root)
    (root / "labelsTr" / "case_000.nii.gz").rename(root / "labelsTr" / "case_000.nii")
    with _raises(r"case_000\.nii: label file has the wrong file ending"):
        load_dataset(root)


def test_error_msd_wrong_file_ending(tmp_path):
    root = tmp_path / "msd"
    make_msd(root)
    js = json.loads((root / "dataset.json").read_text())
    js["training"][0]["image"] = "./imagesTr/brain_000.tif"
    (root / "dataset.json").write_text(json.dumps(js))
    with _raises(r"brain_000\.tif: training\[0\] image has the wrong file ending"):
        load_dataset(root)


def test_error_labels_without_background(tmp_path):
    root = tmp_path / "ds"
    make_nnunet(root)
    _edit_json(root, labels={"organ": 1})
    with _raises(r"no background \(value 0\)"):
        load_dataset(root)


GAP = ({"background": 0, "tumour": 2}, r"values 0, 1, \.\.\., N-1 once each.*missing \[1\]")
WIDE_GAP = ({"background": 0, "organ": 1, "tumour": 4}, r"missing \[2, 3\]")
REPEAT = ({"background": 0, "organ": 1, "tumour": 1}, r"once each.*repeated \[1\]")


@pytest.mark.parametrize("layout, labels, match", [  # MSD labels are keyed by value: no repeats
    ("nnunet", *GAP), ("nnunet", *WIDE_GAP), ("nnunet", *REPEAT), ("msd", *GAP),
    ("msd", *WIDE_GAP)])
def test_error_labels_not_consecutive(tmp_path, layout, labels, match):
    """A gap would be a class that dataset.json does not declare: the network would get an output
    for it and every mean would average it in."""
    root = tmp_path / "ds"
    if layout == "nnunet":
        make_nnunet(root)
        _edit_json(root, labels=labels)
    else:
        make_msd(root)
        _edit_json(root, labels={str(v): name for name, v in labels.items()})
    with _raises(match):
        load_dataset(root)


def test_error_ignore_label_not_the_largest(tmp_path):
    root = tmp_path / "ds"
    make_nnunet(root)
    _edit_json(root, labels={"background": 0, "ignore": 1, "organ": 2})
    with _raises(r"ignore label \(1\) must be the largest label value \(2\)"):
        load_dataset(root)


def test_error_num_training_mismatch(tmp_path):
    root = tmp_path / "ds"
    make_nnunet(root)
    _edit_json(root, numTraining=5)
    with _raises(r"numTraining is 5 but 2 training case\(s\) were found"):
        load_dataset(root)


# -- missing files, channels, empty dataset, paths -------------------------------------------------


def test_error_missing_label_file(tmp_path):
    root = tmp_path / "ds"
    make_nnunet(root)
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    with _raises(r"labelsTr/case_001\.nii\.gz: label file is missing for case 'case_001'"):
        load_dataset(root)


def test_error_label_without_image(tmp_path):
    root = tmp_path / "ds"
    make_nnunet(root, n_channels=1)
    _save(root / "labelsTr" / "orphan.nii.gz", np.zeros(SHAPE, np.uint8))
    with _raises(r"orphan\.nii\.gz: labelsTr file has no image files"):
        load_dataset(root)


def test_error_missing_context_file(tmp_path):
    root = tmp_path / "ds"
    make_nnunet(root, context=True)
    (root / "contextTr" / "case_000.nii.gz").unlink()
    with _raises(r"contextTr/case_000\.nii\.gz: context file is missing"):
        load_dataset(root)


def test_error_missing_msd_image(tmp_path):
    root = tmp_path / "msd"
    make_msd(root)
    (root / "imagesTr" / "brain_001.nii.gz").unlink()
    with _raises(r"imagesTr/brain_001\.nii\.gz: image file listed in dataset\.json is missing"):
        load_dataset(root)


def test_error_missing_msd_label(tmp_path):
    root = tmp_path / "msd"
    make_msd(root)
    (root / "labelsTr" / "brain_000.nii.gz").unlink()
    with _raises(r"labelsTr/brain_000\.nii\.gz: label file listed in dataset\.json is missing"):
        load_dataset(root)


def test_error_file_removed_after_listing(tmp_path):
    root = tmp_path / "ds"
    make_nnunet(root)
    ds = load_dataset(root)
    (root / "imagesTr" / "case_000_0001.nii.gz").unlink()
    with _raises(r"case_000_0001\.nii\.gz: image file is missing"):
        ds.load_case("case_000")


def test_error_wrong_channel_count_nnunet(tmp_path):
    root = tmp_path / "ds"
    make_nnunet(root, n_channels=2)
    (root / "imagesTr" / "case_001_0001.nii.gz").unlink()
    with _raises(r"case 'case_001' has channel files \[0\] but dataset\.json declares 2 "
                 r"channel\(s\): missing .*case_001_0001\.nii\.gz"):
        load_dataset(root)


def test_error_extra_channel_nnunet(tmp_path):
    root = tmp_path / "ds"
    make_nnunet(root, n_channels=1)
    _save(root / "imagesTr" / "case_000_0001.nii.gz", np.zeros(SHAPE, np.float32))
    with _raises(r"case 'case_000' has channel files \[0, 1\] .* unexpected"):
        load_dataset(root)


def test_error_wrong_channel_count_msd(tmp_path):
    root = tmp_path / "msd"
    make_msd(root, n_channels=2)
    _edit_json(root, modality={"0": "a", "1": "b", "2": "c"})
    ds = load_dataset(root)
    with _raises(r"brain_000\.nii\.gz: image has 2 channels .* dataset\.json declares 3"):
        ds.load_case("brain_000")


def test_error_empty_dataset_nnunet(tmp_path):
    root = tmp_path / "ds"
    make_nnunet(root, n_cases=0)
    with _raises(r"imagesTr: empty dataset: no training cases"):
        load_dataset(root)


def test_error_empty_dataset_msd(tmp_path):
    root = tmp_path / "msd"
    make_msd(root)
    _edit_json(root, training=[])
    with _raises(r"empty dataset: dataset\.json 'training' lists no cases"):
        load_dataset(root)


@pytest.mark.parametrize("entry, problem", [
    ("../outside.nii.gz", "points outside the dataset folder"),
    ("./imagesTr/../../outside.nii.gz", "points outside the dataset folder"),
    ("/etc/outside.nii.gz", "is an absolute path"),
])
def test_error_msd_path_outside_dataset(tmp_path, entry, problem):
    root = tmp_path / "msd"
    make_msd(root)
    _save(tmp_path / "outside.nii.gz", np.zeros(SHAPE, np.uint8))
    js = json.loads((root / "dataset.json").read_text())
    js["training"][1]["label"] = entry
    (root / "dataset.json").write_text(json.dumps(js))
    with _raises(rf"training\[1\] label entry '{entry}' {problem}"):
        load_dataset(root)


def test_error_nnunet_explicit_entry_outside_dataset(tmp_path):
    root = tmp_path / "ds"
    make_nnunet(root, n_cases=1, n_channels=1)
    _edit_json(root, dataset={"case_000": {"images": ["../x.nii.gz"],
                                           "label": "labelsTr/case_000.nii.gz"}})
    with _raises(r"case 'case_000' image entry '\.\./x\.nii\.gz' points outside"):
        load_dataset(root)


# -- voxel-level errors (load_case) ----------------------------------------------------------------


def test_error_unreadable_image(tmp_path):
    root = tmp_path / "ds"
    make_nnunet(root, n_channels=1)
    (root / "imagesTr" / "case_000_0000.nii.gz").write_bytes(b"this is not a nifti file")
    ds = load_dataset(root)
    with _raises(r"case_000_0000\.nii\.gz: cannot read image file: corrupt gzip stream"):
        ds.load_case("case_000")


def test_error_unreadable_uncompressed(tmp_path):
    root = tmp_path / "ds"
    make_nnunet(root, n_channels=1, ending=".nii")
    (root / "labelsTr" / "case_001.nii").write_bytes(b"\0" * 10)
    ds = load_dataset(root)
    with _raises(r"case_001\.nii: cannot read label file: not a readable NIfTI file"):
        ds.load_case("case_001")


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_error_truncated_nii_gz(tmp_path, keep):
    root = tmp_path / "ds"
    make_nnunet(root, n_channels=1)
    p = root / "imagesTr" / "case_001_0000.nii.gz"
    raw = p.read_bytes()
    p.write_bytes(raw[: int(len(raw) * keep)])
    ds = load_dataset(root)
    with _raises(r"case_001_0000\.nii\.gz: cannot read image file: truncated gzip stream"):
        ds.load_case("case_001")


def test_error_shape_mismatch(tmp_path):
    root = tmp_path / "ds"
    make_nnunet(root, n_channels=1)
    _save(root / "labelsTr" / "case_000.nii.gz", np.zeros((7, 9, 4), np.uint8))
    with _raises(r"labelsTr/case_000\.nii\.gz: label shape \(7, 9, 4\) differs from image shape "
                 r"\(7, 9, 5\)"):
        load_dataset(root).load_case("case_000")


def test_error_channel_shape_mismatch(tmp_path):
    root = tmp_path / "ds"
    make_nnunet(root, n_channels=2)
    _save(root / "imagesTr" / "case_000_0001.nii.gz", np.zeros((7, 9, 6), np.float32))
    with _raises(r"case_000_0001\.nii\.gz: image channel shape \(7, 9, 6\) differs"):
        load_dataset(root).load_case("case_000")


def test_error_spacing_mismatch(tmp_path):
    root = tmp_path / "ds"
    make_nnunet(root, n_channels=1)
    lbl = np.zeros(SHAPE, np.uint8)
    _save(root / "labelsTr" / "case_000.nii.gz", lbl, _affine(spacing=(0.8, 0.9, 2.51)))
    with _raises(r"labelsTr/case_000\.nii\.gz: label spacing .* differs from .* by 0\.01 mm "
                 r"\(tolerance 0\.008 mm, 1% of a voxel\)"):
        load_dataset(root).load_case("case_000")


def test_error_origin_mismatch(tmp_path):
    root = tmp_path / "ds"
    make_nnunet(root, n_channels=2)
    img = np.zeros(SHAPE, np.float32)
    _save(root / "imagesTr" / "case_001_0001.nii.gz", img, _affine(origin=(10.0, -5.0, 3.01)))
    with _raises(r"case_001_0001\.nii\.gz: image channel affine differs .* by 0\.01 mm"):
        load_dataset(root).load_case("case_001")


def test_geometry_within_tolerance_is_accepted(tmp_path):
    root = tmp_path / "ds"
    written = make_nnunet(root, n_channels=1)
    lbl = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 3).astype(np.uint8)
    _save(root / "labelsTr" / "case_000.nii.gz", lbl, _affine(origin=(10.0, -5.0, 3.00003)))
    case = load_dataset(root).load_case("case_000")
    # the label 3e-5 mm off is read as it is, on the image's grid and geometry
    np.testing.assert_array_equal(case.label, lbl)
    np.testing.assert_array_equal(case.image, written["case_000"][0])
    np.testing.assert_allclose(case.spacing, SPACING, rtol=0, atol=1e-6)
    np.testing.assert_allclose(case.affine, _affine(), atol=1e-6)
    # 5e-4 mm of drift (a label saved by an annotation tool): under 1 % of the 0.8 mm voxel, so
    # a warning naming the files, and the label on the image's grid
    _save(root / "labelsTr" / "case_000.nii.gz", lbl, _affine(origin=(10.0, -5.0, 3.0005)))
    with pytest.warns(RuntimeWarning, match=r"case_000\.nii\.gz: label geometry differs from "
                      r".*case_000_0000\.nii\.gz by 0\.0005 mm, under 1% of a voxel"):
        case = load_dataset(root).load_case("case_000")
    np.testing.assert_array_equal(case.label, lbl)
    np.testing.assert_allclose(case.affine, _affine(), atol=1e-6)


def test_error_context_shape_mismatch(tmp_path):
    root = tmp_path / "ds"
    make_nnunet(root, n_channels=1, context=True)
    _save(root / "contextTr" / "case_001.nii.gz", np.zeros((3, 3, 3), np.uint8))
    with _raises(r"contextTr/case_001\.nii\.gz: context shape \(3, 3, 3\) differs"):
        load_dataset(root).load_case("case_001")


def test_error_label_value_not_declared(tmp_path):
    root = tmp_path / "ds"
    make_nnunet(root, n_channels=1)
    lbl = np.zeros(SHAPE, np.uint8)
    lbl[1, 1, 1] = 7
    _save(root / "labelsTr" / "case_000.nii.gz", lbl)
    with _raises(r"labelsTr/case_000\.nii\.gz: label map has value\(s\) \[7\] not in dataset\.json "
                 r"labels \[0, 1, 2\]"):
        load_dataset(root).load_case("case_000")


def test_error_non_integer_label(tmp_path):
    root = tmp_path / "ds"
    make_nnunet(root, n_channels=1)
    lbl = np.zeros(SHAPE, np.float32)
    lbl[2, 3, 4] = 0.5
    _save(root / "labelsTr" / "case_001.nii.gz", lbl)
    with _raises(r"labelsTr/case_001\.nii\.gz: label map has non-integer values, e\.g\. \[0\.5\]"):
        load_dataset(root).load_case("case_001")


def test_float_label_with_whole_values_is_accepted(tmp_path):
    root = tmp_path / "ds"
    make_nnunet(root, n_channels=1)
    lbl = np.zeros(SHAPE, np.float32)
    lbl[2, 3, 4] = 2.0
    _save(root / "labelsTr" / "case_001.nii.gz", lbl)
    d = load_dataset(root).load_case("case_001")
    assert np.issubdtype(d.label.dtype, np.integer) and d.label[2, 3, 4] == 2


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_error_non_finite_image(tmp_path, bad):
    root = tmp_path / "ds"
    make_nnunet(root, n_channels=2)
    img = np.zeros(SHAPE, np.float32)
    img[0, 0, 0] = bad
    _save(root / "imagesTr" / "case_000_0001.nii.gz", img)
    with _raises(r"case_000_0001\.nii\.gz: image has 1 non-finite voxel\(s\) \(NaN or inf\) in "
                 r"channel 1 \(ch1\)"):
        load_dataset(root).load_case("case_000")


def test_error_non_finite_msd_4d(tmp_path):
    root = tmp_path / "msd"
    make_msd(root, n_channels=2)
    img = np.zeros((*SHAPE, 2), np.float32)
    img[1, 2, 3, 0] = np.nan
    _save(root / "imagesTr" / "brain_001.nii.gz", img)
    with _raises(r"brain_001\.nii\.gz: image has 1 non-finite voxel\(s\) .* channel 0 \(mod0\)"):
        load_dataset(root).load_case("brain_001")


def test_error_no_foreground_anywhere(tmp_path):
    root = tmp_path / "ds"
    make_nnunet(root, n_channels=1)
    for k in range(2):
        _save(root / "labelsTr" / f"case_{k:03d}.nii.gz", np.zeros(SHAPE, np.uint8))
    ds = load_dataset(root)
    ds.load_case("case_000")  # a background-only case is fine on its own
    with _raises(r"no foreground anywhere: all 2 training label map\(s\) contain only background"):
        check_foreground(ds)


def test_case_lookup(tmp_path):
    make_nnunet(tmp_path / "ds", n_channels=1)
    ds = load_dataset(tmp_path / "ds")
    assert isinstance(ds["case_001"], Case) and len(ds) == 2
    with pytest.raises(KeyError):
        ds["nope"]


def test_error_msd_3d_image_for_two_channels(tmp_path):
    root = tmp_path / "msd"
    make_msd(root, n_channels=1)
    _edit_json(root, modality={"0": "a", "1": "b"})
    with _raises(r"brain_000\.nii\.gz: image of case 'brain_000' is 3D \(one channel\) but "
                 r"dataset\.json declares 2 channel\(s\)"):
        load_dataset(root).load_case("brain_000")


def test_dataset_error_is_value_error():
    assert issubclass(DatasetError, ValueError)


def test_ignore_label_is_not_foreground(tmp_path):
    root = tmp_path / "ds"
    make_nnunet(root, n_cases=1, n_channels=1)
    _edit_json(root, labels={"background": 0, "organ": 1, "ignore": 2})
    lbl = np.zeros(SHAPE, np.uint8)
    lbl[0, 0, 0] = 2
    _save(root / "labelsTr" / "case_000.nii.gz", lbl)
    ds = load_dataset(root)
    assert ds.ignore_label == 2
    with _raises(r"no foreground anywhere"):
        check_foreground(ds)


def test_labels_ts_read_and_missing_one_refused(tmp_path):
    root = tmp_path / "ds"
    make_nnunet(root, n_channels=1, test=True)
    _save(root / "labelsTs" / "test_000.nii.gz", np.ones(SHAPE, np.uint8))
    ds = load_dataset(root)
    np.testing.assert_array_equal(ds.load_case("test_000").label, np.ones(SHAPE))
    (root / "labelsTs" / "test_000.nii.gz").rename(root / "labelsTs" / "other.nii.gz")
    with _raises(r"labelsTs/test_000\.nii\.gz: label file is missing"):
        load_dataset(root)


def test_one_slice_3d_files_are_read_as_2d(tmp_path):
    """Images of size 1 along one axis in every training case (nnU-Net's 2D layout) are 2D
    data: that axis and its spacing are dropped on reading, for images, labels and context
    maps; an image to read that is not one slice there is an error naming it; size 1 along two
    axes is refused."""
    root = tmp_path / "ds"
    written = make_nnunet(root, n_channels=1, context=True)
    for cid, (image, label, ctx) in written.items():
        _save(root / "imagesTr" / f"{cid}_0000.nii.gz", image[0][:, 4:5])
        _save(root / "labelsTr" / f"{cid}.nii.gz", label[:, 4:5])
        _save(root / "contextTr" / f"{cid}.nii.gz", ctx[:, 4:5])
    ds = load_dataset(root)
    assert ds.squeezed_axis == 1
    case = ds.load_case("case_001")
    np.testing.assert_array_equal(case.image[0], written["case_001"][0][0][:, 4])
    np.testing.assert_array_equal(case.label, written["case_001"][1][:, 4])
    np.testing.assert_array_equal(case.context, written["case_001"][2][:, 4])
    np.testing.assert_allclose(case.spacing, (SPACING[0], SPACING[2]), rtol=1e-6)
    np.testing.assert_allclose(ds.header_spacing(ds.cases[0]), case.spacing, rtol=1e-6)
    _save(root / "imagesTs" / "test_000_0000.nii.gz", written["case_000"][0][0])
    ds = load_dataset(root)
    with _raises(r"test_000_0000\.nii\.gz: image of spatial shape \(7, 9, 5\) is not 2D stored "
                 r"as 3D \(size 1 along axis 1\)"):
        ds.load_image(ds.test_cases[0])
    for cid, (image, _, _) in written.items():
        _save(root / "imagesTr" / f"{cid}_0000.nii.gz", image[0][:1, 4:5])
    with _raises(r"every training image has size 1 along axes \[0, 1\]"):
        load_dataset(root)


def test_a_prediction_folder_mixing_namings_warns(tmp_path):
    """Channel files and a file without a channel suffix in one folder to predict (say a label
    map copied among the images): each is a case, and a warning names the single files."""
    from colabx.data.datasets import scan_images

    folder = tmp_path / "in"
    _save(folder / "a_0000.nii.gz", np.zeros(SHAPE, np.float32))
    _save(folder / "a.nii.gz", np.zeros(SHAPE, np.uint8))
    with pytest.raises(DatasetError, match="both a whole image file and channel files"):
        scan_images(folder, ".nii.gz", 1, whole_files=True)
    (folder / "a.nii.gz").rename(folder / "a_label.nii.gz")
    with pytest.warns(RuntimeWarning, match=r"holds 1 file\(s\) without a channel suffix "
                      r"\(a_label\.nii\.gz\), each predicted as a single-file case"):
        cases = scan_images(folder, ".nii.gz", 1, whole_files=True)
    assert sorted(cases) == ["a", "a_label"]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one naming: no warning
        (folder / "a_label.nii.gz").unlink()
        assert sorted(scan_images(folder, ".nii.gz", 1, whole_files=True)) == ["a"]

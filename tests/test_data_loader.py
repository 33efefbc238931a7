"""PatchBatches / make_loader: batch layout, ROI-forcing rule, determinism per (seed, iteration)
with 0 and 2 workers, resuming, DDP slices, argument errors. A tiny preprocessed nnU-Net dataset
with context maps and one case without ROI."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from colabx.data.augmentation import AugmentConfig
from colabx.data.loader import PatchBatches, make_loader, num_forced
from colabx.data.preprocessing import preprocess_dataset

PATCH = (12, 16, 16)
SHAPES = [(30, 26, 14), (24, 30, 12), (20, 20, 10)]


def _write_dataset(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MR"}, "labels": {"background": 0, "a": 1, "b": 2},
        "numTraining": 3, "file_ending": ".nii.gz"}))
    rng = np.random.default_rng(0)
    for k, shape in enumerate(SHAPES):
        image = rng.normal(100, 20, size=shape).astype(np.float32)
        label = np.zeros(shape, np.uint8)
        if k < 2:  # case 2 has no ROI
            label[8:14, 6:12, 3:7] = 1
            label[10:12, 8:10, 4:6] = 2
        context = (np.indices(shape).sum(0) % 3).astype(np.uint8)
        affine = np.diag([1.0, 1.0, 2.0, 1.0])
        for folder, arr in (("imagesTr", image), ("labelsTr", label), ("contextTr", context)):
            (root / folder).mkdir(exist_ok=True)
            name = f"c{k}_0000.nii.gz" if folder == "imagesTr" else f"c{k}.nii.gz"
            nib.save(nib.Nifti1Image(arr, affine), str(root / folder / name))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    _write_dataset(root / "raw")
    return preprocess_dataset(root / "raw", root / "pre", progress=False)


def _batches(ds, **kw):
    kw = {"patch_size": PATCH, "batch_size": 4, "seed": 3, "augment": AugmentConfig(), **kw}
    return PatchBatches(ds, ds.case_ids, **kw)


def _equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_batch_layout(dataset):
    batches = _batches(dataset, with_context=True, num_iterations=100)
    assert len(batches) == 100
    b = batches[0]
    assert b["image"].shape == (4, 1, *PATCH) and b["image"].dtype == torch.float32
    assert b["label"].shape == (4, *PATCH) and b["label"].dtype == torch.int64
    assert b["distance"].shape == (4, *PATCH) and b["distance"].dtype == torch.float32
    assert b["context"].shape == (4, *PATCH) and b["context"].dtype == torch.int64
    assert len(b["case_ids"]) == 4 and set(b["case_ids"]) <= {"c0", "c1", "c2"}
    assert b["roi_forced"].tolist() == [False, False, True, True]
    assert "context" not in _batches(dataset)[0]
    with pytest.raises(IndexError):
        batches[100]


def test_forcing_rule_and_forced_patches_hold_roi(dataset):
    assert [num_forced(b, f) for b, f in [(2, 0.33), (2, 0.5), (4, 0.5), (1, 0.1), (5, 0.5),
                                          (3, 0.0), (3, 1.0)]] == [1, 1, 2, 1, 3, 0, 3]
    batches = _batches(dataset, roi_fraction=1.0)
    seen = 0
    for i in range(8):
        b = batches[i]
        for j, cid in enumerate(b["case_ids"]):
            if cid != "c2":
                seen += 1
                assert (b["label"][j] > 0).any() and (b["distance"][j] == 0).any()
            else:
                assert torch.isinf(b["distance"][j]).all()
    assert seen > 0


def test_same_iteration_same_batch(dataset):
    a = _batches(dataset)
    _equal(a[5], a[5])
    _equal(a[5], _batches(dataset)[5])  # a fresh object (another process, a resumed run)
    assert not torch.equal(a[5]["image"], a[6]["image"])
    assert not torch.equal(a[5]["image"], _batches(dataset, seed=4)[5]["image"])


def test_loader_with_workers_and_resume_matches_indexing(dataset):
    batches = _batches(dataset, with_context=True)
    want = [batches[i] for i in range(2, 6)]
    for workers in (0, 2):
        got = list(make_loader(batches, start=2, stop=6, num_workers=workers))
        assert len(got) == 4
        for g, w in zip(got, want, strict=True):
            _equal(g, w)


def test_batches_do_not_depend_on_the_torch_thread_count(dataset):
    """Large enough patches that torch splits the contrast and gamma transforms' float32 channel
    means over threads: batch i is still the same with 1 or 2 threads in the calling process
    (as in a worker), so --threads and --num-workers may change on resume."""
    cfg = AugmentConfig(contrast_p=1.0, gamma_p=1.0, inverted_gamma_p=0.5)
    batches = _batches(dataset, patch_size=(40, 48, 48), batch_size=2, augment=cfg)
    old = torch.get_num_threads()
    try:
        got = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            got[n] = [batches[i] for i in range(3)]
            assert torch.get_num_threads() == n  # restored after sampling
    finally:
        torch.set_num_threads(old)
    for a, b in zip(got[1], got[2], strict=True):
        _equal(a, b)


def test_ddp_slices_concatenate_to_the_full_batch(dataset):
    full = _batches(dataset, batch_size=5)[7]
    parts = [_batches(dataset, batch_size=5, samples=s)[7]
             for s in (slice(0, 2), slice(2, 4), slice(4, 5))]
    for k in ("image", "label", "distance", "roi_forced"):
        assert torch.equal(torch.cat([p[k] for p in parts]), full[k])
    assert sum((p["case_ids"] for p in parts), []) == full["case_ids"]


def test_without_augmentation(dataset):
    batches = _batches(dataset, augment=None, patch_size=8, roi_fraction=0.5)
    b = batches[0]
    assert b["image"].shape == (4, 1, 8, 8, 8)
    _equal(b, _batches(dataset, augment=None, patch_size=8)[0])


def test_workers_do_not_receive_arrays(dataset):
    batches = _batches(dataset)
    batches[0]  # opens cases in this process
    assert batches._cases
    assert batches.__getstate__()["_cases"] == {}


def test_errors(dataset):
    with pytest.raises(ValueError, match="case_ids"):
        PatchBatches(dataset, ["nope"], patch_size=8, batch_size=2, seed=0, augment=None)
    with pytest.raises(ValueError, match="case_ids"):
        PatchBatches(dataset, [], patch_size=8, batch_size=2, seed=0, augment=None)
    with pytest.raises(ValueError, match="batch_size"):
        _batches(dataset, batch_size=0)
    with pytest.raises(ValueError, match="roi_fraction"):
        _batches(dataset, roi_fraction=1.5)
    with pytest.raises(ValueError, match="patch_size"):
        _batches(dataset, patch_size=(8, 8))
    with pytest.raises(ValueError, match="samples"):
        _batches(dataset, samples=slice(4, 6))
    with pytest.raises(ValueError, match="seed"):
        _batches(dataset, seed=-1)
    with pytest.raises(ValueError, match="start"):
        make_loader(_batches(dataset, num_iterations=10), start=5, stop=11)
    plans = json.loads(json.dumps(dataset.plans))
    del plans["cases"]["c1"]["files"]["context"]
    ds2 = type(dataset)(dataset.root, plans)
    with pytest.raises(ValueError, match="context"):
        _batches(ds2, with_context=True)

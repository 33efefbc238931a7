"""Phantom generator: determinism, anatomy invariants, look-alike statistics, the nnU-Net v2
files read back by colabx's readers, atomic writes, the cache, and bad arguments."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from colabx.data import load_dataset
from colabx.data import phantom as ph
from colabx.data.image_io import read_image
from colabx.data.phantom import (
    CONTEXT_NAMES,
    GENERATOR_VERSION,
    PHANTOM_PRESETS,
    TEST_INDEX_OFFSET,
    generate_case,
    phantom_dataset,
    write_phantom,
)


def _same(a: ph.PhantomCase, b: ph.PhantomCase) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f))
               for f in ("image", "label", "context", "lookalike"))


def test_deterministic_in_seed_index_preset():
    a = generate_case(3, seed=5, preset="tiny")
    assert _same(a, generate_case(3, seed=5, preset="tiny"))
    assert not np.array_equal(a.image, generate_case(3, seed=6, preset="tiny").image)
    assert not np.array_equal(a.image, generate_case(4, seed=5, preset="tiny").image)


@pytest.mark.parametrize("preset", sorted(PHANTOM_PRESETS))
def test_case_contract(preset):
    p = PHANTOM_PRESETS[preset]
    c = generate_case(0, preset=preset)
    assert c.image.dtype == np.float32 and c.image.shape == p.shape
    assert c.label.dtype == np.uint8 and c.label.shape == p.shape
    assert c.context.dtype == np.uint8 and c.context.shape == p.shape
    assert c.lookalike.dtype == np.bool_ and c.lookalike.shape == p.shape
    assert c.spacing == p.spacing and c.spacing[-1] > max(c.spacing[:-1])
    assert c.context_names == CONTEXT_NAMES
    assert set(np.unique(c.label)) == {0, 1}
    assert set(np.unique(c.context)) == set(range(len(CONTEXT_NAMES) + 1))
    # whole HU, representable as int16; air in the corners
    assert np.array_equal(c.image, np.rint(c.image))
    assert c.image.min() >= -1024 and c.image.max() <= 3071
    assert c.image[0, 0, 0] == -1000 and c.image[-1, -1, -1] == -1000
    assert all(n % d == 0 for n, d in zip(p.patch_size, (8, 8, 4), strict=True))


def test_lesions_lie_in_their_organs():
    for i in range(8):
        c = generate_case(i, preset="tiny")
        tumour = c.label > 0
        assert tumour.any(), f"case {i} has no tumour voxel"
        assert (c.context[tumour] == 1).all()
        assert c.lookalike.any() and (c.context[c.lookalike] == 2).all()
        assert not (tumour & c.lookalike).any()


def test_lookalikes_match_tumour_statistics():
    """Interior voxels of look-alikes and tumours: same mean (a few HU) and std; the spleen around
    the look-alikes has nearly the liver's mean; lesions are clearly hypodense."""
    tum, look, liver, spleen = [], [], [], []
    for i in range(4):
        c = generate_case(i)
        core_t = ndimage.binary_erosion(c.label > 0)
        core_l = ndimage.binary_erosion(c.lookalike)
        tum.append(c.image[core_t])
        look.append(c.image[core_l])
        liver.append(c.image[ndimage.binary_erosion(c.context == 1, iterations=2)
                             & ~ndimage.binary_dilation(c.label > 0, iterations=2)])
        spleen.append(c.image[ndimage.binary_erosion(c.context == 2, iterations=2)
                              & ~ndimage.binary_dilation(c.lookalike, iterations=2)])
    tum, look, liver, spleen = (np.concatenate(v) for v in (tum, look, liver, spleen))
    assert tum.size > 500 and look.size > 500
    assert abs(tum.mean() - look.mean()) < 4.0
    assert 0.85 < look.std() / tum.std() < 1.15
    assert abs(liver.mean() - spleen.mean()) < 10.0
    assert liver.mean() - tum.mean() > 30.0


def test_generation_is_fast():
    import time

    t = time.perf_counter()
    generate_case(0)
    assert time.perf_counter() - t < 1.0


def test_write_phantom_round_trip(tmp_path):
    out = write_phantom(tmp_path / "ds", preset="tiny", seed=2)
    assert out == tmp_path / "ds"
    js = json.loads((out / "dataset.json").read_text())
    assert js["channel_names"] == {"0": "CT"}
    assert js["labels"] == {"background": 0, "tumour": 1}
    assert js["numTraining"] == PHANTOM_PRESETS["tiny"].num_train and js["file_ending"] == ".nii.gz"
    meta = js["colabx"]
    assert meta["generator_version"] == GENERATOR_VERSION
    assert (meta["preset"], meta["seed"]) == ("tiny", 2)
    assert meta["context_labels"] == {"0": "none", "1": "liver", "2": "spleen", "3": "kidney",
                                      "4": "spine"}
    assert read_image(out / "imagesTr" / "phantom_000_0000.nii.gz").data.dtype == np.int16

    ds = load_dataset(out)
    assert [c.id for c in ds.cases] == [f"phantom_{i:03d}" for i in range(4)]
    assert [c.id for c in ds.test_cases] == ["phantom_test_000", "phantom_test_001"]
    for i, case in enumerate(ds.cases):
        want = generate_case(i, seed=2, preset="tiny")
        got = ds.load_case(case)
        assert got.image.dtype == np.float32 and np.array_equal(got.image[0], want.image)
        assert np.array_equal(got.label, want.label)
        assert np.array_equal(got.context, want.context)
        assert np.allclose(got.spacing, want.spacing)
        assert np.allclose(np.diag(got.affine)[:3], want.spacing)
    for j, case in enumerate(ds.test_cases):
        want = generate_case(TEST_INDEX_OFFSET + j, seed=2, preset="tiny")
        got = ds.load_case(case)
        assert np.array_equal(got.image[0], want.image) and np.array_equal(got.label, want.label)
        ctx = read_image(out / "contextTs" / f"{case.id}.nii.gz", "context").data
        assert np.array_equal(ctx, want.context)


def _siblings(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_write_refuses_non_empty_then_overwrites(tmp_path):
    out = write_phantom(tmp_path / "ds", preset="tiny", num_cases=1, num_test=0)
    assert not (out / "imagesTs").exists()
    with pytest.raises(ValueError, match="out_dir .* not empty"):
        write_phantom(out, preset="tiny", num_cases=2)
    assert load_dataset(out).json["numTraining"] == 1
    write_phantom(out, preset="tiny", num_cases=2, num_test=1, overwrite=True)
    ds = load_dataset(out)
    assert len(ds.cases) == 2 and len(ds.test_cases) == 1
    assert _siblings(tmp_path) == ["ds"]  # no temporary or old folder left behind
    (tmp_path / "empty").mkdir()
    write_phantom(tmp_path / "empty", preset="tiny", num_cases=1, num_test=0)
    assert len(load_dataset(tmp_path / "empty")) == 1


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    out = write_phantom(tmp_path / "ds", preset="tiny", num_cases=1, num_test=0)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    calls = []

    def flaky(index, **kw):
        calls.append(index)
        if len(calls) > 1:
            raise RuntimeError("disk full")
        return generate_case(index, **kw)

    monkeypatch.setattr(ph, "generate_case", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        write_phantom(out, preset="tiny", num_cases=3, overwrite=True)
    with pytest.raises(RuntimeError, match="disk full"):
        calls.clear()
        write_phantom(tmp_path / "new", preset="tiny", num_cases=3)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert _siblings(tmp_path) == ["ds"]


def test_phantom_dataset_cache(tmp_path, monkeypatch):
    tiny = PHANTOM_PRESETS["tiny"]
    monkeypatch.setattr(ph, "PHANTOM_PRESETS", {**PHANTOM_PRESETS, "tiny": ph.PhantomPreset(
        tiny.shape, tiny.spacing, 2, 1, tiny.patch_size)})
    monkeypatch.setenv("COLABX_CACHE", str(tmp_path / "env"))
    out = phantom_dataset("tiny", seed=1)
    assert out == tmp_path / "env" / f"phantom-tiny-seed1-v{GENERATOR_VERSION}"
    assert len(load_dataset(out)) == 2
    stamp = (out / "dataset.json").stat().st_mtime_ns
    monkeypatch.setattr(ph, "_build", lambda *a, **k: pytest.fail("regenerated a cached dataset"))
    assert phantom_dataset("tiny", seed=1) == out
    assert (out / "dataset.json").stat().st_mtime_ns == stamp


def test_phantom_dataset_race_loser_uses_winner(tmp_path, monkeypatch):
    build = ph._build
    target = tmp_path / f"phantom-tiny-seed0-v{GENERATOR_VERSION}"

    def build_while_another_process_wins(folder, p, preset, seed, n, nt, progress):
        build(folder, p, preset, seed, 1, 0, progress)
        build(target, p, preset, seed, 1, 0, progress)  # the winner renames first
        (target / "winner").touch()

    monkeypatch.setattr(ph, "_build", build_while_another_process_wins)
    assert phantom_dataset("tiny", cache_dir=tmp_path) == target
    assert (target / "winner").exists()
    assert _siblings(tmp_path) == [target.name]


@pytest.mark.parametrize(("call", "name"), [
    (lambda: generate_case(0, preset="huge"), "preset"),
    (lambda: generate_case(-1), "index"),
    (lambda: generate_case(1.5), "index"),
    (lambda: generate_case(True), "index"),
    (lambda: generate_case(0, seed=-2), "seed"),
    (lambda: write_phantom("unused", preset="nope"), "preset"),
    (lambda: write_phantom("unused", num_cases=0), "num_cases"),
    (lambda: write_phantom("unused", num_test=-1), "num_test"),
    (lambda: phantom_dataset("nope"), "preset"),
    (lambda: phantom_dataset("tiny", seed=-1), "seed"),
])
def test_bad_arguments(call, name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=name):
        call()
    assert not os.listdir(tmp_path)


def test_out_dir_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        write_phantom(tmp_path / "f", preset="tiny")


def test_phantom_dataset_refuses_a_foreign_cache_folder(tmp_path):
    junk = tmp_path / f"phantom-tiny-seed0-v{GENERATOR_VERSION}"
    junk.mkdir()
    (junk / "stray.txt").write_text("x")
    with pytest.raises(OSError, match="without a dataset.json"):
        phantom_dataset("tiny", cache_dir=tmp_path)
    assert _siblings(tmp_path) == [junk.name]

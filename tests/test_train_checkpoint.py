"""Checkpoints: atomic writes (a failed save leaves the previous file valid), weights_only
loading, RNG state round trip."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from colabx import checkpoint as ck


def _state(v: float) -> dict:
    return {"model": {"w": torch.full((3,), v)}, "config": {"epochs": 2}, "epoch": 1,
            "rng": ck.capture_rng(), "log": [{"epoch": 1, "train_loss": v, "val_dsc": None}]}


def test_roundtrip_with_weights_only(tmp_path):
    p = tmp_path / "c.pth"
    ck.save_checkpoint(p, _state(1.5))
    s = ck.load_checkpoint(p)
    assert torch.equal(s["model"]["w"], torch.full((3,), 1.5))
    assert s["log"][0]["train_loss"] == 1.5


def test_failed_save_keeps_previous(tmp_path, monkeypatch):
    p = tmp_path / "c.pth"
    ck.save_checkpoint(p, _state(1.0))

    def broken(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(p, _state(2.0))
    monkeypatch.undo()
    assert torch.equal(ck.load_checkpoint(p)["model"]["w"], torch.ones(3))
    assert [x.name for x in tmp_path.iterdir()] == ["c.pth"]   # no temp file left


def test_foreign_or_corrupt_files(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        ck.load_checkpoint(bad)
    other = tmp_path / "other.pth"
    torch.save({"weights": torch.ones(1)}, other)
    with pytest.raises(ValueError, match="not a colabx checkpoint"):
        ck.load_checkpoint(other)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ck.load_checkpoint(tmp_path / "missing.pth")


def test_code_in_checkpoint_is_refused(tmp_path):
    p = tmp_path / "evil.pth"
    torch.save({"model": {}, "config": {}, "x": np.dtype("float32"), "f": random.Random()}, p)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        ck.load_checkpoint(p)


def test_rng_roundtrip(tmp_path):
    random.seed(1)
    np.random.seed(2)  # noqa: NPY002
    torch.manual_seed(3)
    p = tmp_path / "c.pth"
    ck.save_checkpoint(p, _state(0.0))
    a = (random.random(), np.random.rand(), torch.rand(2))  # noqa: NPY002
    ck.restore_rng(ck.load_checkpoint(p)["rng"])
    b = (random.random(), np.random.rand(), torch.rand(2))  # noqa: NPY002
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_old_plan_keys_are_renamed_on_load(tmp_path):
    from colabx.checkpoint import load_checkpoint, save_checkpoint

    path = tmp_path / "old.pth"
    save_checkpoint(path, {"model": {}, "config": {}, "plan": {"t": 2}, "plans": {"x": 1}})
    state = load_checkpoint(path)
    assert state["network_plan"] == {"t": 2} and state["preprocessing_plans"] == {"x": 1}
    assert "plan" not in state and "plans" not in state

"""Fault injection: ``colabx train`` killed (SIGKILL) at random moments and restarted with
``--resume`` ends with the weights of an uninterrupted run, and its log.csv and TensorBoard events
hold every epoch exactly once."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import colabx
from colabx.checkpoint import load_checkpoint
from colabx.data.phantom import write_phantom
from colabx.train.config import TrainConfig, save_config

EPOCHS = 6


def _command(cfg: Path, out: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "colabx", "train", "--config", str(cfg), "--out", str(out),
            *(["--resume"] if resume else [])]


def _env(cache: Path) -> dict[str, str]:
    # the child imports the colabx this test imported (installed or built in place)
    root = str(Path(colabx.__file__).resolve().parents[1])
    return {**os.environ, "COLABX_CACHE": str(cache), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
def test_killed_and_resumed_training_equals_an_uninterrupted_run(tmp_path):
    data = write_phantom(tmp_path / "phantom", preset="tiny", num_cases=4, num_test=1)
    cfg = TrainConfig(dataset=str(data), mode="colab", epochs=EPOCHS, iterations=10,
                      base_features=4, num_pool=2, patch_size=[16, 16, 8], num_workers=0,
                      progress=False, threads=1, val_cases=1, snapshot_every=2, device="cpu")
    save_config(cfg, tmp_path / "cfg.yaml")
    env = _env(tmp_path / "cache")

    # the uninterrupted run, timing its set-up (until config.yaml is written) and its training
    t0 = time.monotonic()
    full = subprocess.Popen(_command(tmp_path / "cfg.yaml", tmp_path / "full", False), env=env,
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    setup = None
    while full.poll() is None:
        if setup is None and (tmp_path / "full" / "config.yaml").is_file():
            setup = time.monotonic() - t0
        time.sleep(0.02)
    duration = time.monotonic() - t0
    assert full.returncode == 0, full.stderr.read()[-3000:]
    assert setup is not None

    part = tmp_path / "part"
    rng = np.random.default_rng(20261203)
    kills, starts = [], 0

    def enough() -> bool:  # 5 kills, 2 of them of resumed runs
        return len(kills) >= 5 and sum(done > 0 for done, _ in kills) >= 2

    while not enough():
        assert starts < 40, f"could not kill a running training 5 times: {kills}, {duration} s"
        starts += 1
        resume = (part / "checkpoint_latest.pth").is_file()
        proc = subprocess.Popen(_command(tmp_path / "cfg.yaml", part, resume), env=env,
                                cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        done = load_checkpoint(part / "checkpoint_latest.pth")["epoch"] if resume else 0
        # a moment in the set-up (one start in five) or within what is left of the training
        left = (duration - setup) * (1 - done / EPOCHS)
        delay = float(rng.uniform(0.3, 1.0)) * setup if rng.random() < 0.2 else \
            setup + float(rng.uniform(0.0, 1.0)) * left
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills.append((done, round(delay, 2)))
            continue
        assert proc.returncode == 0, proc.stderr.read()[-3000:]
        # finished before the kill (a loaded machine moves the timings): start anew
        shutil.rmtree(part)
    if not (part / "checkpoint_final.pth").is_file():
        done = subprocess.run(_command(tmp_path / "cfg.yaml", part,
                                       (part / "checkpoint_latest.pth").is_file()),
                              env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    print(f"uninterrupted run {duration:.1f} s (set-up {setup:.1f} s); kills (epochs done, "
          f"seconds after start): {kills}")
    assert sum(done > 0 for done, _ in kills) >= 2, kills  # resumed runs were killed too
    want = load_checkpoint(tmp_path / "full" / "checkpoint_final.pth")
    got = load_checkpoint(part / "checkpoint_final.pth")
    for key in ("model", "generator"):
        for name, t in want[key].items():
            assert torch.equal(got[key][name], t), f"{key}.{name} after kills {kills}"
    rows = list(csv.DictReader((part / "log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    full_rows = list(csv.DictReader((tmp_path / "full" / "log.csv").open()))
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in full_rows]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(part / "tensorboard"))
    acc.Reload()
    for tag in ("train_loss", "val_dsc"):
        assert [e.step for e in acc.Scalars(tag)] == list(range(1, EPOCHS + 1)), (tag, kills)
    assert not list(part.rglob(".*.tmp"))

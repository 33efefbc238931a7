"""What a user can lose or misread: output folders, --resume, checks before training, devices,
bounds, disk-full writes, TensorBoard on resume and exit codes (through the ``colabx`` CLI)."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import colabx
from colabx import _io
from colabx.checkpoint import load_checkpoint
from colabx.cli import main
from colabx.data.phantom import write_phantom

TINY = ["--epochs", "1", "--iterations", "2", "--base-features", "4", "--num-pool", "2",
        "--patch-size", "16", "16", "8", "--num-workers", "0", "--no-progress", "--threads", "1",
        "--val-cases", "1", "--snapshot-every", "0"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return write_phantom(tmp_path_factory.mktemp("safety") / "phantom", preset="tiny",
                         num_cases=4, num_test=1)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("COLABX_CACHE", str(tmp_path_factory.getbasetemp() / "safety-cache"))


def _train(*args: str) -> int:
    return main(["train", *TINY, *args])


@pytest.fixture(scope="module")
def trained(phantom, tmp_path_factory):
    """A finished vanilla run (1 epoch) to predict from and to resume."""
    run = tmp_path_factory.mktemp("trained") / "run"
    os.environ["COLABX_CACHE"] = str(tmp_path_factory.getbasetemp() / "safety-cache")
    assert _train(str(phantom), "--mode", "vanilla", "--out", str(run)) == 0
    return run


# -- 1. output folders --------------------------------------------------------------------------

def test_train_refuses_a_folder_of_other_files(phantom, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "evaluation.json").write_text('{"mine": 1}')
    mine = out / "config.yaml"
    mine.write_text("epochs: 1\n")
    assert _train(str(phantom), "--mode", "vanilla", "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert f"{out}: folder is not empty and is not a colabx run folder" in err
    assert "--overwrite" in err
    assert (out / "evaluation.json").read_text() == '{"mine": 1}'
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "evaluation.json"]


def test_train_never_writes_over_its_config_file(phantom, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    cfg = out / "config.yaml"
    cfg.write_text("mode: vanilla\n")
    for extra in ([], ["--overwrite"]):
        assert _train(str(phantom), "--config", str(cfg), "--out", str(out), *extra) == 2
        assert "is the config.yaml that colabx train writes" in capsys.readouterr().err
    assert cfg.read_text() == "mode: vanilla\n"


def test_train_overwrite_replaces_an_earlier_run_whole(phantom, trained, tmp_path):
    run = tmp_path / "again"
    shutil.copytree(trained, run)
    (run / "checkpoint_best.pth").write_bytes(b"stale")
    assert _train(str(phantom), "--mode", "vanilla", "--out", str(run)) == 2
    assert _train(str(phantom), "--mode", "dilation", "--out", str(run), "--overwrite") == 0
    assert load_checkpoint(run / "checkpoint_final.pth")["config"]["mode"] == "dilation"
    assert (run / "checkpoint_best.pth").read_bytes() != b"stale"
    rows = list(csv.DictReader((run / "log.csv").open()))
    assert [r["epoch"] for r in rows] == ["1"]


def test_predict_refuses_a_folder_of_other_files_and_reruns_into_its_own(
        phantom, trained, tmp_path, capsys):
    out = tmp_path / "preds"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["predict", str(trained), str(phantom / "imagesTs"), str(out), "--device", "cpu"]
    assert main(args) == 2
    assert "is not a colabx prediction folder" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    fresh = tmp_path / "fresh"
    assert main(["predict", str(trained), str(phantom / "imagesTs"), str(fresh)]) == 0
    assert main(["predict", str(trained), str(phantom / "imagesTs"), str(fresh)]) == 0  # again


def test_predict_refuses_another_predictions_folder_unless_overwrite(
        phantom, trained, tmp_path, capsys):
    """Another prediction's outputs would mix with this one's under this one's marker: refused;
    --overwrite removes them first. A rerun of the same prediction removes a killed writer's
    temporaries."""
    both, one = tmp_path / "both", tmp_path / "one"
    both.mkdir()
    one.mkdir()
    images = sorted((phantom / "imagesTr").iterdir())[:2]
    for p in images:
        shutil.copy(p, both / p.name)
    shutil.copy(images[1], one / images[1].name)
    out = tmp_path / "preds"
    assert main(["predict", str(trained), str(both), str(out), "--device", "cpu",
                 "--save-probabilities"]) == 0
    first = sorted(p.name for p in out.iterdir())
    assert main(["predict", str(trained), str(one), str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{out}: holds the predictions of another colabx predict" in err
    assert "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == first
    assert main(["predict", str(trained), str(one), str(out), "--device", "cpu",
                 "--overwrite", "--no-progress"]) == 0
    assert "predicting" not in capsys.readouterr().err  # no progress bar
    case = images[1].name.replace("_0000.nii.gz", "")
    assert sorted(p.name for p in out.iterdir()) == ["colabx_predict.json", f"{case}.nii.gz"]
    assert json.loads((out / "colabx_predict.json").read_text())["cases"] == [case]
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = out / f".{case}.nii.gz.{dead}.0123abcd.tmp"
    stale.write_bytes(b"half")
    assert main(["predict", str(trained), str(one), str(out), "--device", "cpu"]) == 0
    assert not stale.exists()


def test_failed_predict_leaves_no_folder(phantom, trained, tmp_path, capsys):
    bad = tmp_path / "in"
    bad.mkdir()
    for p in (phantom / "imagesTs").iterdir():
        (bad / p.name).write_bytes(p.read_bytes()[:200])  # truncated: unreadable
    out = tmp_path / "never"
    assert main(["predict", str(trained), str(bad), str(out), "--device", "cpu"]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert not out.exists()


def test_a_second_process_on_a_run_folder_is_refused(phantom, tmp_path, capsys):
    """Two trainings writing one run folder would interleave their checkpoints and logs: while
    one process holds the folder, another stops before touching it; the lock goes with its
    holder, also when that is killed."""
    import subprocess
    import sys

    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from colabx._io import lock_folder; "
         "lock = lock_folder(sys.argv[1], 'run folder'); print('locked', flush=True); "
         "time.sleep(120)", str(run)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(Path(colabx.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])})
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ((), ("--overwrite",)):
            assert _train(str(phantom), "--mode", "vanilla", "--out", str(run), *extra) == 2
            err = capsys.readouterr().err
            assert f"{run}: another colabx process (pid {holder.pid}) is writing this run " \
                "folder" in err
            assert {p.name for p in run.iterdir()} == {_io.LOCK_FILE}
    finally:
        holder.kill()
        holder.wait()
    assert _train(str(phantom), "--mode", "vanilla", "--out", str(run)) == 0
    # released when the run ended: another run may resume it
    _io.lock_folder(run, "run folder").release()


def test_a_failed_start_removes_only_the_empty_folders_it_created(phantom, tmp_path, capsys):
    """--out new/run beside --preprocessed new/pre, both new, and the start fails after
    preprocessing: the run folder goes, the preprocessed data and their parent stay."""
    new = tmp_path / "new"
    assert _train(str(phantom), "--mode", "vanilla", "--out", str(new / "run"),
                  "--preprocessed", str(new / "pre"), "--patch-size", "5", "5", "5") == 2
    assert "error" in capsys.readouterr().err
    assert (new / "pre" / "plans.json").is_file() and not (new / "run").exists()


def test_checkpoint_best_is_written_before_checkpoint_latest(phantom, tmp_path, monkeypatch):
    """A run killed between the two saves of an improving epoch: checkpoint_best.pth holds at
    least the score checkpoint_latest.pth records, so the resumed run still ends with the best
    epoch's weights. (Saved the other way round, checkpoint_latest would record the new best
    while checkpoint_best held the old one, and the resumed run would never replace it.)"""
    from colabx.train import trainer as trainer_module

    scores = {1: 0.2, 2: 0.5}
    validated: list[int] = []

    def validate(evaluator, ids):
        validated.append(len(validated) + 1)
        dsc = scores[min(len(validated), 2)]
        return dict.fromkeys(("val_dsc", "val_sensitivity", "val_precision"), dsc)

    monkeypatch.setattr(trainer_module.evaluation, "validate", validate)
    real_save = trainer_module.save_checkpoint
    saves_of_epoch_2 = []

    def killed_between_the_saves_of_epoch_2(path, state):
        if state["epoch"] == 2:
            saves_of_epoch_2.append(path.name)
            if len(saves_of_epoch_2) == 2:
                raise KeyboardInterrupt
        real_save(path, state)

    monkeypatch.setattr(trainer_module, "save_checkpoint", killed_between_the_saves_of_epoch_2)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        trainer_module.Trainer(_partial_config(phantom), run, echo=lambda s: None).run()
    latest = load_checkpoint(run / "checkpoint_latest.pth")
    best = load_checkpoint(run / "checkpoint_best.pth")
    assert best["best_dsc"] >= latest["best_dsc"]

    monkeypatch.setattr(trainer_module, "save_checkpoint", real_save)
    validated[:] = [1]  # the resumed run validates epoch 2 again
    trainer_module.Trainer(_partial_config(phantom), run, resume=True,
                           echo=lambda s: None).run()
    best = load_checkpoint(run / "checkpoint_best.pth")
    assert best["epoch"] == 2 and best["best_dsc"] == 0.5


# -- 2. --resume ---------------------------------------------------------------------------------

def _partial_config(phantom, **kw):
    from colabx.train.config import TrainConfig

    return TrainConfig(dataset=str(phantom), mode="colab", epochs=2, iterations=2,
                       base_features=4, num_pool=2, patch_size=[16, 16, 8], num_workers=0,
                       progress=False, threads=1, val_cases=1, snapshot_every=0, device="cpu",
                       **kw)


def _partial_run(phantom, out, tmp_path, **kw):
    """A colab run stopped after 1 of 2 epochs, as a killed training leaves it."""
    from colabx.train.trainer import Trainer

    Trainer(_partial_config(phantom, **kw), out, echo=lambda s: None).run(max_epochs=1)


def test_runs_saved_before_an_option_existed_resume(phantom, tmp_path):
    """A run saved before ``generator_upsampling`` existed (transposed convs, no key in its
    configuration or plan; the plans under the old keys "plan" and "plans") resumes with nothing
    given, though today's default differs."""
    from colabx.checkpoint import save_checkpoint

    run = tmp_path / "old"
    _partial_run(phantom, run, tmp_path, generator_upsampling="transposed")
    state = load_checkpoint(run / "checkpoint_latest.pth")
    del state["config"]["generator_upsampling"], state["network_plan"]["generator_upsampling"]
    # and its plans under their old keys
    state["plan"], state["plans"] = state.pop("network_plan"), state.pop("preprocessing_plans")
    save_checkpoint(run / "checkpoint_latest.pth", state)
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    final = load_checkpoint(run / "checkpoint_final.pth")
    assert final["config"]["generator_upsampling"] == "transposed"
    assert {"network_plan", "preprocessing_plans"} <= set(final) and "plan" not in final


def test_resume_refuses_options_that_must_match(phantom, tmp_path, capsys):
    run = tmp_path / "run"
    _partial_run(phantom, run, tmp_path)
    other = tmp_path / "other"
    write_phantom(other, preset="tiny", num_cases=3, num_test=1)
    assert main(["train", str(other), "--mode", "vanilla", "--lr", "0.5", "--out", str(run),
                 "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume with different options" in err
    for key in ("dataset:", "mode: run 'colab', given 'vanilla'", "lr: run 0.01, given 0.5"):
        assert key in err
    assert load_checkpoint(run / "checkpoint_latest.pth")["epoch"] == 1


def test_resume_refuses_a_dataset_whose_cases_changed(phantom, tmp_path, capsys):
    """A case added to the dataset changes the split: held-out cases could be trained on and
    checkpoint_best chosen on other cases, so resuming is refused; files that are only touched
    (the same cases) resume with a warning."""
    data = tmp_path / "data"
    shutil.copytree(phantom, data)
    run = tmp_path / "run"
    _partial_run(data, run, tmp_path)
    added = []
    for sub, suffix in (("imagesTr", "_0000"), ("labelsTr", ""), ("contextTr", "")):
        src = data / sub / f"phantom_000{suffix}.nii.gz"
        added.append(data / sub / f"phantom_900{suffix}.nii.gz")
        shutil.copy(src, added[-1])
    js = json.loads((data / "dataset.json").read_text())
    (data / "dataset.json").write_text(json.dumps({**js, "numTraining": js["numTraining"] + 1}))
    assert main(["train", "--out", str(run), "--resume", "--no-progress", "--epochs", "3"]) == 2
    out, err = capsys.readouterr()
    assert "the dataset's cases changed since this run started" in err
    assert "new: ['phantom_900']" in err
    assert "resume: epochs" not in out  # a refused resume announces no change
    assert load_checkpoint(run / "checkpoint_latest.pth")["epoch"] == 1

    for p in added:
        p.unlink()
    (data / "dataset.json").write_text(json.dumps(js))
    os.utime(data / "labelsTr" / "phantom_001.nii.gz")
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert "warning: resume: the dataset's files" in capsys.readouterr().out
    assert load_checkpoint(run / "checkpoint_final.pth")["epoch"] == 2


def test_resume_may_turn_fp16_loss_scaling_on(phantom, tmp_path):
    """A run saved without fp16 holds a disabled GradScaler's empty state; resuming it with
    fp16 (--amp fp16 on CUDA, simulated here: the scaler follows amp_dtype) starts a fresh
    scale instead of failing to load that state."""
    from colabx.train.trainer import Trainer

    class Fp16(Trainer):
        def _setup_runtime(self):
            super()._setup_runtime()
            self.amp_dtype = torch.float16

    run = tmp_path / "run"
    _partial_run(phantom, run, tmp_path)
    assert load_checkpoint(run / "checkpoint_latest.pth")["scaler"] == {}
    resumed = Fp16(_partial_config(phantom), run, resume=True, echo=lambda s: None)
    assert resumed.scaler.is_enabled() and resumed.start_epoch == 1
    assert resumed.scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()


def test_resume_applies_and_logs_options_that_may_change(phantom, tmp_path, capsys,
                                                         monkeypatch):
    run = tmp_path / "run"
    _partial_run(phantom, run, tmp_path)
    monkeypatch.chdir(tmp_path)  # the run stored its dataset as an absolute path
    assert main(["train", "--out", str(run), "--resume", "--epochs", "3", "--no-progress",
                 "--theta-pm", "grouped", "--recompute-generator"]) == 0
    out = capsys.readouterr().out
    assert "resume: epochs 2 -> 3" in out
    # the same meta-gradient computed another way: a resumed run may switch
    assert "resume: theta_pm 'sequential' -> 'grouped'" in out
    assert "resume: recompute_generator False -> True" in out
    state = load_checkpoint(run / "checkpoint_final.pth")
    assert state["epoch"] == 3 and state["config"]["epochs"] == 3
    assert state["config"]["dataset"] == str(phantom.absolute())
    assert _train("--out", str(run), "--resume", "--epochs", "1") == 2
    assert "already trained 3 epochs" in capsys.readouterr().err


# -- 3. checks before the first iteration --------------------------------------------------------

def test_bad_test_label_stops_the_run_before_training(phantom, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(phantom, ds)
    import nibabel as nib
    import numpy as np

    p = next((ds / "labelsTs").iterdir())
    img = nib.load(p)
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, img.affine, img.header), p)
    run = tmp_path / "run"
    assert _train(str(ds), "--mode", "vanilla", "--out", str(run)) == 2
    assert f"{p}: label map has value(s) [7]" in capsys.readouterr().err
    assert not run.exists()


def test_training_labels_with_the_ignore_label_are_refused(phantom, tmp_path, capsys):
    """The training losses have no ignored voxels: a dataset whose training labels hold the
    ignore value is refused before training, with nothing written to the run folder."""
    import nibabel as nib
    import numpy as np

    data = tmp_path / "data"
    shutil.copytree(phantom, data)
    js = json.loads((data / "dataset.json").read_text())
    js["labels"]["ignore"] = 2
    (data / "dataset.json").write_text(json.dumps(js))
    path = data / "labelsTr" / "phantom_001.nii.gz"
    img = nib.load(str(path))
    lbl = np.asarray(img.dataobj).copy()
    lbl[:2] = 2  # two slices of "unknown"
    nib.save(nib.Nifti1Image(lbl, img.affine), str(path))
    out = tmp_path / "run"
    assert _train(str(data), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "training case(s) (phantom_001) hold the ignore label 2" in err
    assert not out.exists()


def test_split_without_training_case_is_a_clear_error(phantom, tmp_path, capsys):
    assert _train(str(phantom), "--val-fraction", "0.9", "--out", str(tmp_path / "r")) == 2
    assert "val_fraction: 0.9 holds out all 4 case(s), leaving no training case" in \
        capsys.readouterr().err


def test_no_training_case_with_an_roi_is_a_clear_error(tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    ds = write_phantom(tmp_path / "ds", preset="tiny", num_cases=4, num_test=1)
    from colabx.train.trainer import SPLIT_SEED

    order = np.random.default_rng(SPLIT_SEED).permutation(4)
    ids = sorted(p.name[:-7] for p in (ds / "labelsTr").iterdir())
    val = ids[order[0]]
    for cid in ids:  # foreground only in the case the 25 % split holds out
        if cid != val:
            p = ds / "labelsTr" / f"{cid}.nii.gz"
            img = nib.load(p)
            nib.save(nib.Nifti1Image(np.zeros(img.shape, np.int16), img.affine), p)
    assert _train(str(ds), "--val-fraction", "0.25", "--out", str(tmp_path / "r")) == 2
    assert "none of the 3 training case(s) contains an ROI voxel" in capsys.readouterr().err


def test_no_held_out_case_is_announced(phantom, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(phantom, ds)
    shutil.rmtree(ds / "labelsTs")
    assert _train(str(ds), "--mode", "vanilla", "--val-fraction", "0", "--out",
                  str(tmp_path / "r")) == 0
    out = capsys.readouterr().out
    assert "warning: no validation case" in out and "warning: no labelled test case" in out


# -- 4. devices ------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("device,match", [
    ("cuda", "device: 'cuda' requested but CUDA is not available"),
    ("cuda:1", "device: 'cuda:1' requested but CUDA is not available"),
    ("cudaXYZ", "device: expected auto, cpu, cuda or cuda:N, got 'cudaXYZ'"),
    ("banana", "device: expected auto, cpu, cuda or cuda:N, got 'banana'"),
])
def test_bad_devices_are_one_line_errors(phantom, trained, tmp_path, capsys, device, match):
    assert _train(str(phantom), "--device", device, "--out", str(tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and err.count("\n") == 1
    assert main(["predict", str(trained), str(phantom / "imagesTs"), str(tmp_path / "p"),
                 "--device", device]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
    assert not (tmp_path / "p").exists() and not (tmp_path / "r").exists()


# -- 5. bounds -------------------------------------------------------------------------------------

@pytest.mark.parametrize("overlap", ["0.9999", "1.5", "-0.1"])
def test_predict_overlap_is_bounded(phantom, trained, tmp_path, capsys, overlap):
    assert main(["predict", str(trained), str(phantom / "imagesTs"), str(tmp_path / "p"),
                 "--overlap", overlap]) == 2
    assert f"overlap: must be in [0, 0.9], got {float(overlap)}" in capsys.readouterr().err


def test_seed_out_of_range_names_the_option(phantom, tmp_path, capsys):
    assert _train(str(phantom), "--seed", str(2**64), "--out", str(tmp_path / "r")) == 2
    assert "seed: must be <= 4294967295" in capsys.readouterr().err


def test_spacing_that_is_not_numbers_names_spacing():
    import colabx

    with pytest.raises(ValueError, match=r"spacing must be numbers, got \('a', 1, 1\)"):
        colabx.distance_transform(torch.ones(1, 4, 4, 4, dtype=torch.bool), spacing=("a", 1, 1))
    from colabx.inference import evaluate_case

    with pytest.raises(ValueError, match="spacing must be numbers"):
        evaluate_case(torch.ones(4, 4, 4, dtype=torch.long), torch.ones(4, 4, 4,
                      dtype=torch.long), 2, spacing=("a", 1, 1))


# -- 6. disk full ---------------------------------------------------------------------------------

def test_disk_full_at_a_checkpoint_is_one_line_and_keeps_the_previous(phantom, tmp_path,
                                                                    monkeypatch, capsys):
    run = tmp_path / "run"
    _partial_run(phantom, run, tmp_path)
    before = (run / "checkpoint_latest.pth").read_bytes()
    real_fsync = os.fsync

    def full(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if "checkpoint_latest" in name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(_io.os, "fsync", full)
    assert _train("--out", str(run), "--resume", "--epochs", "2") == 2
    err = capsys.readouterr().err
    assert "checkpoint_latest.pth: cannot write (No space left on device); its previous " \
        "version is kept" in err and err.count("\n") == 1
    assert (run / "checkpoint_latest.pth").read_bytes() == before
    assert not list(run.glob(".*.tmp"))


def test_leftover_temporaries_of_a_killed_writer_are_removed(phantom, tmp_path):
    run = tmp_path / "run"
    _partial_run(phantom, run, tmp_path)
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = run / f".checkpoint_latest.pth.{dead}.0123abcd.tmp"
    stale.write_bytes(b"half")
    live = run / f".log.csv.{os.getpid()}.0123abcd.tmp"
    live.write_bytes(b"someone is writing this")
    assert _train("--out", str(run), "--resume", "--epochs", "2") == 0
    assert not stale.exists() and live.exists()


# -- 7. TensorBoard on resume ---------------------------------------------------------------------

def _tensorboard_epochs(run) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [e.step for e in acc.Scalars("train_loss")]


def test_tensorboard_holds_every_epoch_once_after_two_resumes(phantom, tmp_path):
    from colabx.train.config import TrainConfig
    from colabx.train.trainer import Trainer

    cfg = TrainConfig(dataset=str(phantom), mode="vanilla", epochs=4, iterations=1,
                      base_features=4, num_pool=2, patch_size=[16, 16, 8], num_workers=0,
                      progress=False, threads=1, val_cases=1, snapshot_every=0, device="cpu")
    run = tmp_path / "run"
    Trainer(cfg, run, echo=lambda s: None).run(max_epochs=2)
    Trainer(cfg, run, resume=True, echo=lambda s: None).run(max_epochs=1)
    Trainer(cfg, run, resume=True, echo=lambda s: None).run()
    assert _tensorboard_epochs(run) == [1, 2, 3, 4]


# -- 9. smaller ----------------------------------------------------------------------------------

def test_interrupt_is_one_line_and_exit_130(monkeypatch, capsys):
    import colabx.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(colabx.cli._COMMANDS, "evaluate", interrupted)
    assert main(["evaluate", "p", "r", "--labels", "l.json"]) == 130
    assert capsys.readouterr().err == "colabx evaluate: interrupted\n"


def test_interrupt_while_starting_up_is_one_line_and_exit_130(monkeypatch, capsys):
    """Ctrl-C while the command line is being built (it imports torch: seconds) is the same
    one line and exit status as during the command."""
    import colabx.cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(colabx.cli, "_parser", interrupted)
    assert main(["train", "--epochs", "1"]) == 130
    assert capsys.readouterr().err == "colabx train: interrupted\n"


def test_resume_with_overwrite_is_refused(trained, capsys):
    before = (trained / "checkpoint_latest.pth").read_bytes()
    assert _train("--out", str(trained), "--resume", "--overwrite") == 2
    assert "--resume continues the run in --out and --overwrite replaces it: pass one of them" \
        in capsys.readouterr().err
    assert (trained / "checkpoint_latest.pth").read_bytes() == before


def test_flags_the_run_would_not_use_are_warned_about(trained, phantom, capsys, monkeypatch):
    """Given on the command line only: a --config file (a run's config.yaml holds every
    option) is not warned about."""
    assert _train(str(phantom), "--mode", "vanilla", "--t", "3", "--meta-period", "2",
                  "--out", str(trained)) == 2
    err = capsys.readouterr().err
    assert "colabx train: warning: --t has no effect here: it is used by modes colab and " \
        "kmeans" in err
    assert "colabx train: warning: --meta-period has no effect here: it is used by mode " \
        "colab only" in err
    assert _train("--config", str(trained / "config.yaml"), "--out", str(trained)) == 2
    assert "warning" not in capsys.readouterr().err
    # under torchrun, once (from rank 0), not once per process
    monkeypatch.setenv("RANK", "1")
    _train(str(phantom), "--mode", "vanilla", "--t", "3", "--out", str(trained))
    assert "warning" not in capsys.readouterr().err


def test_resume_without_a_readable_checkpoint_says_what_to_do(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    assert _train("--out", str(run), "--resume") == 2
    assert f"{run}: nothing to resume (no checkpoint_latest.pth" in capsys.readouterr().err
    (run / "checkpoint_latest.pth").write_bytes(b"PK\x03\x04 cut off by a full disk")
    assert _train("--out", str(run), "--resume") == 2
    err = capsys.readouterr().err
    assert "not a readable checkpoint" in err and "--overwrite starts it anew" in err


def test_resume_without_out_and_existing_run_exit_2(trained, phantom, capsys):
    assert main(["train", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err
    assert _train(str(phantom), "--mode", "vanilla", "--out", str(trained)) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err


def test_make_phantom_names_the_overwrite_flag(tmp_path, capsys):
    out = tmp_path / "x"
    out.mkdir()
    (out / "a").write_text("a")
    assert main(["make-phantom", str(out), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" not in err


def test_predict_channel_count_error_names_the_model(phantom, trained, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    img = next((phantom / "imagesTs").iterdir())
    shutil.copy(img, src / img.name)
    shutil.copy(img, src / img.name.replace("_0000", "_0001"))
    assert main(["predict", str(trained), str(src), str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert f"the model of {trained} expects 1 channel(s)" in err and "dataset.json" not in err


def test_run_folder_lock_on_odd_file_systems(tmp_path, monkeypatch):
    """A file given as --out is named as such; a file system without flock warns and runs
    unlocked (closing what it opened); another user's read-only lock file still locks."""
    import errno

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(_io.OutputFolderError, match="afile: exists and is not a folder"):
        _io.lock_folder(afile, "run folder")

    opened = []
    real_open = os.open

    def spy_open(*a, **kw):
        opened.append(real_open(*a, **kw))
        return opened[-1]

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(_io.os, "open", spy_open)
    monkeypatch.setattr(_io.fcntl, "flock", no_locks)
    with pytest.warns(RuntimeWarning, match="does not support locking"):
        lock = _io.lock_folder(tmp_path / "nfs", "run folder")
    lock.release()
    with pytest.raises(OSError):  # the descriptor it opened was closed
        os.fstat(opened[-1])
    monkeypatch.undo()

    shared = tmp_path / "shared"
    _io.lock_folder(shared, "run folder").release()

    def another_users_file(path, flags, *a):  # root may write any file: refuse by hand
        if flags & os.O_RDWR:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *a)

    monkeypatch.setattr(_io.os, "open", another_users_file)
    lock = _io.lock_folder(shared, "run folder")
    monkeypatch.undo()
    with pytest.raises(_io.OutputFolderError, match="another colabx process"):
        _io.lock_folder(shared, "run folder")
    lock.release()

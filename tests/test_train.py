"""The trainer end to end on the tiny phantom: every mode, run-directory contents, exact resume,
and data-parallel (gloo, 2 processes) equivalence with single-process training."""

from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import colabx
from colabx.checkpoint import load_checkpoint
from colabx.train.config import ConfigError, TrainConfig, save_config
from colabx.train.trainer import Trainer


def _cfg(**kw) -> TrainConfig:
    base = dict(phantom_preset="tiny", epochs=1, iterations=2, batch_size=2, base_features=4,
                max_features=16, num_pool=2, patch_size=[16, 16, 8], val_cases=1,
                num_workers=0, progress=False, threads=1, snapshot_every=1, device="cpu")
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("mode", ["vanilla", "manual", "colab", "kmeans", "dilation"])
def test_every_mode_trains_and_evaluates(cache, tmp_path, mode):
    lines: list[str] = []
    tr = Trainer(_cfg(mode=mode), tmp_path, echo=lines.append)
    expected_k = {"vanilla": 2, "dilation": 3, "colab": 3, "kmeans": 3, "manual": 6}[mode]
    assert tr.plan.out_channels == expected_k
    result = tr.run()
    fg = result["foreground_mean"]
    assert 0.0 <= fg["dice"] <= 1.0 and len(result["cases"]) == 2
    for name in ("config.yaml", "log.csv", "progress.png", "checkpoint_latest.pth",
                 "checkpoint_final.pth", "evaluation.json", "evaluation.csv",
                 "snapshots/epoch_0001.png"):
        assert (tmp_path / name).is_file(), name
    events = list((tmp_path / "tensorboard").iterdir())
    assert any(p.name.startswith("events.out.tfevents") for p in events)
    assert len(list((tmp_path / "predictions_test").glob("*.nii.gz"))) == 2
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert len(rows) == 1 and float(rows[0]["train_loss"]) > 0 and rows[0]["val_dsc"] != ""
    assert any("final evaluation" in s for s in lines) and any("DSC" in s for s in lines)
    state = load_checkpoint(tmp_path / "checkpoint_final.pth")
    assert state["epoch"] == 1 and (state["generator"] is not None) == (mode == "colab")


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_cpu_optimizers_are_fused_and_continue_unfused_state(cache, tmp_path, optimizer):
    """On the CPU both optimizers take the fused step; the state of an unfused optimizer (a
    checkpoint of an earlier colabx) loads into them and continues as the unfused one would."""
    tr = Trainer(_cfg(mode="colab", optimizer=optimizer), tmp_path, echo=lambda s: None)
    assert tr.opt.defaults["fused"] and tr.gen_opt.defaults["fused"]
    params = list(tr.f.parameters())
    start = [p.detach().clone() for p in params]
    cls = type(tr.opt)
    kw = {k: tr.opt.defaults[k] for k in ("momentum", "nesterov", "weight_decay")
          if k in tr.opt.defaults and (k != "momentum" or optimizer == "sgd")}
    unfused = cls(params, lr=1e-2, **kw)
    for step in range(3):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + i))
        unfused.step()
    after = [p.detach().clone() for p in params]
    continued = cls(params, lr=1e-2, **kw)
    saved = copy.deepcopy(unfused.state_dict())  # what a checkpoint holds
    continued.load_state_dict(copy.deepcopy(saved))
    continued.step()
    want = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, a in zip(params, after, strict=True):
            p.copy_(a)
    tr.opt.load_state_dict(saved)
    for group in tr.opt.param_groups:
        group["lr"] = 1e-2
    tr.opt.step()
    moved = max(float((w - a).abs().max()) for w, a in zip(want, after, strict=True))
    assert moved > 0 and max(float((a - s).abs().max()) for a, s in zip(after, start,
                                                                         strict=True)) > 0
    for p, w in zip(params, want, strict=True):
        torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-6 * max(moved, 1e-3))


@pytest.mark.parametrize("flag", [False, True])
def test_meta_step_options_reach_the_meta_step(cache, tmp_path, flag):
    tr = Trainer(_cfg(mode="colab", theta_pm="grouped", fd_tf32=flag, recompute_generator=flag),
                 tmp_path, echo=lambda s: None)
    mc = tr.meta.config
    assert (mc.theta_pm, mc.fd_tf32, mc.recompute_generator) == ("grouped", flag, flag)


def test_resume_continues_exactly(cache, tmp_path):
    cfg = _cfg(mode="colab", epochs=2, iterations=3, snapshot_every=0, val_cases=1)
    full = Trainer(cfg, tmp_path / "full", echo=lambda s: None)
    full.run()
    part = Trainer(cfg, tmp_path / "part", echo=lambda s: None)
    assert part.run(max_epochs=1) is None
    assert not (tmp_path / "part" / "checkpoint_final.pth").exists()
    resumed = Trainer(cfg, tmp_path / "part", resume=True, echo=lambda s: None)
    assert resumed.start_epoch == 1
    resumed.run()
    # every iteration booked once, as floats, though each is read back one iteration late
    assert len(full.iteration_losses) == 6
    assert all(type(v) is float for v in full.iteration_losses)
    assert resumed.iteration_losses == full.iteration_losses[3:]
    for a, b in zip(full.f.state_dict().values(), resumed.f.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(full.g.state_dict().values(), resumed.g.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    rows = list(csv.DictReader((tmp_path / "part" / "log.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]


def test_resume_without_checkpoint_is_a_clear_error(cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(_cfg(), tmp_path / "nothing", resume=True)


@pytest.mark.parametrize("order", ["reference", "shared"])
def test_ddp_gloo_two_processes_equal_single_process(cache, tmp_path, order):
    # meta_period 1: every iteration's generator update is compared
    cfg = _cfg(mode="colab", epochs=1, iterations=3, augment=False, val_fraction=0.0,
               snapshot_every=0, meta_period=1, meta_order=order)
    single = Trainer(cfg, tmp_path / "single", echo=lambda s: None)
    single.run()
    save_config(cfg, tmp_path / "cfg.yaml")
    # the processes import the colabx this test imported (installed or built in place), run
    # outside the checkout so that its source tree cannot shadow an installed package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(colabx.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", "2", "-m", "colabx", "train", "--config",
           str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoint_final.pth")
    for name, t in ddp["model"].items():
        torch.testing.assert_close(t, single.f.state_dict()[name], rtol=1e-4, atol=1e-6,
                                   msg=f"model.{name}")
    # Adam divides by the root of the squared-gradient average, so gradient entries at rounding
    # level move their weights by up to a full step in either direction: compare what the three
    # updates did to the generator as a whole.
    init = Trainer(cfg, tmp_path / "init", echo=lambda s: None).g.state_dict()
    moved_ddp = torch.cat([(ddp["generator"][n] - init[n]).flatten() for n in init])
    moved_one = torch.cat([(single.g.state_dict()[n] - init[n]).flatten() for n in init])
    assert moved_one.norm() > 0
    assert (moved_ddp - moved_one).norm() / moved_one.norm() < 5e-3   # measured 2.8e-4
    # the logged losses are the global batch's, not rank 0's half of it
    [one_row] = list(csv.DictReader((tmp_path / "single" / "log.csv").open()))
    [ddp_row] = list(csv.DictReader((tmp_path / "ddp" / "log.csv").open()))
    for key in ("train_loss", "meta_l_seg", "meta_l_roi", "meta_v_norm"):
        assert float(ddp_row[key]) == pytest.approx(float(one_row[key]), rel=1e-4), key


@pytest.mark.slow
def test_compile_option_trains(cache, tmp_path):
    tr = Trainer(_cfg(mode="colab", compile=True, snapshot_every=0), tmp_path,
                 echo=lambda s: None)
    assert tr.f_run is not tr.f
    result = tr.run()
    assert all(torch.isfinite(torch.tensor(v)) for v in tr.iteration_losses)
    assert 0.0 <= result["foreground_mean"]["dice"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("order", ["shared", "reference"])
def test_compiled_iteration_computes_what_the_eager_one_does(cache, tmp_path, order):
    """``--compile``: iterations with a generator update in each (period 1), both networks
    compiled (the meta step's θ* and θ± passes run the compiled f through functional_call),
    move θ and ω as the eager iterations do, to the float32 rounding of inductor's kernels."""
    from torch._dynamo.eval_frame import OptimizedModule

    def run(compile: bool) -> list[torch.Tensor]:
        tr = Trainer(_cfg(mode="colab", compile=compile, meta_period=1, meta_order=order,
                          snapshot_every=0, iterations=2), tmp_path / f"{order}-{compile}",
                     echo=lambda s: None)
        assert isinstance(tr.meta.f, OptimizedModule) == compile
        assert isinstance(tr.meta.g, OptimizedModule) == compile
        nets = (tr.f, tr.g)
        before = [[p.detach().clone() for p in net.parameters()] for net in nets]
        for it in range(2):
            tr.train_iteration(it, tr.batches[it])
        return [torch.cat([(p.detach() - b).flatten()
                           for p, b in zip(net.parameters(), b0, strict=True)])
                for net, b0 in zip(nets, before, strict=True)]

    (e_f, e_g), (c_f, c_g) = run(False), run(True)
    assert float(e_f.norm()) > 0 and float((c_f - e_f).norm() / e_f.norm()) < 1e-4
    # ω: Adam's first steps are ±lr wherever the meta-gradient's sign holds, and the finite
    # difference amplifies float32 rounding; the meta-gradient itself is held to the float64
    # one in tests/test_meta_order.py (measured here: θ 7e-6 / 2e-5, ω 1.3e-2)
    assert float(e_g.norm()) > 0 and float((c_g - e_g).norm() / e_g.norm()) < 5e-2


def test_compile_refuses_what_it_cannot_run():
    with pytest.raises(ConfigError, match="compile: torch.compile does not differentiate"):
        TrainConfig(compile=True, meta_grad="exact")
    with pytest.raises(ConfigError, match="compile: the grouped theta"):
        TrainConfig(compile=True, theta_pm="grouped")
    with pytest.raises(ConfigError, match="compile_mode: must be one of"):
        TrainConfig(compile_mode="fast")
    # CUDA graphs: their replays overwrite what the meta step holds across passes
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(ConfigError, match=f"compile_mode: {mode} captures CUDA graphs"):
            TrainConfig(mode="colab", compile=True, compile_mode=mode)
        TrainConfig(mode="vanilla", compile=True, compile_mode=mode)
    TrainConfig(mode="colab", compile=True, compile_mode="max-autotune-no-cudagraphs")
    # the meta step's options are not refused in modes that have no meta step (they are
    # warned about as unused on the command line instead)
    for kw in ({"compile": True, "meta_grad": "exact"}, {"compile": True, "theta_pm": "grouped"},
               {"meta_amp": "bf16", "amp": "fp16"},
               {"meta_difference": "one_sided", "amp": "bf16"},
               {"meta_order": "shared", "meta_mode": "per_sample"}):
        TrainConfig(mode="vanilla", **kw)
        with pytest.raises(ConfigError):
            TrainConfig(mode="colab", **kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a CPU-only machine")
@pytest.mark.parametrize("kw,exc,match", [
    ({"amp": "bf16"}, ValueError, "amp: bf16 mixed precision needs a CUDA device"),
    ({"device": "cuda"}, ValueError, "device: 'cuda' requested but CUDA is not available"),
])
def test_device_errors_name_the_option(tmp_path, kw, exc, match):
    with pytest.raises(exc, match=match):
        Trainer(_cfg(**kw), tmp_path)


def test_manual_mode_without_context_maps(cache, tmp_path):
    import shutil

    from colabx.data.phantom import write_phantom

    ds = write_phantom(tmp_path / "ds", preset="tiny", num_cases=2, num_test=1)
    shutil.rmtree(ds / "contextTr")
    with pytest.raises(ValueError, match=r"mode: manual needs manual context maps \(contextTr/\)"):
        Trainer(_cfg(mode="manual", dataset=str(ds)), tmp_path / "run")
    # refused before preprocessing (minutes on a real dataset), and no run folder is left
    from colabx.data import load_dataset
    from colabx.train.trainer import cache_dir, preprocessed_key

    assert not (cache_dir() / "preprocessed" / preprocessed_key(load_dataset(ds))).exists()
    assert not (tmp_path / "run").exists()


def test_manual_contexts_choose_the_context_classes(cache, tmp_path):
    """``manual_contexts=[1]`` (the liver, as the published code's one manual class): K = 3;
    a value no training map holds is refused, naming the values present."""
    tr = Trainer(_cfg(mode="manual", manual_contexts=[1]), tmp_path / "a", echo=lambda s: None)
    assert tr.plan.out_channels == 3 and tr.t == 2
    with pytest.raises(ValueError, match=r"manual_contexts: values \[9\] occur in no training"):
        Trainer(_cfg(mode="manual", manual_contexts=[1, 9]), tmp_path / "b")

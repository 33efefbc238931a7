"""The CoLab trainer: data → networks → (meta step +) SGD → validation → checkpoints.

One :class:`Trainer` per process. Per iteration (global batch index ``i``, deterministic data):

1. the batch of iteration ``i`` (this process's slice of it under ``torchrun``);
2. learning rates from the poly schedule (θ: SGD Nesterov; ω: Adam), ``α`` = θ's current LR;
3. ``colab`` mode, every ``meta_period`` iterations: :meth:`colabx.method.MetaStep.step` leaves the
   generator gradient, which is averaged over processes before Adam steps ω;
4. targets (from the updated generator, or the mode's fixed rule) and the ordinary update of θ:
   fused Dice+CE over the deep-supervision levels, gradients averaged over processes, norm
   clipped, SGD step (through a GradScaler for fp16).

In the shared order (``meta_order`` ``shared``, or ``auto`` with the batched meta step, the
default) steps 3 and 4 share one forward+backward of the network on labels from the current
generator (:meth:`colabx.method.MetaStep.shared_forward`): its averaged gradient is the meta
step's inner gradient and, clipped, the ordinary update's.

After each ``val_every`` epochs rank 0 validates by sliding window on held-out cases and writes
the logs and the checkpoints (``checkpoint_latest.pth``, ``checkpoint_best.pth`` by validation
DSC, ``checkpoint_final.pth``). ``resume=True`` continues from ``checkpoint_latest.pth`` exactly:
the data of each iteration is a function of (seed, iteration), and every state that changes
during training is in the checkpoint.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from colabx._io import lock_folder, remove_stale_temporaries
from colabx._precision import AMP_DTYPES, resolve_amp
from colabx.checkpoint import (
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from colabx.data import load_dataset
from colabx.data.loader import PatchBatches, make_loader
from colabx.data.preprocessing import (
    PreprocessedDataset,
    load_preprocessed,
    preprocess_dataset,
)
from colabx.device import cpu_has_amx, optimizer_options, resolve_device
from colabx.method.meta_step import MetaConfig, MetaStep, UpdateCounter
from colabx.method.targets import FixedTargets, fit_intensity_clusters
from colabx.models.cpu_convolutions import onednn_convolutions
from colabx.models.plan import NetworkPlan, auto_patch_size, build_networks, pool_kernel_sizes
from colabx.ops.dice_ce_loss import dice_ce_loss
from colabx.train import evaluation
from colabx.train.config import (
    TRAIN_PRESETS,
    TrainConfig,
    resolved_meta_amp,
    resolved_meta_difference,
    resolved_meta_order,
    resume_differences,
    save_config,
    saved_options,
)
from colabx.train.cuda_graph import CapturedStep
from colabx.train.distributed import Dist, ProcessGroupReducer
from colabx.train.logs import RunLog
from colabx.train.run_dir import check_new_run_folder, start_run_folder

__all__ = ["Trainer", "cache_dir", "default_config", "preprocessed_key"]

CHECKPOINT_FORMAT = 1
#: Held-out split seed: the same validation cases for every mode and training seed.
SPLIT_SEED = 12345


def cache_dir() -> Path:
    """``$COLABX_CACHE`` or ``~/.cache/colabx``."""
    return Path(os.environ.get("COLABX_CACHE") or Path.home() / ".cache" / "colabx")


def default_config(dataset: str | None = None, **overrides: Any) -> TrainConfig:
    """The configuration ``colabx train`` starts from: the ``phantom-cpu`` preset without a
    dataset, nnU-Net-like defaults with one."""
    base = dict(TRAIN_PRESETS["phantom-cpu"]) if dataset is None else {}
    return TrainConfig(dataset=dataset, **{**base, **overrides})


def _absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its dataset and preprocessed folders as absolute paths, so that a run can be
    resumed, predicted from or compared from any working directory."""
    paths = {k: str(Path(v).expanduser().absolute()) for k in ("dataset", "preprocessed")
             if (v := getattr(cfg, k)) is not None}
    return cfg.replace(**paths) if paths else cfg


def _poly(base: float, it: int, total: int, exponent: float) -> float:
    return base * (1.0 - min(it, total) / total) ** exponent


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


class Trainer:
    """Trains one configuration into ``out_dir`` (see the module docstring).

    Args:
        cfg: the resolved configuration. When resuming, the options in
            :data:`~colabx.train.config.CHANGEABLE_ON_RESUME` (more epochs, device, workers,
            ...) are taken from it and logged; every other option must equal the run's.
        out_dir: the run directory: absent or empty, or (``overwrite``) any folder; a folder
            holding a run is refused unless ``resume`` or ``overwrite`` (which removes that run's
            files first).
        dist: this process's place in a ``torchrun`` run (default: single process).
        resume: continue from ``out_dir/checkpoint_latest.pth``.
        overwrite: start a new run in a folder that holds other files or an earlier run.
        echo: where progress lines go (rank 0 only).
    """

    def __init__(self, cfg: TrainConfig, out_dir: str | Path, *, dist: Dist | None = None,
                 resume: bool = False, overwrite: bool = False,
                 echo: Callable[[str], None] = print) -> None:
        self.out = Path(out_dir)
        self.dist = dist or Dist()
        self.echo = echo if self.dist.is_main else (lambda s: None)
        # held until run() ends: a second process on this folder stops here
        self._lock = lock_folder(self.out, "run folder") if self.dist.is_main else None
        try:
            self._start(cfg, resume, overwrite)
        except BaseException:
            self._unlock(failed=True)
            raise

    def _start(self, cfg: TrainConfig, resume: bool, overwrite: bool) -> None:
        cfg = _absolute_paths(cfg)
        state = None
        if resume:
            state = load_checkpoint(self.out / "checkpoint_latest.pth")
            cfg = self._resumed_config(state, cfg)
        elif self.dist.is_main:
            check_new_run_folder(self.out, overwrite)
        self.cfg = cfg
        self._setup_runtime()
        self._setup_data()
        self._setup_model()
        self.start_epoch, self.best_dsc = 0, -1.0
        self.iteration_losses: list[float] = []
        rows = None
        if state is not None:
            rows = self._load_state(state)
            for line in self._resume_changes:
                self.echo(line)
        if self.dist.is_main:
            if resume:
                remove_stale_temporaries(self.out)
            else:
                start_run_folder(self.out, "colabx train")
        self.log = RunLog(self.out, rows, tensorboard=self.dist.is_main) \
            if self.dist.is_main else None
        if self.dist.is_main:
            save_config(self.cfg, self.out / "config.yaml")

    def _unlock(self, failed: bool = False) -> None:
        """Release the run folder's lock. After a failed start, the folder is left as it was
        found: removed when locking created it and nothing else was written, else without the
        lock file when locking created that."""
        lock, self._lock = self._lock, None
        if lock is None:
            return
        lock.release(undo=failed)  # a --preprocessed folder beside the run is left alone

    def _resumed_config(self, state: dict[str, Any], cfg: TrainConfig) -> TrainConfig:
        """The configuration of a resumed run: the run's own, with the changes ``cfg`` asks for
        where a resumed run may change (logged); refuses any other difference."""
        saved = _absolute_paths(TrainConfig(**saved_options(state["config"]))).to_dict()
        fixed, changed = resume_differences(saved, cfg.to_dict())
        if fixed:
            listed = "; ".join(f"{k}: run {a!r}, given {b!r}" for k, (a, b) in fixed.items())
            raise ValueError(f"{self.out}: cannot resume with different options ({listed}); "
                             "these must match the run's, so drop them, or start a new run "
                             "with another --out")
        done = int(state["epoch"])
        if cfg.epochs < done:
            raise ValueError(f"epochs: the run in {self.out} has already trained {done} epochs; "
                             f"--epochs {cfg.epochs} cannot undo them")
        # announced once the resume is accepted (the dataset is checked later)
        self._resume_changes = [
            f"resume: {k} {a!r} -> {b!r}" + (" (the poly learning-rate schedule now runs over "
                                              "the new total)" if k == "epochs" else "")
            for k, (a, b) in changed.items()]
        return TrainConfig(**{**saved, **{k: b for k, (_, b) in changed.items()}})

    # -- set-up ---------------------------------------------------------------------------------
    def _setup_runtime(self) -> None:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        dev = resolve_device(cfg.device)
        if dev.type == "cuda" and self.dist.enabled:
            dev = torch.device("cuda", self.dist.local_rank)
        self.device = dev
        amp = resolve_amp(cfg.amp, dev)
        if amp != "none" and self.device.type != "cuda":
            raise ValueError(f"amp: {amp} mixed precision needs a CUDA device")
        if (amp != "none" and cfg.mode == "colab" and cfg.meta_grad == "fd"
                and cfg.meta_difference == "one_sided"):
            raise ValueError(f"meta_difference: one_sided needs the inner forward in fp32, but "
                             f"amp {cfg.amp} means {amp} on {dev.type}; pass --amp none or use "
                             "central")
        self.amp_dtype = AMP_DTYPES[amp]
        self.meta_amp_dtype = AMP_DTYPES[resolved_meta_amp(cfg, amp)]
        if (cfg.mode == "colab" and self.meta_amp_dtype == torch.bfloat16 and dev.type == "cpu"
                and not cpu_has_amx()):
            self.echo("warning: meta_amp bf16 on a CPU without AMX (or a torch that cannot "
                      "tell): its bf16 convolutions may be slower than fp32 ones")
        torch.manual_seed(cfg.seed)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if self.dist.enabled and self.cfg.batch_size % self.dist.world_size:
            raise ValueError(f"batch_size: {cfg.batch_size} is not divisible by the "
                             f"{self.dist.world_size} processes")
        if cfg.cuda_graphs and (dev.type != "cuda" or self.dist.enabled):
            where = "several processes" if self.dist.enabled else f"device {dev}"
            raise ValueError(f"cuda_graphs: captures one process's iteration on a CUDA device, "
                             f"but this run is on {where}; leave out --cuda-graphs")
        if self.dist.enabled and cfg.mode == "colab" and cfg.meta_mode == "per_sample":
            raise ValueError("meta_mode: per_sample is the single-process reference semantics; "
                             "use batched with several processes")

    def _setup_data(self) -> None:
        cfg = self.cfg
        if cfg.dataset is None:
            from colabx.data.phantom import phantom_dataset

            root = Path(phantom_dataset(cfg.phantom_preset)) if self.dist.is_main else None
            self.dist.barrier()
            root = root or Path(phantom_dataset(cfg.phantom_preset))
        else:
            root = Path(cfg.dataset)
        self.dataset = load_dataset(root)
        if cfg.mode == "manual" and not any(c.context is not None for c in self.dataset.cases):
            # before preprocessing, which can take minutes
            raise ValueError(f"mode: manual needs manual context maps (contextTr/) in "
                             f"{self.dataset.root}")
        pre_dir = Path(cfg.preprocessed) if cfg.preprocessed else (
            cache_dir() / "preprocessed" / preprocessed_key(self.dataset))
        if self.dist.is_main:
            pre = preprocess_dataset(self.dataset, pre_dir, target_spacing=cfg.target_spacing,
                                     num_workers=min(4, os.cpu_count() or 1),
                                     progress=cfg.progress)
            if not pre.from_cache:
                self.echo(f"preprocessed {len(pre)} cases into {pre_dir}")
        self.dist.barrier()
        self.pre: PreprocessedDataset = load_preprocessed(pre_dir)
        self._refuse_ignored_voxels()
        ids = sorted(self.pre.case_ids)
        n_val = 0 if cfg.val_fraction == 0 or len(ids) < 2 else \
            max(1, round(cfg.val_fraction * len(ids)))
        order = np.random.default_rng(SPLIT_SEED).permutation(len(ids))
        self.val_ids = sorted(ids[i] for i in order[:n_val])
        self.train_ids = sorted(ids[i] for i in order[n_val:])
        labels = {v for k, v in self.dataset.labels.items() if v != self.dataset.ignore_label}
        self.num_classes = max(labels) + 1
        self._check_split(len(ids))
        self._check_test_cases()

    def _refuse_ignored_voxels(self) -> None:
        """The training losses (L_seg, L_ROI and the context labels) have no ignored voxels:
        they would take the ignore value for an ordinary class (a target of no channel, a
        false positive for Dice), so a dataset whose training labels hold it is refused."""
        ignore = self.dataset.ignore_label
        if ignore is None:
            return
        cases = self.pre.plans["cases"]
        holding = sorted(c for c in self.pre.case_ids if ignore in cases[c].get("classes", ()))
        if holding:
            shown = ", ".join(holding[:5]) + (", ..." if len(holding) > 5 else "")
            raise ValueError(f"{self.dataset.root}: the label maps of {len(holding)} training "
                             f"case(s) ({shown}) hold the ignore label {ignore}, which colabx "
                             "train does not leave out of its losses yet (it would learn those "
                             "voxels as a class of their own); relabel them, or remove the "
                             "ignore label, to train (preprocess, predict and evaluate accept it)")

    def _check_split(self, n_cases: int) -> None:
        """Refuse a split that leaves nothing to train on; warn when nothing is held out."""
        cfg = self.cfg
        if not self.train_ids:
            raise ValueError(f"val_fraction: {cfg.val_fraction} holds out all {n_cases} "
                             "case(s), leaving no training case; lower --val-fraction")
        cases = self.pre.plans["cases"]
        if not any(cases[i].get("roi_voxels", 1) for i in self.train_ids):
            raise ValueError(f"{self.dataset.root}: none of the {len(self.train_ids)} training "
                             "case(s) contains an ROI voxel (the held-out cases "
                             f"{self.val_ids} hold all of them); nothing to learn: change "
                             "--val-fraction")
        if not self.val_ids:
            self.echo("warning: no validation case (val_fraction 0, or a single case): no "
                      "validation during training and no checkpoint_best.pth")

    def _check_test_cases(self) -> None:
        """Read every labelled test case now, so that a bad file stops the run before training
        rather than at the final evaluation."""
        tests = [k for k in self.dataset.test_cases if k.label is not None]
        for k in tests:
            self.dataset.load_case(k)
        if not tests and not self.val_ids:
            self.echo("warning: no labelled test case (imagesTs/labelsTs) and no validation "
                      "case: the final evaluation will have nothing to score")

    def _mode_t(self) -> int:
        cfg = self.cfg
        if cfg.mode == "vanilla":
            return 1
        if cfg.mode == "dilation":
            return 2
        if cfg.mode == "manual":
            present: set[int] = set()
            for i in self.train_ids:
                ctx = self.pre.load_case(i).context
                if ctx is None:
                    raise ValueError(f"mode: manual needs manual context maps (contextTr/) in "
                                     f"{self.dataset.root}")
                present.update(int(v) for v in np.unique(ctx))
            if cfg.manual_contexts is None:
                return max(present) + 1
            missing = sorted(set(cfg.manual_contexts) - present)
            if missing:
                raise ValueError(f"manual_contexts: values {missing} occur in no training case's "
                                 f"context map (values present: {sorted(present)})")
            return len(cfg.manual_contexts) + 1
        return cfg.t

    def _setup_model(self) -> None:
        cfg = self.cfg
        spacing = self.pre.target_spacing
        shapes = np.array([self.pre.plans["cases"][i]["shape"] for i in self.train_ids])
        median = [int(v) for v in np.median(shapes, axis=0)]
        budget = 128 ** 3 if self.device.type == "cuda" else 64 ** 3
        if cfg.patch_size:
            patch = list(cfg.patch_size)
        elif cfg.dataset is None:
            from colabx.data.phantom import PHANTOM_PRESETS

            patch = list(PHANTOM_PRESETS[cfg.phantom_preset].patch_size)
        else:
            patch = auto_patch_size(median, spacing, budget)
        if len(patch) != len(spacing):
            raise ValueError(f"patch_size: {patch} has {len(patch)} axes, the data "
                             f"{len(spacing)}")
        kernels = pool_kernel_sizes(patch, spacing, cfg.num_pool)
        div = np.prod(np.array(kernels), axis=0)
        if any(p % d for p, d in zip(patch, div, strict=True)):
            raise ValueError(f"patch_size: {patch} must be divisible by the total pooling "
                             f"{div.tolist()}")
        self.t = self._mode_t()
        self.plan = NetworkPlan(
            in_channels=len(self.dataset.channel_names), num_classes=self.num_classes, t=self.t,
            spatial_dims=len(patch), patch_size=list(patch), pool_kernel_sizes=kernels,
            base_features=cfg.base_features, max_features=cfg.max_features,
            deep_supervision=cfg.deep_supervision, with_generator=cfg.mode == "colab",
            generator_upsampling=cfg.generator_upsampling)
        torch.manual_seed(cfg.seed)
        self.f, self.g = build_networks(self.plan, self.device)
        self.dist.broadcast_module(self.f)
        if self.g is not None:
            self.dist.broadcast_module(self.g)
        fused = optimizer_options(self.device)
        if cfg.optimizer == "sgd":
            self.opt = torch.optim.SGD(self.f.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                       nesterov=True, weight_decay=cfg.weight_decay, **fused)
        else:
            self.opt = torch.optim.AdamW(self.f.parameters(), lr=cfg.lr,
                                         weight_decay=cfg.weight_decay, **fused)
        self.gen_opt = torch.optim.Adam(self.g.parameters(), lr=cfg.gen_lr, **fused) \
            if self.g is not None else None
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.amp_dtype == torch.float16)
        self.levels = self.f.output_strides if cfg.deep_supervision else 1
        # --compile: the iteration calls the compiled wrappers (the meta step's θ*, θ± passes
        # too, through functional_call); evaluation, snapshots and checkpoints use the modules
        self.f_run = torch.compile(self.f, mode=cfg.compile_mode) if cfg.compile else self.f
        g_run = torch.compile(self.g, mode=cfg.compile_mode) \
            if cfg.compile and self.g is not None else self.g
        if cfg.mode == "colab":
            mc = MetaConfig(num_classes=self.num_classes, margin=cfg.margin, tau=cfg.tau,
                            mode=cfg.meta_mode, meta_grad=cfg.meta_grad, theta_pm=cfg.theta_pm,
                            fd_tf32=cfg.fd_tf32, recompute_generator=cfg.recompute_generator,
                            order=resolved_meta_order(cfg),
                            difference=resolved_meta_difference(cfg, self.amp_dtype is not None),
                            amp=self.amp_dtype is not None,
                            meta_amp=self.meta_amp_dtype is not None,
                            amp_dtype=self.amp_dtype or self.meta_amp_dtype or torch.bfloat16)
            self.meta = MetaStep(self.f_run, g_run, mc,
                                 ProcessGroupReducer() if self.dist.enabled else None)
            self.fixed = None
        else:
            self.meta = None
            centres, body = None, None
            if cfg.mode == "kmeans":
                centres, body = self._fit_kmeans()
            self.fixed = FixedTargets(cfg.mode, self.num_classes, self.t, self.levels,
                                      cfg.margin, cfg.tau, cluster_centres=centres,
                                      body_threshold=body,
                                      context_values=cfg.manual_contexts)
        self.counter = UpdateCounter(cfg.meta_period)
        # cuda_graphs: "update" (θ's update) and "meta" (an update iteration's meta passes),
        # each captured at its first use
        self.captured: dict[str, CapturedStep] = {}
        world, rank = self.dist.world_size, self.dist.rank
        local = cfg.batch_size // world
        self.batches = PatchBatches(
            self.pre, self.train_ids, patch_size=patch, batch_size=cfg.batch_size,
            seed=cfg.seed, roi_fraction=cfg.roi_fraction,
            augment=_augment_config(cfg.augment), with_context=cfg.mode == "manual",
            samples=slice(rank * local, (rank + 1) * local))

    def _fit_kmeans(self) -> tuple[list[float], float | None]:
        """Cluster centres of background intensities inside the body (first channel)."""
        norm = self.pre.plans["normalization"][0]
        body = None
        if norm["scheme"] == "ct":
            hu = min(max(-500.0, norm["lower"]), norm["upper"])
            body = (hu - norm["mean"]) / max(norm["std"], 1e-8) + 1e-6
        rng = np.random.default_rng(self.cfg.seed)
        samples = []
        for cid in self.train_ids:
            c = self.pre.load_case(cid)
            img, lab = np.asarray(c.image[0]).ravel(), np.asarray(c.label).ravel()
            keep = lab == 0 if body is None else (lab == 0) & (img > body)
            v = img[keep]
            if v.size > 100_000:
                v = rng.choice(v, 100_000, replace=False)
            samples.append(v)
        return fit_intensity_clusters(np.concatenate(samples), self.t, self.cfg.seed), body

    # -- state ----------------------------------------------------------------------------------
    def _state(self, epoch: int) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT, "config": self.cfg.to_dict(),
            "network_plan": self.plan.to_dict(),
            "epoch": epoch, "iteration": epoch * self.cfg.iterations,
            "model": self.f.state_dict(),
            "generator": self.g.state_dict() if self.g is not None else None,
            "optimizer": self.opt.state_dict(),
            "gen_optimizer": self.gen_opt.state_dict() if self.gen_opt is not None else None,
            "scaler": self.scaler.state_dict(), "rng": capture_rng(),
            "meta_counter": self.counter.iteration, "best_dsc": self.best_dsc,
            "kmeans": None if self.fixed is None or self.fixed.centres is None else
            {"centres": list(self.fixed.centres), "body_threshold": self.fixed.body_threshold},
            "dataset": {"root": str(self.dataset.root), "preprocessed": str(self.pre.root),
                        "labels": self.dataset.labels, "channel_names":
                        list(self.dataset.channel_names), "val_ids": self.val_ids,
                        "train_ids": self.train_ids},
            "preprocessing_plans": {k: v for k, v in self.pre.plans.items() if k != "cases"},
            "log": self.log.rows if self.log is not None else [],
        }

    def _check_resumed_data(self, state: dict[str, Any]) -> None:
        """Refuse to resume on another split (cases added, removed or renamed: the validation
        cases, and so ``checkpoint_best``, would change, and held-out cases could be trained on);
        warn when only the files' fingerprint changed (edited, touched or copied files, or
        other preprocessing), which the split does not show."""
        saved = state.get("dataset", {})
        for name, key, now in (("validation", "val_ids", self.val_ids),
                               ("training", "train_ids", self.train_ids)):
            before = saved.get(key)
            if before is not None and list(before) != list(now):
                gone, new = sorted(set(before) - set(now)), sorted(set(now) - set(before))
                raise ValueError(f"{self.out}: the dataset's cases changed since this run "
                                 f"started: its {name} cases would change (no longer there: "
                                 f"{gone}; new: {new}); restore the dataset's cases, or start a "
                                 "new run with another --out")
        before = state.get("preprocessing_plans", {}).get("fingerprint")
        if before is not None and before != self.pre.plans.get("fingerprint"):
            self.echo("warning: resume: the dataset's files (or their modification times) or "
                      "its preprocessing changed since this run's checkpoint; the cases and "
                      "their split are the same, and training goes on with the data as it is now")

    def _load_state(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format {state.get('format')} is not supported")
        self._check_resumed_data(state)
        self.f.load_state_dict(state["model"])
        if self.g is not None:
            self.g.load_state_dict(state["generator"])
            self.gen_opt.load_state_dict(state["gen_optimizer"])
        self.opt.load_state_dict(state["optimizer"])
        if state["scaler"] and self.scaler.is_enabled():
            # a run saved without fp16 holds a disabled scaler's empty state: a resume that
            # turns fp16 on starts a fresh scale
            self.scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"])
        self.counter.iteration = state["meta_counter"]
        self.start_epoch, self.best_dsc = state["epoch"], state["best_dsc"]
        return list(state["log"])[: self.start_epoch]

    def _save(self, name: str, epoch: int) -> None:
        save_checkpoint(self.out / name, self._state(epoch))

    # -- one iteration --------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_iteration(self, it: int, batch: dict[str, Any]) -> dict[str, float | Tensor]:
        """One iteration on ``batch`` (this process's slice of global iteration ``it``); on the
        CPU its convolutions run on oneDNN (:func:`colabx.models.onednn_convolutions`).

        ``train_loss`` comes back as a 0-dim tensor on the device, not read back: reading it
        waits for the iteration's GPU work, which :meth:`_epoch` does one iteration late."""
        with onednn_convolutions(self.device.type == "cpu"):
            return self._iteration(it, batch)

    def _iteration(self, it: int, batch: dict[str, Any]) -> dict[str, float | Tensor]:
        cfg, dev = self.cfg, self.device
        x = batch["image"].to(dev, non_blocking=True)
        y = batch["label"].to(dev, non_blocking=True)
        d = batch["distance"].to(dev, non_blocking=True)
        total = cfg.epochs * cfg.iterations
        lr = _poly(cfg.lr, it, total, cfg.poly_exponent)
        _set_lr(self.opt, lr)
        out: dict[str, float | Tensor] = {"lr": lr}
        due = False
        if self.meta is not None:
            gen_lr = _poly(cfg.gen_lr, it, total, cfg.poly_exponent)
            _set_lr(self.gen_opt, gen_lr)
            out["gen_lr"] = gen_lr
            due = self.counter.tick()
        self.opt.zero_grad(set_to_none=True)
        unscaled = False
        inputs = {"image": x, "label": y, "distance": d}
        if batch.get("context") is not None:
            inputs["context"] = batch["context"].to(dev, non_blocking=True)
        shared = due and self.meta.config.order == "shared"
        loss = None
        if due and self._meta_replayed():
            loss, tensors = self._replayed(
                "meta", self._meta_pass, [*self.f.parameters(), *self.g.parameters()],
                {**inputs, "lr": torch.full((), lr, device=dev)})
            # (one process, no loss scaling: --cuda-graphs refuses several processes and fp16)
            info = tensors.info()  # waits for the replay: the generator steps only if usable
            self._step_generator(info.skipped)
            out.update(self._meta_stats([info]))
        elif shared:
            # one forward+backward of f: the inner step's gradient and the plain update's
            inner = self.meta.shared_forward(x, y, d, meta_due=True)
            loss = inner.loss
            self.scaler.scale(loss).backward()
            self.dist.mean_grads(self.f.parameters())
            self.scaler.unscale_(self.opt)
            unscaled = True
            out.update(self._meta_update(x, y, d, lr, inner))
        elif due:
            out.update(self._meta_update(x, y, d, lr))
        if not shared:
            loss = self._replayed("update", self._update_step, self.f.parameters(), inputs)
            self.dist.mean_grads(self.f.parameters())
        if cfg.grad_clip > 0:
            if not unscaled:
                self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.f.parameters(), cfg.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        # the global batch's loss (each process's loss is the mean over its equal share)
        out["train_loss"] = self.dist.mean(loss.detach())
        return out

    def _update_loss(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """The update's loss on labels from the current generator (or the mode's fixed rule):
        all an iteration without a generator update computes before its backward."""
        x, y, d = inputs["image"], inputs["label"], inputs["distance"]
        if self.meta is not None:
            return self.meta.update_loss(x, y, d)
        targets = self.fixed.targets(x, y, d, inputs.get("context"))
        with self._autocast():
            z = self.f_run(x)
        return dice_ce_loss(z, targets, validate=False)

    def _update_step(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """The update's loss and its backward into f's ``.grad``. Returns the loss."""
        loss = self._update_loss(inputs)
        self.scaler.scale(loss).backward()
        return loss

    def _replayed(self, name: str, step_fn, params, inputs: Mapping[str, Tensor]):
        """``step_fn(inputs)``, eager or (``cuda_graphs``) replayed from the graph captured at
        the first call under ``name`` (:class:`CapturedStep`)."""
        if not self.cfg.cuda_graphs:
            return step_fn(inputs)
        if name not in self.captured:
            self.captured[name] = CapturedStep(step_fn, params, inputs)
        return self.captured[name](inputs)

    def _meta_replayed(self) -> bool:
        """Whether a generator update's passes replay from a graph: ``cuda_graphs`` with the
        batched finite-difference meta step (per-sample updates step the optimizer between
        samples; the exact meta-gradient stays eager)."""
        cfg = self.cfg
        return cfg.cuda_graphs and cfg.meta_mode == "batched" and cfg.meta_grad == "fd"

    def _meta_pass(self, inputs: Mapping[str, Tensor]):
        """The device work of an update iteration (:meth:`MetaStep.update_pass`): in the
        shared order also the loss of the plain update and its gradient in f's ``.grad``."""
        return self.meta.update_pass(inputs["image"], inputs["label"], inputs["distance"],
                                     inputs["lr"])

    def _step_generator(self, skipped: bool) -> None:
        """The generator's optimizer step after a batched meta step (none when skipped)."""
        if not skipped:
            self.dist.mean_grads(self.g.parameters())
            self.gen_opt.step()

    def _meta_update(self, x, y, d, lr: float, inner=None) -> dict[str, float]:
        if self.cfg.meta_mode == "per_sample":
            infos = self.meta.step(x, y, d, lr, self.gen_opt)
        else:
            infos = self.meta.step(x, y, d, lr, inner=inner)
            self._step_generator(infos[0].skipped)
        return self._meta_stats(infos)

    def _meta_stats(self, infos: list) -> dict[str, float]:
        done = [i for i in infos if not i.skipped]
        l_seg, l_roi = _mean([i.l_seg for i in done]), _mean([i.l_roi for i in done])
        if self.dist.enabled:  # this process's share; v (and so its norm) is already global
            l_seg, l_roi = self.dist.mean(torch.tensor([l_seg, l_roi], dtype=torch.float64,
                                                       device=self.device)).tolist()
        return {"meta_skipped": float(len(infos) - len(done)), "meta_l_seg": l_seg,
                "meta_l_roi": l_roi, "meta_v_norm": _mean([i.v_norm for i in done])}

    # -- evaluations ----------------------------------------------------------------------------
    def _evaluator(self) -> evaluation.Evaluator:
        return evaluation.Evaluator(self.f, self.num_classes, self.plan.patch_size,
                                    self.cfg.overlap, self.amp_dtype, self.dataset, self.pre)

    def _snapshot_targets(self, x: Tensor, y: Tensor, d: Tensor, context: Tensor | None):
        if self.meta is None:
            return self.fixed.targets(x, y, d, context)
        self.g.eval()
        try:
            return self.meta.labels(x, y, d)
        finally:
            self.g.train()

    def _snapshot(self, epoch: int) -> None:
        """``snapshots/epoch_XXXX.png``: the first validation (or training) case's fixed
        ROI-centred patch, its labels and the context channels of its current targets."""
        cid = (self.val_ids or self.train_ids)[0]
        evaluation.snapshot(self.pre.load_case(cid), self.plan.patch_size, self._snapshot_targets,
                            self.num_classes, self.device,
                            self.out / "snapshots" / f"epoch_{epoch:04d}.png",
                            title=f"{self.cfg.mode}, epoch {epoch}, case {cid}")

    # -- the run --------------------------------------------------------------------------------
    def run(self, max_epochs: int | None = None) -> dict[str, Any] | None:
        """Train from the current epoch to ``cfg.epochs`` (or stop after ``max_epochs`` more
        epochs, leaving a resumable run), then evaluate. Returns the final evaluation (rank 0;
        None when stopped early or on other ranks). The run folder's lock is released when it
        returns or raises."""
        try:
            return self._run(max_epochs)
        finally:
            self._unlock()

    def _run(self, max_epochs: int | None) -> dict[str, Any] | None:
        cfg = self.cfg
        stop = cfg.epochs if max_epochs is None else min(cfg.epochs,
                                                         self.start_epoch + max_epochs)
        if self.start_epoch >= cfg.epochs:
            self.echo(f"{self.out}: already trained {cfg.epochs} epochs")
        else:
            self._describe()
        workers = cfg.num_workers if cfg.num_workers >= 0 else \
            min(4, max(0, (os.cpu_count() or 1) - 1))
        loader = make_loader(self.batches, start=self.start_epoch * cfg.iterations,
                             stop=stop * cfg.iterations, num_workers=workers,
                             pin_memory=self.device.type == "cuda")
        batches = iter(loader)
        for epoch in range(self.start_epoch, stop):
            self._epoch(epoch, batches)
        del batches, loader
        if self.captured:  # the graphs' memory, and the gradients in it, go now
            self.captured = {}
            self.f.zero_grad(set_to_none=True)
            if self.g is not None:
                self.g.zero_grad(set_to_none=True)
        if stop < cfg.epochs:
            return None
        result = None
        if self.dist.is_main:
            self._save("checkpoint_final.pth", cfg.epochs)
            result = evaluation.final_evaluation(self._evaluator(), self.val_ids, self.out,
                                                 cfg.mode, self.echo)
        self.dist.barrier()
        if self.log is not None:
            self.log.close()
        return result

    def _describe(self) -> None:
        p, cfg = self.plan, self.cfg
        nparam = sum(q.numel() for q in self.f.parameters())
        self.echo(
            f"colabx train: mode {cfg.mode} (t={p.t}, K={p.out_channels}), dataset "
            f"{self.dataset.name} ({len(self.train_ids)} train / {len(self.val_ids)} val cases),"
            f" patch {p.patch_size}, pooling {p.pool_kernel_sizes}, {nparam / 1e6:.2f} M "
            f"parameters, device {self.device}"
            f"{f' x{self.dist.world_size} processes' if self.dist.enabled else ''}, "
            f"{cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''} x {cfg.iterations} iterations, "
            f"batch {cfg.batch_size}"
            f"{_precision(self.amp_dtype, self.meta_amp_dtype if self.meta else None)}"
            f"{_meta_line(self.meta.config, cfg.meta_period) if self.meta else ''}")

    def _book(self, out: dict[str, float | Tensor], stats: dict[str, list[float]], bar) -> None:
        """Records one finished iteration's numbers (device scalars read back here)."""
        vals = {key: float(v) for key, v in out.items()}
        self.iteration_losses.append(vals["train_loss"])
        for key, v in vals.items():
            stats.setdefault(key, []).append(v)
        bar.update(1)
        bar.set_postfix(loss=f"{vals['train_loss']:.3f}")

    def _epoch(self, epoch: int, batches) -> None:
        cfg = self.cfg
        self.f.train()
        if self.g is not None:
            self.g.train()
        t0, data_time = time.perf_counter(), 0.0
        stats: dict[str, list[float]] = {}
        bar = _bar(cfg.iterations, f"epoch {epoch + 1}/{cfg.epochs}",
                   cfg.progress and self.dist.is_main)
        previous = None
        for k in range(cfg.iterations):
            ts = time.perf_counter()
            batch = next(batches)
            data_time += time.perf_counter() - ts
            out = self.train_iteration(epoch * cfg.iterations + k, batch)
            # Book the previous iteration now that this one is queued: reading its loss waits
            # for the GPU to finish it, never to drain the queue (a read of this iteration's
            # loss would leave the GPU idle while the host prepares the next).
            if previous is not None:
                self._book(previous, stats, bar)
            previous = out
        if previous is not None:
            self._book(previous, stats, bar)
        bar.close()
        row: dict[str, Any] = {"epoch": epoch + 1, "iteration": (epoch + 1) * cfg.iterations}
        for key, vals in stats.items():
            finite = [v for v in vals if math.isfinite(v)]
            row[key] = float(np.mean(finite)) if finite else float("nan")
        if "meta_skipped" in stats:
            row["meta_skipped"] = float(np.sum(stats["meta_skipped"]))
        row["lr"], row["data_time"] = stats["lr"][-1], data_time
        if self.dist.is_main:
            if self.val_ids and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
                ids = self.val_ids[: cfg.val_cases] if cfg.val_cases else self.val_ids
                row.update(evaluation.validate(self._evaluator(), ids))
            if cfg.snapshot_every and (epoch + 1) % cfg.snapshot_every == 0:
                self._snapshot(epoch + 1)
            row["epoch_time"] = time.perf_counter() - t0
            self.log.add(row)
            self.echo(_summary_line(row, cfg.epochs))
            # checkpoint_best before checkpoint_latest: a run killed between the two saves then
            # resumes with a best_dsc that checkpoint_best.pth really holds
            if row.get("val_dsc", -1.0) > self.best_dsc:
                self.best_dsc = row["val_dsc"]
                self._save("checkpoint_best.pth", epoch + 1)
            if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs:
                self._save("checkpoint_latest.pth", epoch + 1)
        self.dist.barrier()


def _augment_config(enabled: bool):
    from colabx.data.augmentation import AugmentConfig

    return AugmentConfig() if enabled else None


def _mean(v: list[float]) -> float:
    return float(np.mean(v)) if v else float("nan")


def preprocessed_key(dataset) -> str:
    """The cache folder name of a dataset's preprocessed copy: its name and a hash of its path."""
    import hashlib

    digest = hashlib.sha1(str(Path(dataset.root).resolve()).encode()).hexdigest()[:10]
    return f"{dataset.name}-{digest}"


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="it", leave=False, disable=not enabled,
                dynamic_ncols=True)


def _precision(amp: torch.dtype | None, meta_amp: torch.dtype | None) -> str:
    """The describe line's note on mixed precision ("" when everything runs in fp32)."""
    name = {dt: choice for choice, dt in AMP_DTYPES.items()}
    parts = [f"{what} {name[dt]}" for what, dt in (("network passes", amp),
                                                   ("meta-step passes", meta_amp)) if dt]
    return f", {' and '.join(parts)}" if parts else ""


def _meta_line(mc: MetaConfig, period: int) -> str:
    """The describe line's note on the meta step as resolved (config.yaml may say auto)."""
    every = "every iteration" if period == 1 else f"every {period} iterations"
    return (f", meta step {every} ({mc.order} order, {mc.difference} difference, "
            f"{mc.meta_grad} meta-gradient)")


def _summary_line(row: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row['train_loss']:.4f}"]
    if math.isfinite(row.get("meta_l_roi", float("nan"))):
        parts.append(f"L_roi {row['meta_l_roi']:.4f}")
    if "val_dsc" in row:
        parts.append(f"val DSC {row['val_dsc']:.3f} sens {row['val_sensitivity']:.3f} "
                     f"prec {row['val_precision']:.3f}")
    parts.append(f"lr {row['lr']:.2e}")
    if "epoch_time" in row:
        parts.append(f"{row['epoch_time']:.1f} s (data {row['data_time']:.1f} s)")
    return "  ".join(parts)

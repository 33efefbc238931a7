"""Trainer throughput vs loader throughput: does the data pipeline keep the trainer fed?

Builds a :class:`colabx.train.Trainer` (default: the built-in phantom, ``phantom-cpu`` options on
the CPU, the reference network — 30 features — on CUDA), then measures in one run:

* trainer: iterations/s of :meth:`Trainer.train_iteration` on batches already in memory (meta
  step every ``meta_period`` iterations as configured), i.e. patches/s consumed;
* loader: patches/s delivered by ``make_loader`` with N workers (augmentation on).

Prints a table and writes JSON (``--out``). Usage::

    python -m benchmarks.bench_train                       # CPU, phantom
    python -m benchmarks.bench_train --device cuda --workers 4 8 12
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from colabx.data.loader import make_loader
from colabx.train.config import TrainConfig
from colabx.train.trainer import Trainer, default_config


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def trainer_rate(tr: Trainer, iterations: int) -> float:
    """Iterations/s of ``train_iteration`` on pre-loaded batches (2 warm-up iterations)."""
    loader = make_loader(tr.batches, start=0, stop=iterations + 2, num_workers=0)
    batches = list(loader)
    for i in range(2):
        tr.train_iteration(i, batches[i])
    _sync(tr.device)
    t0 = time.perf_counter()
    for i in range(2, iterations + 2):
        tr.train_iteration(i, batches[i])
    _sync(tr.device)
    return iterations / (time.perf_counter() - t0)


def loader_rate(tr: Trainer, workers: int, iterations: int) -> float:
    """Patches/s delivered by the loader with ``workers`` processes (first batch excluded)."""
    loader = make_loader(tr.batches, start=0, stop=iterations + 1, num_workers=workers)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    n = sum(1 for _ in it)
    return n * tr.cfg.batch_size / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", help="dataset folder (default: the built-in phantom)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--mode", default="colab")
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--loader-iterations", type=int, default=20)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--base-features", type=int, help="default: 8 on CPU, 30 on CUDA")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    feats = args.base_features or (30 if dev.type == "cuda" else 8)
    overrides = dict(mode=args.mode, device=args.device, base_features=feats, progress=False,
                     max_features=320 if dev.type == "cuda" else 64)
    cfg: TrainConfig = default_config(args.dataset, **overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        tr = Trainer(cfg, run_dir, echo=lambda s: None)
        its = trainer_rate(tr, args.iterations)
        loaders = {w: loader_rate(tr, w, args.loader_iterations) for w in args.workers}
        if tr.log is not None:
            tr.log.close()
    consumed = its * cfg.batch_size
    result = {
        "machine": {"host": platform.node(), "cpu": platform.processor(),
                    "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None},
        "date": time.strftime("%Y-%m-%d"), "device": str(dev), "mode": cfg.mode,
        "patch_size": tr.plan.patch_size, "batch_size": cfg.batch_size, "base_features": feats,
        "trainer_iterations_per_s": its, "trainer_patches_per_s": consumed,
        "loader_patches_per_s": {str(w): r for w, r in loaders.items()},
    }
    print(f"| what | patches/s ({tr.plan.patch_size}, batch {cfg.batch_size}, {dev}) |")
    print("|---|---|")
    print(f"| trainer ({cfg.mode}, {its:.2f} it/s) consumes | {consumed:.1f} |")
    for w, r in loaders.items():
        verdict = "enough" if r >= consumed else "too slow"
        print(f"| loader, {w} workers, delivers | {r:.1f} ({verdict}) |")
    out = args.out or Path("benchmarks/results") / f"train_{dev.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

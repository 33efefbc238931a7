"""Benchmark the data pipeline: preprocessing per case (distance maps: colabx vs scipy on the same
label maps, same run) and the training loader's throughput of augmented patches.

    python -m benchmarks.bench_data                           # the built-in phantom dataset
    python -m benchmarks.bench_data --dataset DIR --workers 0 1 2 --patch 80 80 80

(a) ``preprocess_dataset`` (serial) into a temporary folder: wall time per case; then, for every
preprocessed label map, ``colabx.distance_transform(label > 0, spacing)`` (all torch threads and
one thread) against ``scipy.ndimage.distance_transform_edt(~roi, sampling=spacing)``.
(b) ``PatchBatches`` (default ``AugmentConfig``, ROI fraction 0.5) through ``make_loader`` with N
workers: augmented patches per second after the first batches (worker start-up excluded).
Prints a table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import torch

import colabx
from colabx.bench.harness import machine_info, time_callable, write_json
from colabx.data.augmentation import AugmentConfig
from colabx.data.loader import PatchBatches, make_loader
from colabx.data.preprocessing import PreprocessedDataset, preprocess_dataset

CPU = torch.device("cpu")


def _dataset(arg: str | None):
    if arg is not None:
        return arg
    try:
        from colabx.data.phantom import phantom_dataset
    except ImportError as e:
        raise SystemExit(f"no --dataset given and the built-in phantom is unavailable ({e})") from e
    return phantom_dataset("default")


def bench_preprocessing(dataset, out_dir: Path, min_time: float) -> tuple[PreprocessedDataset,
                                                                         dict]:
    t0 = time.perf_counter()
    pre = preprocess_dataset(dataset, out_dir, progress=False)
    total = time.perf_counter() - t0
    spacing = [float(s) for s in pre.target_spacing]
    ignore = pre.plans["dataset"].get("ignore_label")
    threads = torch.get_num_threads()
    rows = []
    for cid in pre.case_ids:
        label = np.asarray(pre.load_case(cid, mmap=False).label)
        roi = label > 0
        if ignore is not None:
            roi &= label != ignore
        mask = torch.from_numpy(roi)[None]
        ours = time_callable(lambda m=mask: colabx.distance_transform(m, spacing=spacing), CPU,
                             min_time_s=min_time)
        torch.set_num_threads(1)
        try:
            ours1 = time_callable(lambda m=mask: colabx.distance_transform(m, spacing=spacing),
                                  CPU, min_time_s=min_time)
        finally:
            torch.set_num_threads(threads)
        scipy = time_callable(lambda r=roi: ndi.distance_transform_edt(~r, sampling=spacing),
                              CPU, min_time_s=min_time)
        rows.append({"case": cid, "shape": list(label.shape), "colabx_ms": ours["median_ms"],
                     "colabx_1thread_ms": ours1["median_ms"], "scipy_ms": scipy["median_ms"]})
    sums = {k: sum(r[k] for r in rows) for k in ("colabx_ms", "colabx_1thread_ms", "scipy_ms")}
    return pre, {
        "cases": len(rows), "total_s": total, "per_case_s": total / max(len(rows), 1),
        "target_spacing": spacing, "torch_threads": threads, "distance": rows,
        "distance_speedup_vs_scipy": sums["scipy_ms"] / sums["colabx_ms"],
        "distance_speedup_vs_scipy_1thread": sums["scipy_ms"] / sums["colabx_1thread_ms"],
    }


def bench_loader(pre: PreprocessedDataset, patch: list[int], batch: int, workers: list[int],
                 iterations: int, warmup: int) -> list[dict]:
    rows = []
    for n in workers:
        batches = PatchBatches(pre, pre.case_ids, patch_size=patch, batch_size=batch, seed=0,
                               augment=AugmentConfig())
        loader = make_loader(batches, start=0, stop=warmup + iterations, num_workers=n)
        it = iter(loader)
        for _ in range(warmup):
            next(it)
        t0 = time.perf_counter()
        for _ in range(iterations):
            next(it)
        dt = time.perf_counter() - t0
        del it, loader
        rows.append({"workers": n, "batches": iterations, "seconds": dt,
                     "patches_per_s": batch * iterations / dt})
        print(f"  loader  workers={n}  {batch * iterations / dt:.1f} patches/s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", help="raw dataset folder (default: the built-in phantom)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--patch", type=int, nargs="+", default=[80, 80, 80])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=20, help="timed batches per setting")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches per setting")
    parser.add_argument("--min-time", type=float, default=0.3,
                        help="seconds of repetitions per distance-map timing")
    parser.add_argument("--out", default=None, help="JSON path (default "
                        "benchmarks/results/<date>-<host>-data.json)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    out = args.out or (f"benchmarks/results/{time.strftime('%Y-%m-%d')}-"
                       f"{socket.gethostname()}-data.json")
    info = machine_info(CPU)
    print(f"# colabx bench_data on {info['cpu']}, {info['cpu_count']} cores, torch "
          f"{info['torch']}, {info['torch_threads']} threads", flush=True)
    with tempfile.TemporaryDirectory(prefix="colabx-bench-data-") as tmp:
        pre, prep = bench_preprocessing(_dataset(args.dataset), Path(tmp), args.min_time)
        loader = bench_loader(pre, args.patch, args.batch, args.workers, args.iterations,
                              args.warmup)

    print(f"\npreprocessing: {prep['cases']} cases, {prep['per_case_s']:.2f} s per case "
          f"(serial)\n")
    print("| case | shape | colabx ms | colabx 1 thread ms | scipy ms | speedup (1 thread) |")
    print("|---|---|---|---|---|---|")
    for r in prep["distance"]:
        ours, ours1, ref = r["colabx_ms"], r["colabx_1thread_ms"], r["scipy_ms"]
        print(f"| {r['case']} | {'×'.join(map(str, r['shape']))} | {ours:.1f} | {ours1:.1f} | "
              f"{ref:.1f} | {ref / ours:.1f}× ({ref / ours1:.1f}×) |")
    print(f"\ndistance maps, all cases: {prep['distance_speedup_vs_scipy']:.1f}× scipy "
          f"({prep['distance_speedup_vs_scipy_1thread']:.1f}× with one thread)\n")
    patch = "×".join(map(str, args.patch))
    print(f"| loader workers | augmented 1×{patch} patches/s (batch {args.batch}) |")
    print("|---|---|")
    for r in loader:
        print(f"| {r['workers']} | {r['patches_per_s']:.1f} |")
    payload = {"machine": info, "command": "python -m benchmarks.bench_data " +
               " ".join(argv), "dataset": str(args.dataset or "phantom:default"),
               "preprocessing": prep, "loader": {"patch": args.patch, "batch": args.batch,
                                                 "rows": loader}}
    write_json(out, payload)
    return payload


if __name__ == "__main__":
    main()

"""CoLab's training-time overhead as a user sees it: ``colabx train`` epoch times (log.csv) of
CoLab (generator period 1 and 5, both iteration orders, the published iteration: reference order
with the central difference, and the generator and L_ROI passes in bf16) over vanilla, same
network, patch and data.

Each configuration trains ``--epochs`` epochs on the built-in phantom in its own run folder;
validation runs only after the last epoch, whose time is left out, and the first epoch is
dropped too (warm-up); the ratio is the mean of the remaining epochs' times over vanilla's.
Prints a markdown table and writes JSON::

    python -m benchmarks.bench_epoch_time                      # 32x32x16 patches, 8 features
    python -m benchmarks.bench_epoch_time --quick              # a smoke run
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _colab(period: int, order: str, difference: str | None = None,
           meta_amp: str | None = None) -> list[str]:
    flags = ["--mode", "colab", "--meta-period", str(period), "--meta-order", order]
    return flags + (["--meta-difference", difference] if difference else []) + \
        (["--meta-amp", meta_amp] if meta_amp else [])


CONFIGS = {
    "vanilla": ["--mode", "vanilla"],
    "colab period 5, reference order": _colab(5, "reference"),
    "colab period 5, shared order": _colab(5, "shared"),
    "colab period 1, reference order": _colab(1, "reference"),
    "colab period 1, shared order, central": _colab(1, "shared", "central"),
    "colab period 1, shared, one-sided": _colab(1, "shared", "one_sided"),
    # the published code's iteration: its order and the paper's central difference
    "colab period 5, published iteration": _colab(5, "reference", "central"),
    "colab period 1, published iteration": _colab(1, "reference", "central"),
    # the generator and L_ROI passes in bf16 (--meta-amp bf16; fast on CPUs with AMX)
    "colab period 5, shared, bf16 meta passes": _colab(5, "shared", meta_amp="bf16"),
    "colab period 1, shared, bf16 meta passes": _colab(1, "shared", meta_amp="bf16"),
}


def _epoch_times(run: Path) -> list[float]:
    rows = list(csv.DictReader((run / "log.csv").open()))
    return [float(r["epoch_time"]) for r in rows]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--patch", type=int, nargs=3, default=[32, 32, 16])
    ap.add_argument("--features", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="3 epochs of 3 iterations")
    ap.add_argument("--out", default="benchmarks/results/epoch_time.json")
    args = ap.parse_args(argv)
    epochs, iterations = (3, 3) if args.quick else (args.epochs, args.iterations)
    common = ["--epochs", str(epochs), "--iterations", str(iterations), "--patch-size",
              *map(str, args.patch), "--base-features", str(args.features), "--num-pool", "3",
              "--val-every", str(10 * epochs), "--snapshot-every", "0", "--num-workers", "1",
              "--no-progress"]
    results, work = {}, Path(tempfile.mkdtemp(prefix="colabx-epoch-"))
    load_before = os.getloadavg()
    for name, flags in CONFIGS.items():
        run = work / name.replace(" ", "_").replace(",", "")
        cmd = [sys.executable, "-m", "colabx", "train", *flags, *common, "--out", str(run)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        times = _epoch_times(run)
        kept = times[1:-1]  # the first (warm-up) and the last (with validation) left out
        results[name] = {"epoch_times_s": times, "mean_s": sum(kept) / len(kept),
                         "wall_s": time.perf_counter() - t0}
        print(f"  {name}: {results[name]['mean_s']:.2f} s per epoch", flush=True)
    base = results["vanilla"]["mean_s"]
    print("\n| configuration | s per epoch | over vanilla |\n|---|---|---|")
    for name, r in results.items():
        r["over_vanilla"] = r["mean_s"] / base
        print(f"| {name} | {r['mean_s']:.2f} | {r['over_vanilla']:.2f}× |")
    payload = {"command": "python -m benchmarks.bench_epoch_time " + " ".join(argv or []),
               "epochs": epochs, "iterations": iterations, "patch": args.patch,
               "features": args.features, "cpu_count": os.cpu_count(),
               "load_before": load_before, "load_after": os.getloadavg(),
               "date": time.strftime("%Y-%m-%d"), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
    return payload


if __name__ == "__main__":
    main()

"""Smoke test of benchmarks/bench_compat.py: the quick run completes and its JSON holds every
case with every implementation timed (the epoch row: four)."""

import json
import math
import sys
from pathlib import Path

import torch

# benchmarks/ is not installed; appended (not prepended) so an installed colabx still comes first
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.append(ROOT)

from benchmarks.bench_compat import main  # noqa: E402


def test_quick_run_times_both_implementations_of_every_case(tmp_path):
    """Wall-clock rows; the epoch row (four whole epochs, seven times each, which a loaded
    2-core machine slows many-fold with two OpenMP threads) is left to the CPU-time test."""
    out = tmp_path / "compat.json"
    main(["--quick", "--min-time", "0", "--skip", "train epoch", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["machine"]["device"] == "cpu"
    ops = [r["op"] for r in data["rows"]]
    assert ops == ["calculate_loss fwd+bwd", "calcualte_loss_val fwd+bwd",
                   "hessian_vector_product_Unet", "one_hot2dist"]
    for r in data["rows"]:
        for label in ("colabx", "reference"):
            t = r["timings"][label]
            assert "error" not in t, (r["op"], label, t)
            assert math.isfinite(t["median_ms"]) and t["median_ms"] > 0
        assert r["speedup_vs"]["reference"] > 0
    assert data["clock"] == "wall" and len(data["loadavg"]) == 3


def test_cpu_time_run_of_the_epoch_row(tmp_path):
    """The end-to-end epoch row, every implementation, timed by CPU time."""
    out = tmp_path / "compat.json"
    n = torch.get_num_threads()
    try:
        main(["--quick", "--only", "train epoch", "--cpu-time", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(n)
    data = json.loads(out.read_text())
    assert data["clock"] == "process_time, 1 thread" and data["machine"]["torch_threads"] == 1
    (row,) = data["rows"]
    assert row["op"] == "train epoch"
    labels = ["colabx", "colabx_batched", "apply_to_reference", "reference"]
    assert sorted(row["timings"]) == sorted(labels)
    for label in labels:
        t = row["timings"][label]
        assert t["reps"] == 1 and math.isfinite(t["median_ms"]) and t["median_ms"] > 0
    assert sorted(row["speedup_of_vs_reference"]) == sorted(labels[:3])
    assert all(v > 0 for v in row["speedup_of_vs_reference"].values())

"""Smoke test of benchmarks/bench_meta_step.py: the quick run on a tiny net completes and its JSON
holds every implementation with finite times, the ratios and an accurate fp32 meta-gradient."""

import json
import math
import sys
from pathlib import Path

import torch

# benchmarks/ is not installed; appended (not prepended) so an installed colabx still comes first
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.append(ROOT)

from benchmarks.bench_meta_step import main  # noqa: E402


def test_quick_run_has_every_implementation(tmp_path):
    out = tmp_path / "meta.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny net is overhead-bound; a second thread only contends
    try:
        main(["--quick", "--min-time", "0", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    assert data["complete"] and data["quick"]
    assert data["machine"]["device"] == "cpu"
    ran = {(r["part"], r["impl"], r["ds"]) for r in data["rows"]}
    for ds in (True, False):
        assert {("meta", "colabx", ds), ("meta", "restructured", ds), ("meta", "reference", ds),
                ("plain", "colabx", ds), ("plain", "reference", ds)} <= ran
    variants = {r["variant"] for r in data["rows"] if r["impl"] == "colabx"}
    assert {"theta_pm=vmap, meta_grad=fd", "theta_pm=grouped, meta_grad=fd",
            "theta_pm=sequential, meta_grad=exact"} <= variants
    for r in data["rows"]:
        t = r["timing"]
        assert "error" not in t, (r["impl"], r["variant"], t)
        assert math.isfinite(t["median_ms"]) and 0 < t["min_ms"] <= t["median_ms"]
    names = {(r["ratio"], r["ds"]) for r in data["ratios"]}
    assert ("(reference meta + plain) / (colabx meta + plain)", True) in names
    assert all(math.isfinite(r["value"]) and r["value"] > 0 for r in data["ratios"])
    acc = {a["meta_grad"]: a for a in data["accuracy"] if a["precision"] == "fp32"}
    assert set(acc) == {"fd", "exact"}
    for a in acc.values():  # measured 3e-5 (fd) and 1e-6 (exact) relative error
        assert a["rel_error"] < 1e-3 and a["cosine"] > 0.9999

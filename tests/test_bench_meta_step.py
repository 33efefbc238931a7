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

from benchmarks.bench_meta_step import (  # noqa: E402
    DEFAULT_VARIANT,
    RECOMPUTE_VARIANT,
    TF32_VARIANT,
    derived_ratios,
    main,
)


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
    assert {"theta_pm=grouped, meta_grad=fd", "theta_pm=sequential, meta_grad=exact"} <= variants
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


def _row(part, impl, variant, precision, ms, mb=100.0):
    return {"part": part, "impl": impl, "ds": True, "variant": variant, "precision": precision,
            "timing": {"median_ms": ms}, "memory": {"growth_mb": mb}}


def test_ratios_pair_each_option_with_its_baseline():
    rows = [_row("meta", "colabx", DEFAULT_VARIANT, "default", 120.0),
            _row("meta", "colabx", TF32_VARIANT, "default", 80.0, 90.0),
            _row("meta", "colabx", "theta_pm=grouped, meta_grad=fd", "default", 999.0),
            _row("plain", "colabx", "", "default", 40.0),
            _row("meta", "restructured", "", "default", 150.0),
            _row("meta", "restructured", "fd_tf32", "default", 110.0, 95.0),
            _row("meta", "reference", "", "default", 300.0),
            _row("plain", "reference", "", "default", 50.0),
            _row("meta", "colabx", RECOMPUTE_VARIANT, "default", 130.0, 75.0)]
    got = {(r["ratio"], r["precision"]): r["value"] for r in derived_ratios(rows)}
    assert got[("colabx meta / colabx plain", "default")] == 3.0
    assert got[("colabx meta / colabx plain", "default, θ± TF32")] == 2.0
    assert got[("restructured meta / colabx meta", "default")] == 1.25
    assert got[("restructured meta / colabx meta", "default, θ± TF32")] == 110.0 / 80.0
    assert got[("(reference meta + plain) / (colabx meta + plain)", "default, θ± TF32")] \
        == 350.0 / 120.0
    assert got[("peak memory colabx meta / restructured meta", "default, θ± TF32")] == 90.0 / 95.0
    # the recompute option pairs colabx's variant with the default restructured row
    assert got[("colabx meta / colabx plain", "default, generator recomputed")] == 130.0 / 40.0
    assert got[("peak memory colabx meta / restructured meta", "default, generator recomputed")] \
        == 0.75
    assert not any(p.startswith("amp") for _, p in got)  # no amp rows, no amp ratios

"""Smoke test of benchmarks/bench_compat.py: the quick run completes and its JSON holds every
case with both implementations timed."""

import json
import math
import sys
from pathlib import Path

# benchmarks/ is not installed; appended (not prepended) so an installed colabx still comes first
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.append(ROOT)

from benchmarks.bench_compat import main  # noqa: E402


def test_quick_run_times_both_implementations_of_every_case(tmp_path):
    out = tmp_path / "compat.json"
    main(["--quick", "--min-time", "0", "--out", str(out)])
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

"""benchmarks/convolution_floor.py: the passes each iteration runs, counted by the profiler
(a structural fact, not a timing): vanilla one forward and backward of f; CoLab without a
generator update adds g's forward; the shared one-sided meta iteration adds f at θ* (forward,
backward), f at θ+ and g's backward; the published iteration a second f forward/backward, a
second g forward and f at θ−."""

from __future__ import annotations

import json

from benchmarks import convolution_floor


def test_counts_the_passes_of_each_iteration(tmp_path):
    out = tmp_path / "floor.json"
    payload = convolution_floor.main(["--rounds", "1", "--calls", "1", "--out", str(out)])
    f_fwd, f_bwd, g_fwd, g_bwd = 20, 20, 18, 16  # convolutions per pass (3 pools, 1x1 heads)
    want = {"vanilla": (f_fwd, f_bwd),
            "colab plain": (f_fwd + g_fwd, f_bwd),
            "colab meta (shared order)": (3 * f_fwd + g_fwd, 2 * f_bwd + g_bwd),
            "colab meta (published iteration)": (5 * f_fwd + 2 * g_fwd, 3 * f_bwd + g_bwd)}
    got = {name: (r["forward_calls"], r["backward_calls"])
           for name, r in payload["median"].items()}
    assert got == want
    floors = payload["floors"]
    assert floors["period_1_over_vanilla"] > floors["period_5_over_vanilla"] > 1.0
    assert json.loads(out.read_text())["floors"] == floors

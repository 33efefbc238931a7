"""The benchmark harness's timers: call counts, interleaving and the statistics they report."""

from __future__ import annotations

import time

import pytest
import torch

from colabx.bench.harness import time_callable, time_interleaved

CPU = torch.device("cpu")


def test_time_callable_reports_its_calls():
    calls = []
    t = time_callable(lambda: calls.append(1), CPU, min_time_s=0.0, warmup=2)
    assert t["reps"] == 5 and len(calls) == 7
    assert 0 <= t["min_ms"] <= t["median_ms"] <= t["p90_ms"]


@pytest.mark.parametrize("rounds", [1, 2, 5, 7])
def test_time_interleaved_alternates_rows_and_times_each_call(rounds):
    order: list[str] = []

    def row(name: str, seconds: float):
        def fn():
            order.append(name)
            time.sleep(seconds)
        return fn

    out = time_interleaved({"a": row("a", 0.002), "b": row("b", 0.004)}, CPU,
                           min_time_s=0.0, rounds=rounds, warmup=1)
    per_round = -(-5 // rounds)
    assert order[:2] == ["a", "b"]  # the warm-up calls
    timed = order[2:]
    assert timed == (["a"] * per_round + ["b"] * per_round) * rounds
    for name, sleep_ms in (("a", 2.0), ("b", 4.0)):
        assert out[name]["reps"] == per_round * rounds >= 5
        assert out[name]["rounds"] == rounds
        assert sleep_ms <= out[name]["min_ms"] <= out[name]["median_ms"] < sleep_ms + 50


def test_time_interleaved_spends_the_minimum_time_across_rounds():
    out = time_interleaved({"a": lambda: time.sleep(0.001)}, CPU, min_time_s=0.1, rounds=4,
                           warmup=0)
    # 25 ms per round of ~1 ms calls: far more than the 2 a round needs for 5 in all
    assert out["a"]["reps"] >= 20

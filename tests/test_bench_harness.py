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


def test_kernel_times_leave_out_annotations_that_span_kernels():
    """On a GPU, a record_function range (the optimizers' ``Optimizer.step#...``) also appears
    as a device-side event spanning kernels that are listed themselves: counted, the GPU would
    look busier than it is (over 100 %)."""
    from types import SimpleNamespace

    from colabx.bench.harness import _kernel_times

    def ev(name, dev, us, annotation=None):
        e = SimpleNamespace(name=name, device_type=dev,
                            time_range=SimpleNamespace(elapsed_us=lambda: us))
        if annotation is not None:
            e.is_user_annotation = annotation
        return e

    events = [ev("aten::add", "cpu", 9.0), ev("Optimizer.step#Adam.step", "cpu", 50.0),
              ev("void add_kernel", "cuda", 3.0), ev("void adam_kernel", "cuda", 20.0),
              ev("Optimizer.step#Adam.step", "cuda", 24.0),  # older torch: no flag
              ev("Torch-Compiled Region", "cuda", 30.0, annotation=True)]
    assert _kernel_times(events, "cuda") == [("void add_kernel", 3.0),
                                            ("void adam_kernel", 20.0)]


@pytest.mark.filterwarnings("ignore:CUDA is not available")
@pytest.mark.parametrize("device", ["cpu", "cuda"], ids=["host", "gpu-faked"])
def test_profile_calls_reports_every_row_under_its_name(monkeypatch, device):
    """Each row comes back under its own name, with its own wall time (the device path once
    keyed rows by their last kernel's name, so rows overwrote each other). The device path runs
    here with its synchronisation and kernel list faked."""
    from colabx.bench import harness

    if device == "cuda":
        monkeypatch.setattr(harness, "_sync", lambda dev: None)
        monkeypatch.setattr(harness, "_kernel_times",
                            lambda events, kind: [("void k1", 2000.0), ("void k2", 1000.0)])
    rows = {"first": lambda: time.sleep(0.002), "second": lambda: time.sleep(0.02)}
    out = harness.profile_calls(rows, torch.device(device), reps=2)
    assert list(out) == ["first", "second"]
    assert 2.0 <= out["first"]["wall_ms"] < out["second"]["wall_ms"]
    if device == "cuda":
        assert out["second"]["device_ms"] == pytest.approx(1.5)
        assert [t["op"] for t in out["second"]["top"]] == ["void k1", "void k2"]

"""Timing harness shared by the benchmark scripts: median wall time per implementation, ratios
against the baselines measured in the same run, effective bandwidth, profiles, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Case:
    """One benchmark row: several implementations of the same work on the same inputs.

    ``impls`` maps a label to a zero-argument callable doing the work once (forward + backward
    where the op has one). The label "colabx" is the one compared against every other label.
    ``bytes_moved`` is the minimal device-memory traffic of the work (each input read once, each
    output written once); it turns times into effective bandwidth.
    """

    op: str
    size: str
    impls: dict[str, Callable[[], object]]
    bytes_moved: int | None = None
    notes: dict[str, object] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(
    fn: Callable[[], object],
    device: torch.device,
    min_time_s: float = 0.5,
    warmup: int = 2,
    max_reps: int = 200,
) -> dict[str, float]:
    """Median and spread (ms) of ``fn`` after ``warmup`` calls; at least 5 timed runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < 5 or (
        time.perf_counter() - start_all < min_time_s and len(times) < max_reps
    ):
        times.append(_timed_call(fn, device))
    return _summary(times)


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    min_time_s: float = 0.5,
    rounds: int = 5,
    warmup: int = 1,
) -> dict[str, dict[str, float]]:
    """:func:`time_callable` for several rows whose ratios matter, in ``rounds`` interleaved
    rounds: each round times every row in turn for ``min_time_s / rounds`` (at least one call,
    and at least 5 per row over all rounds), so a machine whose speed drifts during the run
    slows every row alike instead of the rows timed last. ``warmup`` calls per row first.
    Returns per row the statistics of all its timed calls, as :func:`time_callable`."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    per_round = -(-5 // rounds)  # ceil: 5 calls per row over all rounds
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            n = 0
            while n < per_round or time.perf_counter() - start < min_time_s / rounds:
                times[name].append(_timed_call(fn, device))
                n += 1
    return {name: {**_summary(t), "rounds": rounds} for name, t in times.items()}


def profile_calls(fns: dict[str, Callable[[], object]], device: torch.device, reps: int = 3,
                  top: int = 8) -> dict[str, dict]:
    """Per row, ``reps`` calls (after one unprofiled call) under ``torch.profiler``: the wall
    time per call, on a GPU the kernels' time per call (``device_ms``: how much of the wall time
    the GPU works; the rest is the host preparing launches, or waiting), and the ``top``
    operations per call, ranked by kernel time on a GPU (kernels by name) and by self CPU time on
    the CPU (aten operators)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    out = {}
    for name, fn in fns.items():
        fn()
        _sync(device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            _sync(device)
            wall_ms = (time.perf_counter() - start) * 1e3 / reps
        per_op: dict[str, list[float]] = {}
        if cuda:
            for kernel, us in _kernel_times(prof.events(), DeviceType.CUDA):
                entry = per_op.setdefault(kernel, [0.0, 0])
                entry[0] += us
                entry[1] += 1
        else:
            for e in prof.key_averages():
                per_op[e.key] = [e.self_cpu_time_total, e.count]
        ranked = sorted(per_op.items(), key=lambda kv: kv[1][0], reverse=True)
        out[name] = {
            "wall_ms": wall_ms,
            "device_ms": sum(v[0] for v in per_op.values()) / 1e3 / reps if cuda else None,
            "top": [{"op": op, "self_ms": us / 1e3 / reps, "calls": n / reps}
                    for op, (us, n) in ranked[:top]],
        }
    return out


def _kernel_times(events, device_type) -> list[tuple[str, float]]:
    """(name, µs) of the device's kernels among profiler ``events``. A ``record_function``
    range (``Optimizer.step#Adam.step``, a compiled region) also has a device-side event
    spanning its kernels, which would count them twice: marked ``is_user_annotation`` on newer
    torch, and named as its host-side range on older ones."""
    events = list(events)
    host = {e.name for e in events if e.device_type != device_type}
    return [(e.name, e.time_range.elapsed_us()) for e in events
            if e.device_type == device_type and not getattr(e, "is_user_annotation", False)
            and e.name not in host]


def _timed_call(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call: CUDA events on a GPU, wall time on the CPU."""
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _summary(times: list[float]) -> dict[str, float]:
    times = sorted(times)
    return {
        "median_ms": statistics.median(times),
        "min_ms": times[0],
        "p90_ms": times[int(0.9 * (len(times) - 1))],
        "reps": len(times),
    }


GRAPH_LABELS = ("colabx", "eager", "compile")  # implementations also timed as CUDA-graph replays
GRAPH_SUFFIX = "@graph"


def capture_graph(fn: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
    """Captures one call of ``fn`` (after a warm-up on a side stream) into a CUDA graph; returns
    the graph and what the captured call returned (the tensors each replay rewrites)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def graph_replay(fn: Callable[[], object]) -> Callable[[], object]:
    """The replay of ``fn`` captured by :func:`capture_graph`: the same GPU work without the
    host's launch and Python overhead."""
    return capture_graph(fn)[0].replay


def _speedups(timings: dict[str, dict], ours: str, graph: bool) -> dict[str, float]:
    base = timings.get(ours, {}).get("median_ms")
    if not base:
        return {}
    return {
        label: t["median_ms"] / base
        for label, t in timings.items()
        if label != ours and "median_ms" in t and label.endswith(GRAPH_SUFFIX) == graph
    }


def run_cases(
    cases: list[Case], device: torch.device, min_time_s: float = 0.5, cuda_graphs: bool = False
) -> list[dict]:
    """Times every implementation of every case; prints one line per measurement as it goes."""
    rows = []
    for case in cases:
        timings: dict[str, dict] = {}
        for label, fn in case.impls.items():
            try:
                timings[label] = time_callable(fn, device, min_time_s=min_time_s)
            except Exception as err:  # a baseline that cannot run here is reported, not fatal
                timings[label] = {"error": f"{type(err).__name__}: {err}"[:300]}
            t = timings[label]
            shown = f"{t['median_ms']:.3f} ms" if "median_ms" in t else t["error"]
            print(f"  {case.op:<20} {case.size:<28} {label:<22} {shown}", flush=True)
        if cuda_graphs and device.type == "cuda":
            for label in GRAPH_LABELS:
                if label not in case.impls or "median_ms" not in timings.get(label, {}):
                    continue
                try:
                    t = time_callable(graph_replay(case.impls[label]), device, min_time_s)
                except Exception as err:  # not capturable (host syncs, foreign streams)
                    torch.cuda.synchronize(device)
                    t = {"error": f"{type(err).__name__}: {err}"[:300]}
                timings[label + GRAPH_SUFFIX] = t
                shown = f"{t['median_ms']:.3f} ms" if "median_ms" in t else t["error"]
                print(
                    f"  {case.op:<20} {case.size:<28} {label + GRAPH_SUFFIX:<22} {shown}",
                    flush=True,
                )
        row = {"op": case.op, "size": case.size, "timings": timings, "notes": case.notes}
        ours = timings.get("colabx", {}).get("median_ms")
        if ours:
            row["speedup_vs"] = _speedups(timings, "colabx", graph=False)
            row["graph_speedup_vs"] = _speedups(timings, "colabx" + GRAPH_SUFFIX, graph=True)
            if case.bytes_moved:
                row["bytes_moved"] = case.bytes_moved
                row["effective_TBps"] = case.bytes_moved / (ours * 1e-3) / 1e12
                graph_ms = timings.get("colabx" + GRAPH_SUFFIX, {}).get("median_ms")
                if graph_ms:
                    row["graph_effective_TBps"] = case.bytes_moved / (graph_ms * 1e-3) / 1e12
        rows.append(row)
    return rows


def machine_info(device: torch.device) -> dict:
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def format_table(rows: list[dict]) -> str:
    """Markdown table: one line per case, times of every implementation and colabx's speedups."""
    labels: list[str] = []
    for r in rows:
        for label in r["timings"]:
            if label not in labels:
                labels.append(label)
    head = ["op", "size"] + [f"{lab} ms" for lab in labels] + ["speedup vs others", "TB/s"]
    graphs = any(r.get("graph_speedup_vs") for r in rows)
    if graphs:
        head += ["graph speedup", "graph TB/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["op"], r["size"]]
        for lab in labels:
            t = r["timings"].get(lab)
            cells.append(
                "—" if t is None else (f"{t['median_ms']:.3f}" if "median_ms" in t else "error")
            )
        sp = r.get("speedup_vs", {})
        cells.append(", ".join(f"{k} {v:.2f}×" for k, v in sp.items()) or "—")
        bw = r.get("effective_TBps")
        cells.append(f"{bw:.2f}" if bw is not None else "—")
        if graphs:
            gsp = r.get("graph_speedup_vs", {})
            cells.append(", ".join(f"{k} {v:.2f}×" for k, v in gsp.items()) or "—")
            gbw = r.get("graph_effective_TBps")
            cells.append(f"{gbw:.2f}" if gbw is not None else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
    """Writes ``payload`` atomically (temp file + rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(tmp, path)

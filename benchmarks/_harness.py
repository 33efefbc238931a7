"""Timing harness shared by the benchmark scripts: median wall time per implementation, ratios
against the baselines measured in the same run, effective bandwidth, JSON output."""

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
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "min_ms": times[0],
        "p90_ms": times[int(0.9 * (len(times) - 1))],
        "reps": len(times),
    }


def run_cases(cases: list[Case], device: torch.device, min_time_s: float = 0.5) -> list[dict]:
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
        row = {"op": case.op, "size": case.size, "timings": timings, "notes": case.notes}
        ours = timings.get("colabx", {}).get("median_ms")
        if ours:
            row["speedup_vs"] = {
                label: t["median_ms"] / ours
                for label, t in timings.items()
                if label != "colabx" and "median_ms" in t
            }
            if case.bytes_moved:
                row["bytes_moved"] = case.bytes_moved
                row["effective_TBps"] = case.bytes_moved / (ours * 1e-3) / 1e12
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
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
    """Writes ``payload`` atomically (temp file + rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(tmp, path)

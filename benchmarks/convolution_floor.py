"""The convolutions a CoLab iteration must run, against vanilla training's: calls and self-time
of the convolution kernels (forward and backward) in `colabx bench meta`'s rows, and the ratios
they put a floor under (an iteration at period p, the meta part over the plain step).

Profiles each row with torch.profiler over several interleaved rounds and keeps the median::

    python -m benchmarks.convolution_floor                  # CPU defaults of colabx bench meta
    python -m benchmarks.convolution_floor --rounds 5 --out benchmarks/results/floor.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import profile

from colabx.bench.meta import Setup, _iterations

ROWS = ("vanilla", "colab plain", "colab meta (shared order)",
        "colab meta (published iteration)")
# dispatch layers around the kernels: their self-time is not convolution arithmetic
WRAPPERS = {"aten::convolution", "aten::_convolution", "aten::conv3d", "aten::conv_transpose3d",
            "aten::conv2d", "aten::conv_transpose2d"}


def _convolutions(fn, calls: int) -> dict:
    """Per call of ``fn``: convolution kernel self-time (ms) and forward / backward calls."""
    for _ in range(2):
        fn()
    with profile() as prof:
        for _ in range(calls):
            fn()
    events = prof.key_averages()
    kernel = [e for e in events if "conv" in e.key.lower() and e.key.startswith("aten::")
              and e.key not in WRAPPERS]
    return {"conv_ms": sum(e.self_cpu_time_total for e in kernel) / 1e3 / calls,
            "forward_calls": sum(e.count for e in events if e.key == "aten::convolution") / calls,
            "backward_calls": sum(e.count for e in events
                                  if e.key == "aten::convolution_backward") / calls,
            "kernels": sorted(e.key for e in kernel)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=3, help="profiled calls per row and round")
    ap.add_argument("--period", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/convolution_floor.json")
    args = ap.parse_args(argv)
    setup = Setup(1, 2, 2, (32, 32, 32), ((2, 2, 2),) * 3, 8, None, True, 2)
    rows = _iterations(setup, torch.device("cpu"), "one_sided")
    seen: dict[str, list[dict]] = {name: [] for name in ROWS}
    for _ in range(args.rounds):
        for name in ROWS:
            seen[name].append(_convolutions(rows[name], args.calls))
    med = {name: {**runs[0], "conv_ms": statistics.median(r["conv_ms"] for r in runs)}
           for name, runs in seen.items()}
    vanilla, plain = med["vanilla"]["conv_ms"], med["colab plain"]["conv_ms"]
    shared = med["colab meta (shared order)"]["conv_ms"]
    published = med["colab meta (published iteration)"]["conv_ms"]
    p = args.period
    floors = {f"period_{p}_over_vanilla": ((p - 1) * plain + shared) / p / vanilla,
              "period_1_over_vanilla": shared / vanilla,
              "meta_part_over_plain": (shared - plain) / plain,
              "published_over_shared": published / shared}
    print("| per iteration | forward calls | backward calls | convolution ms | over vanilla's |")
    print("|---|---|---|---|---|")
    for name, r in med.items():
        print(f"| {name} | {r['forward_calls']:.0f} | {r['backward_calls']:.0f} | "
              f"{r['conv_ms']:.1f} | {r['conv_ms'] / vanilla:.2f}× |")
    for key, value in floors.items():
        print(f"{key}: {value:.2f}")
    payload = {"command": "python -m benchmarks.convolution_floor " + " ".join(argv or []),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "torch": torch.__version__, "threads": torch.get_num_threads(),
               "setup": {**setup.__dict__, "difference": "one_sided"},
               "rows": seen, "median": med, "floors": floors}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
    return payload


if __name__ == "__main__":
    main()

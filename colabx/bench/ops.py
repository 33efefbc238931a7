"""Benchmark colabx's fused ops against their pure-PyTorch twins (eager and torch.compile) and,
for the distance transform, scipy, the `edt` package and cuCIM when they are installed.

Every ratio is taken against a baseline measured in the same run. Prints a markdown table and
writes JSON (machine info + every timing). Run as ``colabx bench`` (installed package) or
``python -m benchmarks.bench_ops`` (source checkout; results under ``benchmarks/results``)::

    colabx bench                                  # CPU, the issue sizes
    colabx bench --device cuda --cuda-graphs      # GPU, also CUDA-graph replays
    colabx bench --quick --ops distance_transform # tiny sizes: a smoke run
"""

from __future__ import annotations

import argparse
import importlib

import torch

from colabx.bench.harness import format_table, machine_info, run_cases, write_json

OPS = ("dice_ce_loss", "context_labels", "distance_transform")


def main(argv: list[str] | None = None, prog: str = "colabx bench",
         default_out: str = "colabx_bench_ops_{device}.json") -> dict:
    """Parse ``argv``, run the cases, print the table, write the JSON; returns the payload."""
    summary = " ".join(__doc__.split("\n\n")[0].split())  # the docstring's first paragraph
    parser = argparse.ArgumentParser(prog=prog, description=summary)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="also time colabx/eager/compile as CUDA-graph replays (GPU time, no host overhead)",
    )
    parser.add_argument(
        "--min-time",
        type=float,
        default=0.5,
        help="seconds of timed repetitions per implementation (default 0.5)",
    )
    parser.add_argument(
        "--out",
        default=default_out,
        help=f"JSON output path ({{device}} is substituted; default {default_out})",
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but torch sees no CUDA device")
    info = machine_info(device)
    print(
        f"# {prog} on {info.get('gpu', info['cpu'])} ({info['device']}), "
        f"torch {info['torch']}, {info['torch_threads']} CPU threads",
        flush=True,
    )

    rows: list[dict] = []
    payload = {
        "machine": info,
        "command": f"{prog} " + " ".join(argv or []),
        "quick": args.quick,
        "rows": rows,
    }
    out = args.out.format(device=device.type)
    for op in args.ops:
        module = importlib.import_module(f"colabx.bench.cases.{op}")
        rows += run_cases(
            module.cases(device, quick=args.quick),
            device,
            min_time_s=args.min_time,
            cuda_graphs=args.cuda_graphs,
        )
        write_json(out, payload)  # after each op: a run stopped by a time limit keeps these

    print("\n" + format_table(rows))
    return payload

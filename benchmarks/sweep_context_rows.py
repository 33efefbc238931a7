"""Thread rows per block of context_labels' pooled-level CUDA kernels: the automatic choice
against every fixed one (COLABX_CONTEXT_LABELS_ROWS), 2x2xN^3 with 4 levels, N = 80 and 160.
Per setting: the two kernels' GPU times (torch.profiler), forward + backward as a CUDA-graph
replay with its effective bandwidth (the bytes of colabx.bench's context_labels case), and the
largest difference of the outputs and the gradient from a float64 run of the PyTorch twin.

    python -m benchmarks.sweep_context_rows --out benchmarks/results/context_rows.json
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

import colabx
from colabx.bench.cases.context_labels import _bytes, _inputs
from colabx.bench.harness import graph_replay, machine_info, time_callable, write_json
from colabx.twins.context_labels import context_labels_reference

ENV = "COLABX_CONTEXT_LABELS_ROWS"
B, T, C, LEVELS = 2, 2, 2, 4


def _fwd_bwd(o, y, d, grads):
    outs = colabx.context_labels(o, y, d, C, levels=LEVELS, validate=False)
    return outs, torch.autograd.grad(outs, [o], grads)[0]


def _kernel_us(fn, reps: int = 10) -> dict[str, float]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return {ev.key.split("<")[0].split("::")[-1]: ev.device_time_total / reps
            for ev in prof.key_averages() if "tiled" in ev.key and ev.device_time_total > 0}


def _setting(rows: str, o, y, d, grads, ones, ref, gref, nbytes) -> dict:
    if rows == "auto":
        os.environ.pop(ENV, None)
    else:
        os.environ[ENV] = rows
    outs, g = _fwd_bwd(o, y, d, grads)
    err_out = max(float((a.detach().double() - r).abs().max())
                  for a, r in zip(outs, ref, strict=True))
    err_grad = float((g.double() - gref).abs().max())
    del outs, g  # no autograd graph may outlive this call into the capture below

    def fn():
        return _fwd_bwd(o, y, d, ones)

    kernels = _kernel_us(fn)
    ms = time_callable(graph_replay(fn), o.device, 0.2)["median_ms"]
    return {"kernels_us": kernels, "graph_ms": ms, "graph_TBps": nbytes / (ms * 1e-3) / 1e12,
            "max_err_out": err_out, "max_err_grad": err_grad}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/context_rows.json")
    args = parser.parse_args()
    dev = torch.device("cuda")
    rows_env = os.environ.get(ENV)
    result = {"machine": machine_info(dev), "rows": {}}
    print(f"{'size':>10} {'rows':>5} {'fwd us':>8} {'bwd us':>8} {'graph ms':>9} {'TB/s':>6} "
          f"{'err out':>9} {'err grad':>9}")
    try:
        for n in (80, 160):
            o, y, d = _inputs(B, T, C, n, dev)
            o64 = o.detach().double().requires_grad_()
            ref = context_labels_reference(o64, y, d.double(), C, levels=LEVELS)
            grads = [torch.randn_like(r, dtype=torch.float32) for r in ref]
            gref = torch.autograd.grad(ref, [o64], [g.double() for g in grads])[0]
            ref = [r.detach() for r in ref]
            ones = [torch.ones_like(g) for g in grads]
            nbytes = _bytes(B, T, C, n, LEVELS, o, y)
            for rows in ("auto", "8", "4", "2", "1"):
                r = _setting(rows, o, y, d, grads, ones, ref, gref, nbytes)
                result["rows"][f"{B}x{T}x{n}^3 rows={rows}"] = r
                k = r["kernels_us"]
                print(f"{n:>8}^3 {rows:>5} {k.get('fwd_tiled2', 0):8.1f} "
                      f"{k.get('bwd_tiled2', 0):8.1f} {r['graph_ms']:9.4f} "
                      f"{r['graph_TBps']:6.2f} {r['max_err_out']:9.2e} {r['max_err_grad']:9.2e}",
                      flush=True)
    finally:
        if rows_env is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = rows_env
    write_json(args.out, result)


if __name__ == "__main__":
    main()

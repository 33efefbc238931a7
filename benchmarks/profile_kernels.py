"""Per-kernel GPU times of colabx's ops at the issue sizes (torch.profiler), to see which kernel
a slow op spends its time in. Prints one table per op and writes JSON.

    python -m benchmarks.profile_kernels --out benchmarks/results/kernels.json
    python -m benchmarks.profile_kernels --once "context_labels 2x2x160^3 L=4"   # under ncu
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import colabx
from colabx.bench.harness import write_json


def _workloads(dev: torch.device) -> dict[str, callable]:
    g = torch.Generator(device="cpu").manual_seed(0)
    s = (160, 160, 160)
    z80 = torch.randn(2, 3, 80, 80, 80, generator=g).to(dev).requires_grad_()
    y80 = torch.softmax(torch.randn(2, 3, 80, 80, 80, generator=g), 1).to(dev).requires_grad_()
    z = torch.randn(2, 3, *s, generator=g).to(dev).requires_grad_()
    zb = z.detach().bfloat16().requires_grad_()
    zh = z.detach().half().requires_grad_()
    y = torch.softmax(torch.randn(2, 3, *s, generator=g), 1).to(dev).requires_grad_()
    o = torch.randn(2, 2, *s, generator=g).to(dev).requires_grad_()
    lab = (torch.rand(2, *s, generator=g) > 0.9).long().to(dev)
    dist = colabx.distance_transform(lab.bool())
    m256 = (torch.rand(1, 256, 256, 256, generator=g) > 0.999).to(dev)

    def dice(zz, yy=y):
        return lambda: torch.autograd.grad(colabx.dice_ce_loss(zz, yy), (zz, yy))

    def ctx(levels):
        def run():
            out = colabx.context_labels(o, lab, dist, 2, levels=levels, validate=False)
            outs = out if isinstance(out, list) else [out]
            return torch.autograd.grad(outs, (o,), [torch.ones_like(x) for x in outs])

        return run

    return {
        "dice_ce_loss 2x3x80^3 fp32": dice(z80, y80),
        "dice_ce_loss 2x3x160^3 fp32": dice(z),
        "dice_ce_loss 2x3x160^3 bf16": dice(zb),
        "dice_ce_loss 2x3x160^3 fp16": dice(zh),
        "context_labels 2x2x160^3 L=1": ctx(1),
        "context_labels 2x2x160^3 L=4": ctx(4),
        "distance_transform 256^3": lambda: colabx.distance_transform(m256, (0.8, 0.8, 2.5)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/kernels.json")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--once", metavar="WORKLOAD",
                        help="run this workload once, unprofiled (for Nsight Compute), and exit")
    args = parser.parse_args()
    dev = torch.device("cuda")
    workloads = _workloads(dev)
    if args.once is not None:
        if args.once not in workloads:
            parser.error(f"--once: unknown workload {args.once!r}; one of {sorted(workloads)}")
        workloads[args.once]()
        torch.cuda.synchronize()
        return
    result = {}
    for name, fn in workloads.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.reps):
                fn()
            torch.cuda.synchronize()
        rows = []
        for ev in prof.key_averages():
            if ev.device_time_total > 0:
                rows.append(
                    {
                        "kernel": ev.key[:90],
                        "calls": ev.count // args.reps,
                        "us_per_rep": ev.device_time_total / args.reps,
                    }
                )
        rows.sort(key=lambda r: -r["us_per_rep"])
        result[name] = rows
        print(f"\n{name}")
        for r in rows[:8]:
            print(f"  {r['us_per_rep']:9.1f} us  x{r['calls']:<3} {r['kernel']}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()

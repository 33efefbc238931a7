"""Benchmark the drop-ins of :mod:`colabx.compat` against the reference-style twins of
:mod:`colabx.reference.compat` (the public CoLab code's steps), same run, same inputs.

* ``calculate_loss`` forward + backward (∂output and ∂taskGenerated of every level), deep
  supervision, soft masks;
* ``calcualte_loss_val`` (the meta loss and its nine diagnostics) forward + backward of the meta
  loss, full resolution;
* ``hessian_vector_product_Unet`` (one finite-difference meta gradient, the generator forward
  included: the reference frees its graph);
* ``one_hot2dist`` of one foreground mask (CPU: it is a NumPy function).

Prints a markdown table and writes JSON (machine info + every timing)::

    python -m benchmarks.bench_compat                    # CPU
    python -m benchmarks.bench_compat --device cuda      # GPU sizes (one_hot2dist stays on CPU)
    python -m benchmarks.bench_compat --quick --min-time 0
"""

from __future__ import annotations

import argparse
import types

import numpy as np
import torch
import torch.nn.functional as F

from colabx import distance_transform
from colabx.bench.harness import Case, format_table, machine_info, run_cases, write_json
from colabx.compat import (
    calcualte_loss_val,
    calculate_loss,
    hessian_vector_product_Unet,
    one_hot2dist,
)
from colabx.models import UNet, task_generator
from colabx.reference.compat import (
    calculate_loss_reference,
    calculate_loss_val_reference,
    hessian_vector_product_reference,
    one_hot2dist_reference,
)


def _args(levels: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(NumsClass=2, taskcls=2, deepsupervision=True,
                                 downsampling=levels, vanilla=False, manuallabel=False)


def _blob_labels(batch: int, n: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    y = torch.zeros(batch, n, n, n, dtype=torch.long)
    for b in range(batch):
        c = torch.randint(n // 4, 3 * n // 4, (3,), generator=g)
        r = max(2, n // 8)
        y[b, c[0] - r:c[0] + r, c[1] - r:c[1] + r, c[2] - r:c[2] + r] = 1
    return y.to(device)


def _masks(y: torch.Tensor, levels: int) -> list[torch.Tensor]:
    d = distance_transform(y > 0).unsqueeze(1)
    m = torch.exp((12 - d) / 8).clamp(max=1)
    return [m if lvl == 0 else -F.max_pool3d(-m, 2**lvl) for lvl in range(levels)]


def loss_case(device: torch.device, batch: int, n: int, levels: int) -> Case:
    args = _args(levels)
    g = torch.Generator().manual_seed(1)
    y = _blob_labels(batch, n, device)
    zs, qs = [], []
    for lvl in range(levels):
        s = n // 2**lvl
        zs.append((2 * torch.randn(batch, 3, s, s, s, generator=g)).to(device).requires_grad_())
        q = torch.softmax(torch.randn(batch, 2, s, s, s, generator=g), 1)
        qs.append(q.to(device).requires_grad_())
    masks = _masks(y, levels)

    def run(fn):
        def go():
            loss = fn(args, y, zs, qs, loss_masks=[m.clone() for m in masks])
            return torch.autograd.grad(loss, zs + qs)
        return go

    return Case(op="calculate_loss fwd+bwd", size=f"{batch}x3x{n}^3, {levels} levels",
                impls={"colabx": run(calculate_loss), "reference": run(calculate_loss_reference)})


def val_case(device: torch.device, batch: int, n: int) -> Case:
    args = _args(4)
    g = torch.Generator().manual_seed(2)
    z = (2 * torch.randn(batch, 3, n, n, n, generator=g)).to(device).requires_grad_()
    y = _blob_labels(batch, n, device)

    def run(fn):
        def go():
            return torch.autograd.grad(fn(args, y, [z])[0], z)
        return go

    return Case(op="calcualte_loss_val fwd+bwd", size=f"{batch}x3x{n}^3",
                impls={"colabx": run(calcualte_loss_val),
                       "reference": run(calculate_loss_val_reference)})


def hvp_case(device: torch.device, n: int, features: int, pools: int) -> Case:
    args = _args(2)
    torch.manual_seed(0)
    f = UNet(1, 3, 3, base_features=features, num_pool=pools, deep_supervision=True).to(device)
    gen = task_generator(1, 2, 3, base_features=features, num_pool=pools).to(device)
    x = torch.randn(1, 1, n, n, n, device=device)
    y = _blob_labels(1, n, device)
    masks = _masks(y, 2)
    vector = [torch.randn_like(p) for p in f.parameters()]

    def run(fn, **kw):
        def go():
            q = torch.softmax(gen(x), 1)
            return fn(f, gen, vector, x, y, [q, F.avg_pool3d(q, 2)], None, args,
                      [m.clone() for m in masks], 0, **kw)
        return go

    return Case(op="hessian_vector_product_Unet", size=f"1x1x{n}^3, {features} features, "
                f"{pools} pools", impls={
                    "colabx": run(hessian_vector_product_Unet),
                    "reference": run(hessian_vector_product_reference,
                                     loss_fn=calculate_loss_reference)})


def dist_case(n: int, depth: int) -> Case:
    """One n×n×depth foreground mask."""
    y = _blob_labels(1, n, torch.device("cpu"))[0].numpy()[:, :, :depth]
    seg = (y > 0).astype(np.int32)[None]
    return Case(op="one_hot2dist", size="1x" + "x".join(map(str, seg.shape[1:])) + " int32",
                impls={"colabx": lambda: one_hot2dist(seg),
                       "reference": lambda: one_hot2dist_reference(seg)})


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_compat",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--min-time", type=float, default=0.5)
    parser.add_argument("--out", default="benchmarks/results/compat_{device}.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.quick:
        cases = [loss_case(device, 1, 16, 3), val_case(device, 1, 16), hvp_case(device, 16, 4, 2),
                 dist_case(16, 8)]
    elif device.type == "cuda":
        cases = [loss_case(device, 2, 80, 4), val_case(device, 2, 80), hvp_case(device, 80, 30, 4),
                 dist_case(160, 96)]
    else:
        cases = [loss_case(device, 2, 48, 4), val_case(device, 2, 48), hvp_case(device, 32, 8, 3),
                 dist_case(160, 96)]
    info = machine_info(device)
    print(f"# bench_compat on {info.get('gpu', info['cpu'])}, torch {info['torch']}, "
          f"{info['torch_threads']} CPU threads", flush=True)
    rows = run_cases(cases, device, min_time_s=args.min_time)
    print(format_table(rows))
    payload = {"machine": info, "rows": rows}
    write_json(args.out.format(device=device.type), payload)
    return payload


if __name__ == "__main__":
    main()

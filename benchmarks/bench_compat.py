"""Benchmark the drop-ins of :mod:`colabx.compat` against the reference-style twins of
:mod:`colabx.compat.twins` (the public CoLab code's steps), same run, same inputs.

* ``calculate_loss`` forward + backward (∂output and ∂taskGenerated of every level), deep
  supervision, soft masks;
* ``calcualte_loss_val`` (the meta loss and its nine diagnostics) forward + backward of the meta
  loss, full resolution;
* ``hessian_vector_product_Unet`` (one finite-difference meta gradient, the generator forward
  included: the reference frees its graph);
* ``one_hot2dist`` of one foreground mask (CPU: it is a NumPy function);
* ``train epoch``: one epoch of the reference's ``common.train`` semantics (per-sample meta step
  every iteration, deep supervision, distance masks): the reference-style loop
  (:func:`colabx.compat.twins.train_reference`) with its twins ("reference"), the same loop
  with the drop-ins installed by :func:`colabx.compat.apply_to_reference`
  ("apply_to_reference"; on the CPU with its convolution routing, switched on for that row's
  runs only), and :func:`colabx.compat.train` ("colabx": per-sample meta steps, the
  reference's semantics; "colabx_batched": one meta step per batch); each on its own copy of
  the same networks and optimizers.

Prints a markdown table and writes JSON (machine info + every timing)::

    python -m benchmarks.bench_compat                    # CPU
    python -m benchmarks.bench_compat --device cuda      # GPU sizes (one_hot2dist stays on CPU)
    python -m benchmarks.bench_compat --quick --min-time 0
    python -m benchmarks.bench_compat --only "train epoch"   # the epoch row alone
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import types

import numpy as np
import torch
import torch.nn.functional as F

import colabx.compat
from colabx import distance_transform
from colabx.bench.harness import Case, format_table, machine_info, run_cases, write_json
from colabx.compat import (
    calcualte_loss_val,
    calculate_loss,
    hessian_vector_product_Unet,
    one_hot2dist,
)
from colabx.compat.twins import (
    calculate_loss_reference,
    calculate_loss_val_reference,
    hessian_vector_product_reference,
    one_hot2dist_reference,
    train_reference,
)
from colabx.models import UNet, onednn_convolutions, task_generator


def _loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (Linux), recorded with the timings."""
    try:
        with open("/proc/loadavg") as fh:
            return [float(v) for v in fh.read().split()[:3]]
    except OSError:
        return None


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


def _patched_reference_modules() -> types.ModuleType:
    """Stand-ins for the reference's ``common`` / ``utilities`` holding the twins, patched by
    :func:`colabx.compat.apply_to_reference` as a user's ``train.py`` would; returns common."""
    common, utilities = types.ModuleType("common"), types.ModuleType("utilities")
    common.calculate_loss = calculate_loss_reference
    common.calcualte_loss_val = calculate_loss_val_reference
    common.hessian_vector_product_Unet = hessian_vector_product_reference
    utilities.one_hot2dist = one_hot2dist_reference
    utilities.hessian_vector_product_Unet = hessian_vector_product_reference
    # the convolution routing is switched on around the row's own runs (see epoch_case), so
    # that it does not stay on for the reference row in this process
    colabx.compat.apply_to_reference(common, utilities, cpu_convolutions=False)
    return common


def epoch_case(device: torch.device, batch: int, iterations: int, n: int, features: int,
               pools: int) -> Case:
    """One epoch of ``iterations`` iterations of ``batch`` n³ patches (blob labels, their signed
    distances), the reference's flags: deep supervision over ``pools`` levels, distance masks,
    a meta step every iteration, c = 2, t = 2."""
    args = types.SimpleNamespace(
        NumsClass=2, taskcls=2, deepsupervision=True, downsampling=pools, vanilla=False,
        manuallabel=False, distdetach=True, threshold_sub=0.0, threshold_dev=20.0,
        batch_size=batch, numIteration=iterations, taskupdate=1, print_freq=20,
        tensorboard=False)
    y = _blob_labels(batch * iterations, n, torch.device("cpu")).numpy()
    dist = np.stack([one_hot2dist((y[i:i + 1] > 0).astype(np.int32))[0] for i in range(len(y))])
    x = np.random.default_rng(0).normal(size=(len(y), 1, n, n, n)) + y[:, None]
    sampling = (x, y, dist.astype(np.float64), list(range(len(y))))
    torch.manual_seed(0)
    f0 = UNet(1, 3, 3, base_features=features, num_pool=pools, deep_supervision=True).to(device)
    g0 = task_generator(1, 2, 3, base_features=features, num_pool=pools).to(device)
    log = types.SimpleNamespace(info=lambda msg: None)

    def run(fn, routed=False, **kw):
        f, g = copy.deepcopy(f0), copy.deepcopy(g0)
        opt = torch.optim.SGD(f.parameters(), lr=1e-2, weight_decay=3e-5, momentum=0.99,
                              nesterov=True)
        opt_arch = torch.optim.Adam(g.parameters(), lr=3e-4)

        def epoch():
            with onednn_convolutions(routed):
                return fn(sampling, None, f, g, None, opt, opt_arch, 1e-2, 0, log, args, **kw)
        return epoch

    return Case(op="train epoch", size=f"{iterations} it x {batch}x1x{n}^3, {features} features, "
                f"{pools} pools", impls={
                    "colabx": run(colabx.compat.train),
                    "colabx_batched": run(colabx.compat.train, meta_mode="batched"),
                    "apply_to_reference": run(train_reference, routed=device.type == "cpu",
                                              common=_patched_reference_modules()),
                    "reference": run(train_reference)})


def run_cases_cpu_time(cases: list[Case], reps: int) -> list[dict]:
    """:func:`run_cases` timed by the process's CPU time (``time.process_time``) with one torch
    thread: on a shared machine wall time also counts the other processes' load, CPU time is
    this process's work. One warm-up call each, then ``reps`` rounds over the implementations in
    turn (so a change of load hits every implementation alike); median and min per label."""
    rows = []
    for case in cases:
        for fn in case.impls.values():
            fn()
        times: dict[str, list[float]] = {label: [] for label in case.impls}
        for _ in range(reps):
            for label, fn in case.impls.items():
                t0 = time.process_time()
                fn()
                times[label].append((time.process_time() - t0) * 1e3)
        timings = {label: {"median_ms": statistics.median(v), "min_ms": min(v), "reps": len(v),
                           "clock": "process_time"} for label, v in times.items()}
        for label, t in timings.items():
            print(f"  {case.op:<20} {case.size:<28} {label:<22} {t['median_ms']:.3f} ms CPU",
                  flush=True)
        ours = timings["colabx"]["median_ms"]
        rows.append({"op": case.op, "size": case.size, "timings": timings, "notes": case.notes,
                     "speedup_vs": {label: t["median_ms"] / ours for label, t in timings.items()
                                    if label != "colabx"}})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_compat",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--min-time", type=float, default=0.5)
    parser.add_argument("--out", default="benchmarks/results/compat_{device}.json")
    parser.add_argument("--only", default=None, help="run only the rows whose op contains this")
    parser.add_argument("--skip", default=None, help="leave out the rows whose op contains this")
    parser.add_argument("--cpu-time", type=int, default=0, metavar="REPS",
                        help="CPU only: time REPS rounds by process CPU time with 1 torch thread "
                             "(for a shared, loaded machine) instead of wall time")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.quick:
        cases = [loss_case(device, 1, 16, 3), val_case(device, 1, 16), hvp_case(device, 16, 4, 2),
                 dist_case(16, 8), epoch_case(device, 2, 1, 8, 2, 2)]
    elif device.type == "cuda":
        cases = [loss_case(device, 2, 80, 4), val_case(device, 2, 80), hvp_case(device, 80, 30, 4),
                 dist_case(160, 96), epoch_case(device, 2, 3, 80, 30, 4)]
    else:
        cases = [loss_case(device, 2, 48, 4), val_case(device, 2, 48), hvp_case(device, 32, 8, 3),
                 dist_case(160, 96), epoch_case(device, 2, 2, 32, 8, 3)]
    if args.only:
        cases = [c for c in cases if args.only in c.op]
    if args.skip:
        cases = [c for c in cases if args.skip not in c.op]
    if args.cpu_time:
        if device.type != "cpu":
            parser.error("--cpu-time is for the CPU")
        torch.set_num_threads(1)
    info = machine_info(device)
    print(f"# bench_compat on {info.get('gpu', info['cpu'])}, torch {info['torch']}, "
          f"{info['torch_threads']} CPU threads, load {_loadavg()}", flush=True)
    if args.cpu_time:
        rows = run_cases_cpu_time(cases, args.cpu_time)
    else:
        rows = run_cases(cases, device, min_time_s=args.min_time)
    for r in rows:  # epoch row: each implementation against the reference-style loop
        t = r["timings"]
        if r["op"] == "train epoch" and "median_ms" in t.get("reference", {}):
            r["speedup_of_vs_reference"] = {
                label: t["reference"]["median_ms"] / v["median_ms"]
                for label, v in t.items() if label != "reference" and "median_ms" in v}
    print(format_table(rows))
    for r in rows:
        for label, v in r.get("speedup_of_vs_reference", {}).items():
            print(f"{r['op']}: {label} {v:.2f}× faster than the reference-style loop")
    payload = {"machine": info, "rows": rows, "loadavg": _loadavg(),
               "clock": "process_time, 1 thread" if args.cpu_time else "wall"}
    write_json(args.out.format(device=device.type), payload)
    return payload


if __name__ == "__main__":
    main()

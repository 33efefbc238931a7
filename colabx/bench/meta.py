"""What CoLab costs per training iteration, against vanilla training, on this machine.

``colabx bench meta`` times, in one run with one network configuration (the flags, or a trained
run's plan with ``--run``):

* ``vanilla``: one iteration of plain training (K = c outputs, one-hot targets);
* ``colab plain``: an iteration without a generator update (K = c + t − 1, labels from g);
* ``colab meta (reference order)`` / ``(shared order)``: an iteration with a generator update,
  in the order of :attr:`colabx.method.MetaConfig.order` (``--difference`` applies to both);
* ``colab meta (published iteration)``, with a one-sided ``--difference`` only: the reference
  order with the paper's central difference, the iteration of the published code (and of
  colabx before the shared order and the one-sided difference existed), so that the same run
  says how much faster the default iteration is than that;
* ``restructured PyTorch``: the same algorithm in plain PyTorch
  (:func:`colabx.twins.meta.restructured_meta_step` + the plain update);
* ``reference-style PyTorch``: the published code's way (per-sample loop, network copies, two
  generator backwards; :func:`colabx.twins.meta.reference_meta_step` + the plain update).

colabx's rows run their CPU convolutions on oneDNN and step fused optimizers on the CPU, as
``colabx train`` does (:func:`colabx.models.onednn_convolutions`,
:func:`colabx.device.optimizer_options`); the two pure-PyTorch rows keep PyTorch's defaults.

The meta part is an iteration with a generator update minus ``colab plain``; CoLab's cost at a
generator period P is ``((P − 1) · plain + meta iteration) / P``, its overhead the percentage
over ``vanilla`` (the number the paper quotes: 20–30 % for its schedule). Optimizers run with a
zero learning rate (momentum and Adam state still update), so every repetition does the same
work. The rows are timed in interleaved rounds (``--rounds``), so that a machine whose speed
drifts during the run (a shared VM) moves every row alike. Prints markdown tables and writes
JSON::

    colabx bench meta                          # CPU: B=2, 32³, 8 features, 3 pools
    colabx bench meta --device cuda --patch 80 --features 30 --pools 4
    colabx bench meta --run runs/liver         # a trained run's network plan
    colabx bench meta --quick --min-time 0     # tiny net: a smoke run
    colabx bench meta --device cuda --profile 5  # + where each row's time goes
    colabx bench meta --device cuda --cuda-graphs  # as colabx train --cuda-graphs

``--profile N`` profiles N calls of every row after the timings: on a GPU, a row whose kernels
keep the GPU busy for much less than its wall time is bound by the host (launch overhead).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch

from colabx import distance_transform
from colabx._precision import AMP_DTYPES, resolve_amp
from colabx.bench.harness import machine_info, profile_calls, time_interleaved, write_json
from colabx.device import optimizer_options
from colabx.method.meta_step import DIFFERENCES, MetaConfig, MetaStep
from colabx.models import UNet, onednn_convolutions, task_generator
from colabx.ops.context_labels import context_labels
from colabx.ops.dice_ce_loss import dice_ce_loss
from colabx.train.cuda_graph import CapturedStep
from colabx.twins.meta import (
    reference_meta_step,
    reference_plain_step,
    restructured_meta_step,
)

__all__ = ["main"]

ALPHA = 0.01  # the inner step's learning rate (nnU-Net's initial one)


@dataclass(frozen=True)
class Setup:
    """The networks and one batch: ``in_channels``, ``c`` classes, ``t`` contexts, patch, pooling
    kernels per stage, first-stage features, deep supervision, batch size."""

    in_channels: int
    num_classes: int
    t: int
    patch: tuple[int, ...]
    pools: tuple[tuple[int, ...], ...]
    features: int
    max_features: int | None
    deep_supervision: bool
    batch: int

    def nets(self, device: torch.device, out_channels: int) -> tuple[UNet, UNet]:
        kw = dict(base_features=self.features, max_features=self.max_features,
                  pool_kernel_sizes=list(self.pools))
        torch.manual_seed(0)
        f = UNet(self.in_channels, out_channels, len(self.patch),
                 deep_supervision=self.deep_supervision, **kw).to(device)
        g = task_generator(self.in_channels, self.t, len(self.patch), **kw).to(device)
        return f, g

    def batch_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(self.batch, self.in_channels, *self.patch, generator=gen)
        y = torch.zeros(self.batch, *self.patch, dtype=torch.long)
        box = tuple(slice(n // 3, n // 3 + max(2, n // 4)) for n in self.patch)
        for b in range(self.batch):
            y[(b, *box)] = torch.randint(1, self.num_classes, (), generator=gen)
        d = distance_transform(y > 0)
        return x.to(device), y.to(device), d.to(device)


def _setup_from_run(run: str, batch: int) -> Setup:
    from colabx.inference.run import load_trained_model

    _, plan, _ = load_trained_model(run, "latest")
    return Setup(plan["in_channels"], plan["num_classes"], max(2, plan["t"]),
                 tuple(plan["patch_size"]), tuple(tuple(k) for k in plan["pool_kernel_sizes"]),
                 plan["base_features"], plan["max_features"], plan["deep_supervision"], batch)


def _iterations(s: Setup, device: torch.device, difference: str,
                amp_dtype: torch.dtype | None = None,
                compile_mode: str | None = None,
                meta_amp_dtype: torch.dtype | None = None,
                fd_tf32: bool = True,
                cuda_graphs: bool = False) -> dict[str, Callable[[], object]]:
    """One callable per row, each one training iteration on the same batch; with ``amp_dtype``
    the network forwards run under autocast (colabx's θ± forwards stay fp32 as always; the
    reference-style step has no mixed precision, as the published code). With
    ``compile_mode`` colabx's rows run ``torch.compile``d networks, as ``colabx train
    --compile`` does. ``meta_amp_dtype``: the autocast of the generator and L_ROI passes in
    colabx's plain, reference-order and shared-order rows (``colabx train --meta-amp``); the
    published iteration keeps ``amp_dtype``'s. ``fd_tf32``: colabx's θ± forwards (and a
    one-sided difference's inner forward) may use TF32 (``colabx train``'s default).
    ``cuda_graphs``: colabx's rows replay their passes from CUDA graphs, as ``colabx train
    --cuda-graphs``: the updates of θ without a generator update (the vanilla and plain rows,
    the plain part of the reference order's) and the meta passes of the update iterations
    (with the shared forward and backward in the shared order)."""
    c = s.num_classes
    amp = amp_dtype is not None

    def compiled(*nets):
        if compile_mode is None:
            return nets
        return tuple(torch.compile(n, mode=compile_mode) for n in nets)

    def autocast(on: bool = amp):
        return torch.autocast(device.type, dtype=amp_dtype, enabled=on)

    # colabx's rows enter the CPU convolution routing per iteration, as Trainer.train_iteration
    # does; the twins' rows keep PyTorch's dispatch, as the published code has it
    as_trainer = onednn_convolutions(device.type == "cpu")

    x, y, d = s.batch_on(device)
    inputs = {"image": x, "label": y, "distance": d}
    rows: dict[str, Callable[[], object]] = {}

    def backward(loss_fn):
        def step_fn(inp):
            loss = loss_fn(inp)
            loss.backward()
            return loss
        return step_fn

    def update(loss_fn, net, opt):
        """θ's update: ``loss_fn(inputs)``, its backward (replayed with ``cuda_graphs``), the
        optimizer step."""
        step = CapturedStep(backward(loss_fn), net.parameters(), inputs) if cuda_graphs \
            else backward(loss_fn)

        def run():
            opt.zero_grad(set_to_none=True)
            step(inputs)
            opt.step()
        return run

    def replayed_meta(ms, f, g, gopt):
        """With ``cuda_graphs``, an update iteration's meta passes replayed from a graph
        (:meth:`MetaStep.update_pass`, as ``colabx train --cuda-graphs``), then the
        generator's step; else None."""
        if not cuda_graphs:
            return None
        meta_inputs = {**inputs, "lr": torch.full((), ALPHA, device=device)}
        step = CapturedStep(lambda inp: ms.update_pass(inp["image"], inp["label"],
                                                       inp["distance"], inp["lr"]),
                            [*f.parameters(), *g.parameters()], meta_inputs)

        def run():
            _, tensors = step(meta_inputs)
            if not tensors.info().skipped:
                gopt.step()
        return run

    fv, _ = s.nets(device, c)
    fused = optimizer_options(device)  # colabx's rows step their optimizers as the trainer does
    vopt = torch.optim.SGD(fv.parameters(), lr=0.0, momentum=0.99, nesterov=True, **fused)
    (fv,) = compiled(fv)
    # t = 1: the context labels are one-hot(y) at every output level
    onehot = context_labels(torch.zeros(s.batch, 1, *s.patch, device=device), y, d, c,
                            levels=fv.output_strides if s.deep_supervision else 1)

    def vanilla_loss(inp):
        with autocast():
            z = fv(inp["image"])
        return dice_ce_loss(z, onehot, validate=False)

    rows["vanilla"] = as_trainer(update(vanilla_loss, fv, vopt))
    k = c + s.t - 1
    # (row label, order, difference, meta_amp: None follows amp, as the published iteration)
    meta_amp = meta_amp_dtype is not None
    variants = [("reference order", "reference", difference, meta_amp),
                ("shared order", "shared", difference, meta_amp)]
    if difference != "central":
        variants.append(("published iteration", "reference", "central", None))
    for label, order, diff, meta in variants:
        f, g = s.nets(device, k)
        fopt = torch.optim.SGD(f.parameters(), lr=0.0, momentum=0.99, nesterov=True, **fused)
        gopt = torch.optim.Adam(g.parameters(), lr=0.0, **fused)
        f, g = compiled(f, g)
        ms = MetaStep(f, g, MetaConfig(c, order=order, difference=diff, amp=amp, meta_amp=meta,
                                       amp_dtype=amp_dtype or meta_amp_dtype or torch.bfloat16,
                                       fd_tf32=fd_tf32))
        graphed = replayed_meta(ms, f, g, gopt)
        if order == "reference":
            plain = update(lambda inp, ms=ms: ms.update_loss(inp["image"], inp["label"],
                                                             inp["distance"]), f, fopt)
            rows.setdefault("colab plain", as_trainer(plain))

            def reference(ms=ms, gopt=gopt, plain=plain, graphed=graphed):
                if graphed is None:
                    ms.step(x, y, d, ALPHA, gopt)
                else:
                    graphed()
                plain()

            rows[f"colab meta ({label})"] = as_trainer(reference)
        else:
            def shared(ms=ms, f=f, fopt=fopt, gopt=gopt, graphed=graphed):
                fopt.zero_grad(set_to_none=True)
                if graphed is None:
                    inner = ms.shared_forward(x, y, d)
                    inner.loss.backward()
                    ms.step(x, y, d, ALPHA, gopt, inner=inner)
                else:
                    graphed()
                fopt.step()

            rows[f"colab meta ({label})"] = as_trainer(shared)
    # the restructured twin in colabx's precision (θ± included); the reference-style step has
    # no mixed precision and runs every pass with torch's default TF32, as the published code
    mixed = {"amp": True, "amp_dtype": amp_dtype} if amp else {}
    for name, meta_fn, kw in (("restructured PyTorch", restructured_meta_step,
                               {**mixed, "fd_tf32": fd_tf32}),
                              ("reference-style PyTorch", reference_meta_step, {})):
        f, g = s.nets(device, k)
        fopt = torch.optim.SGD(f.parameters(), lr=0.0, momentum=0.99, nesterov=True)
        gopt = torch.optim.Adam(g.parameters(), lr=0.0)

        def twin(meta_fn=meta_fn, f=f, g=g, fopt=fopt, gopt=gopt, kw=kw):
            meta_fn(f, g, x, y, d, c, ALPHA, gopt, **kw)
            with autocast(kw.get("amp", False)):
                reference_plain_step(f, g, x, y, d, c, fopt)

        rows[name] = twin
    return rows


def _overheads(ms: dict[str, float], period: int) -> list[dict]:
    vanilla, plain = ms["vanilla"], ms["colab plain"]
    out = []
    for name, meta in ms.items():
        if name in ("vanilla", "colab plain"):
            continue
        row = {"implementation": name, "meta_part_ms": meta - plain,
               "meta_part_over_plain": (meta - plain) / plain}
        for p in sorted({1, period}):
            cost = ((p - 1) * plain + meta) / p
            row[f"period_{p}_ms"] = cost
            row[f"period_{p}_overhead_pct"] = 100.0 * (cost / vanilla - 1.0)
        out.append(row)
    return out


def main(argv: list[str] | None = None, prog: str = "colabx bench meta") -> dict:
    """Parse ``argv``, time every row, print the tables, write the JSON; returns the payload."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument("--run", help="take the network plan of this trained run directory")
    ap.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    ap.add_argument("--patch", type=int, default=32, help="cubic patch edge (default 32)")
    ap.add_argument("--features", type=int, default=8, help="first-stage features (default 8)")
    ap.add_argument("--pools", type=int, default=3, help="pooling stages (default 3)")
    ap.add_argument("--classes", type=int, default=2, help="c, background included (default 2)")
    ap.add_argument("--t", type=int, default=2, help="contexts t (default 2)")
    ap.add_argument("--period", type=int, default=5,
                    help="generator update period for the amortised cost (default 5)")
    ap.add_argument("--difference", choices=("auto", *DIFFERENCES), default="auto",
                    help="finite difference of the meta-gradient in colabx's rows: central, "
                    "one_sided, or auto (default), as colabx train: one_sided without --amp, "
                    "central with it. With one_sided the published iteration (reference order, "
                    "central difference) is timed too")
    ap.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                    help="autocast the network forwards (colabx and the restructured step; "
                    "the reference-style step stays fp32 as the published code): auto "
                    "(default) as colabx train, bf16 on CUDA and none on the CPU")
    ap.add_argument("--meta-amp", choices=("amp", "none", "bf16"), default="amp",
                    help="precision of the generator and L_ROI passes in colabx's rows, as "
                    "colabx train --meta-amp: as --amp (default), none, or bf16 (the published "
                    "iteration's row keeps --amp's)")
    ap.add_argument("--fd-tf32", action=argparse.BooleanOptionalAction, default=True,
                    help="let colabx's θ± forwards (and a one-sided difference's inner forward) "
                    "use TF32 on the GPU as torch allows, as colabx train (default); "
                    "--no-fd-tf32: strict fp32, as colabx train --no-fd-tf32")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="replay colabx's rows from CUDA graphs, as colabx train "
                    "--cuda-graphs: the updates of the network without a generator update "
                    "(vanilla's, CoLab's plain iteration and the reference order's plain part) "
                    "and the update iterations' meta passes (CUDA only)")
    ap.add_argument("--compile", choices=("off", "default", "max-autotune-no-cudagraphs"),
                    default="off", help="torch.compile colabx's networks with this mode, as "
                    "colabx train --compile --compile-mode MODE (default off); the modes that "
                    "capture CUDA graphs are refused for CoLab, whose meta step holds outputs "
                    "that graph replays overwrite")
    ap.add_argument("--quick", action="store_true", help="a tiny network: a smoke run")
    ap.add_argument("--min-time", type=float, default=2.0,
                    help="seconds of timed repetitions per row (default 2)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="interleaved rounds the rows are timed in, so that a drift of the "
                    "machine's speed during the run moves every row alike (default 5)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the timings, profile N calls of every row (torch.profiler): "
                    "wall time, on a GPU the kernels' time (how busy the GPU is), and the "
                    "operations that take the most time; into the table and the JSON "
                    "(default 0: off)")
    ap.add_argument("--out", default="colabx_bench_meta_{device}.json", help="JSON output")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda given but torch sees no CUDA device")
    if args.period < 1:
        ap.error("--period must be >= 1")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.profile < 0:
        ap.error("--profile must be >= 0")
    if args.cuda_graphs and (device.type != "cuda" or args.compile != "off"):
        ap.error("--cuda-graphs needs --device cuda and no --compile")
    args.amp = resolve_amp(args.amp, device)
    amp_dtype = AMP_DTYPES[args.amp]
    if amp_dtype is not None and args.difference == "one_sided":
        ap.error("--difference one_sided needs the inner forward in fp32: use --amp none")
    meta_amp = args.amp if args.meta_amp == "amp" else args.meta_amp
    if meta_amp == "bf16" and args.amp == "fp16":
        ap.error("--meta-amp bf16 with --amp fp16: one autocast dtype per meta step")
    meta_amp_dtype = AMP_DTYPES[meta_amp]
    if args.difference == "auto":
        args.difference = "central" if amp_dtype is not None else "one_sided"
    if args.run:
        setup = _setup_from_run(args.run, args.batch)
    else:
        edge, pools = (16, 2) if args.quick else (args.patch, args.pools)
        features = 4 if args.quick else args.features
        setup = Setup(1, args.classes, args.t, (edge,) * 3, ((2, 2, 2),) * pools, features,
                      None, True, args.batch)
    info = machine_info(device)
    print(f"# {prog} on {info.get('gpu', info['cpu'])} ({info['device']}), torch "
          f"{info['torch']}, {info['torch_threads']} CPU threads; batch {setup.batch}, patch "
          f"{list(setup.patch)}, {len(setup.pools)} pools, {setup.features} features, c "
          f"{setup.num_classes}, t {setup.t}, {args.difference} difference, amp {args.amp}, "
          f"meta passes {meta_amp}, θ± TF32 {args.fd_tf32}, compile {args.compile}, "
          f"CUDA graphs {args.cuda_graphs}",
          flush=True)
    compile_mode = None if args.compile == "off" else args.compile
    calls = _iterations(setup, device, args.difference, amp_dtype, compile_mode, meta_amp_dtype,
                        args.fd_tf32, args.cuda_graphs)
    # compiling (and recording CUDA graphs) takes the first calls
    timings = time_interleaved(calls, device, min_time_s=args.min_time, rounds=args.rounds,
                               warmup=1 if compile_mode is None else 3)
    for name, t in timings.items():
        print(f"  {name}: {t['median_ms']:.1f} ms ({t['reps']} calls)", flush=True)
    ms = {k: v["median_ms"] for k, v in timings.items()}
    overheads = _overheads(ms, args.period)
    payload = {"machine": info, "command": f"{prog} " + " ".join(argv or []),
               "setup": {**setup.__dict__, "difference": args.difference, "amp": args.amp,
                         "meta_amp": meta_amp, "fd_tf32": args.fd_tf32,
                         "cuda_graphs": args.cuda_graphs,
                         "period": args.period, "compile": args.compile},
               "timings": timings, "rows": overheads}
    write_json(args.out.format(device=device.type), payload)
    p = args.period
    print(f"\n| per iteration | ms | meta part / plain | period 1: ms, over vanilla | "
          f"period {p}: ms, over vanilla |\n|---|---|---|---|---|")
    print(f"| vanilla | {ms['vanilla']:.1f} | | | |")
    print(f"| colab plain (no generator update) | {ms['colab plain']:.1f} | | | |")
    for r in overheads:
        print(f"| {r['implementation']} | {ms[r['implementation']]:.1f} | "
              f"{r['meta_part_over_plain']:.2f}× | {r['period_1_ms']:.1f}, "
              f"{r['period_1_overhead_pct']:+.0f} % | {r[f'period_{p}_ms']:.1f}, "
              f"{r[f'period_{p}_overhead_pct']:+.0f} % |")
    ref, shared = ms["colab meta (reference order)"], ms["colab meta (shared order)"]
    print(f"\nshared order: a period-1 iteration {ref / shared:.2f}× faster than the reference "
          f"order ({args.difference} difference in both)")
    if "colab meta (published iteration)" in ms:
        print(f"shared order, {args.difference} difference: "
              f"{ms['colab meta (published iteration)'] / shared:.2f}× faster than the "
              "published iteration (reference order, central difference)")
    if args.profile:
        payload["profile"] = profile_calls(calls, device, reps=args.profile)
        write_json(args.out.format(device=device.type), payload)
        _print_profile(payload["profile"], args.profile)
    return payload


def _print_profile(profile: dict[str, dict], reps: int) -> None:
    gpu = next(iter(profile.values()))["device_ms"] is not None
    print(f"\n| profile ({reps} calls per row) | wall ms | "
          + ("GPU kernels ms | GPU busy | " if gpu else "") + "most time per call |\n|---|---|"
          + ("---|---|" if gpu else "") + "---|")
    for name, p in profile.items():
        busy = f"{p['device_ms']:.1f} | {100 * p['device_ms'] / p['wall_ms']:.0f} % | " \
            if gpu else ""
        shown = "; ".join(f"{t['op'][:48]} {t['self_ms']:.2f} ms" for t in p["top"][:3])
        print(f"| {name} | {p['wall_ms']:.1f} | {busy}{shown} |")

"""Benchmark the CoLab meta step: colabx (:class:`colabx.method.MetaStep`) against the
reference-style and the restructured pure-PyTorch steps of :mod:`colabx.twins.meta`, same run,
same inputs.

Times the meta part (generator gradient only: ``gen_optimizer=None``, so θ and ω never change and
every repetition does the same work) and the plain step (SGD with lr = 0 and momentum: the whole
update runs, θ stays put) of every implementation, with deep supervision on and off; colabx's θ±
variants and exact meta-gradient; on CUDA also bf16 autocast and TF32 off. Peak memory per call
(CUDA: ``max_memory_allocated`` growth; CPU: peak RSS growth). Meta-gradient accuracy: colabx's
generator gradient against the same step in float64. Prints markdown tables (timings, the issue's
ratios, accuracy) and writes JSON.

    python -m benchmarks.bench_meta_step                       # CPU: B=2, 32³, 8 features, 3 pools
    python -m benchmarks.bench_meta_step --device cuda         # B=2, 80³, 30 features, 4 pools
    python -m benchmarks.bench_meta_step --quick --min-time 0  # tiny net: a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from colabx import distance_transform
from colabx._precision import tf32_unless
from colabx.bench.harness import machine_info, time_callable, write_json
from colabx.method.meta_step import MetaConfig, MetaStep
from colabx.models import UNet, task_generator
from colabx.twins.meta import (
    reference_meta_step,
    reference_plain_step,
    restructured_meta_step,
)

NUM_CLASSES, CONTEXTS, LR = 2, 2, 0.01  # c, t, α (nnU-Net's initial learning rate)
DEFAULT_VARIANT = "theta_pm=sequential, meta_grad=fd"
TF32_VARIANT = DEFAULT_VARIANT + ", fd_tf32"  # θ± forwards with TF32 (MetaConfig.fd_tf32)
RECOMPUTE_VARIANT = DEFAULT_VARIANT + ", recompute_generator"
# options of the meta part: the variant name of each implementation that has the option, and the
# label of its ratios (the other rows of a ratio are the default ones)
OPTIONS = {
    "fd_tf32": ({"colabx": TF32_VARIANT, "restructured": "fd_tf32"}, "θ± TF32"),
    "recompute_generator": ({"colabx": RECOMPUTE_VARIANT}, "generator recomputed"),
}


@dataclass(frozen=True)
class Size:
    """Batch, cubic patch edge, first-stage features and pooling steps of both U-Nets."""

    batch: int
    patch: int
    features: int
    pools: int

    def label(self) -> str:
        return f"B={self.batch}, 1×{self.patch}³, {self.features} features, {self.pools} pools"


SIZES = {
    "cuda": Size(2, 80, 30, 4),  # the reference configuration
    "cpu": Size(2, 32, 8, 3),
    "quick": Size(2, 8, 4, 2),
}


# -- inputs and networks ---------------------------------------------------------------------
def make_inputs(size: Size, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``x [B, 1, n, n, n]`` (noise, brighter inside the ROI), ``y [B, n, n, n]`` int64 (one blob
    per item: two overlapping balls at seeded random places) and ``d`` = distance to the ROI."""
    gen = torch.Generator().manual_seed(0)
    n = size.patch
    ax = torch.arange(n, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"))
    y = torch.zeros(size.batch, n, n, n, dtype=torch.long)
    for b in range(size.batch):
        for _ in range(2):
            centre = n / 2 + (torch.rand(3, generator=gen) - 0.5) * (n / 3)
            radius = n / 8 * (1 + 0.5 * float(torch.rand((), generator=gen)))
            r = ((grid - centre.view(3, 1, 1, 1)) ** 2).sum(0).sqrt()
            y[b][r < radius] = 1
    x = torch.randn(size.batch, 1, n, n, n, generator=gen) + 2.0 * y.unsqueeze(1)
    y, x = y.to(device), x.to(device)
    return x, y, distance_transform(y > 0)


def make_nets(size: Size, ds: bool, device: torch.device) -> tuple[UNet, UNet]:
    """Segmentation net ``UNet(1, c+t−1, 3, ...)`` and task generator (``t`` outputs), seeded."""
    torch.manual_seed(0)
    f = UNet(1, NUM_CLASSES + CONTEXTS - 1, 3, base_features=size.features,
             num_pool=size.pools, deep_supervision=ds)
    torch.manual_seed(1)
    g = task_generator(1, CONTEXTS, 3, base_features=size.features, num_pool=size.pools)
    return f.to(device), g.to(device)


def mask_params(size: Size) -> tuple[float, float]:
    """Margin and τ of the soft mask: the defaults (30, 20) at 80³, scaled with the patch so the
    mask varies inside smaller patches too."""
    return 30.0 * size.patch / 80, 20.0 * size.patch / 80


# -- precision and memory ----------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)  # glibc: give freed heap pages back before measuring


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> dict[str, float] | None:
    """Memory one call of ``fn`` adds at its peak, in MiB: ``growth_mb`` (and on CUDA
    ``peak_mb``, everything allocated at the peak). CUDA: ``max_memory_allocated`` after
    ``reset_peak_memory_stats``, minus what was allocated before. CPU: peak RSS (``VmHWM``, reset
    through ``/proc/self/clear_refs``) minus the RSS before, after a ``malloc_trim``; approximate
    (the allocator may reuse pages it still holds). None where neither is available."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mb": peak / 2**20, "growth_mb": (peak - before) / 2**20}
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = _status_kib("VmRSS")
    except (OSError, KeyError):
        return None
    fn()
    return {"growth_mb": (_status_kib("VmHWM") - before) / 1024}


# -- timed rows ----------------------------------------------------------------------------------
@dataclass
class Row:
    """One timed callable: ``part`` "meta" (generator gradient) or "plain" (update of θ)."""

    part: str
    impl: str
    ds: bool
    variant: str
    precision: str  # "default" (torch's TF32 settings), "tf32_off" or "amp"
    fn: Callable[[], object]

    def key(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "fn"}


def _rows_for(f: UNet, g: UNet, ds: bool, cuda: bool, x: Tensor, y: Tensor, d: Tensor,
              margin: float, tau: float) -> list[Row]:
    kw = {"margin": margin, "tau": tau}

    def colabx(**cfg) -> MetaStep:
        # strict-fp32 θ± unless a variant says fd_tf32 (colabx train's default since run 8):
        # the restructured twin's default, and what earlier runs' tables measured
        return MetaStep(f, g, MetaConfig(NUM_CLASSES, **kw, **{"fd_tf32": False, **cfg}))

    def meta(ms: MetaStep) -> Callable[[], object]:
        return lambda: ms.step(x, y, d, LR)

    def sgd() -> torch.optim.Optimizer:
        # lr = 0: the whole update runs (momentum buffer included) and θ never moves
        return torch.optim.SGD(f.parameters(), lr=0.0, momentum=0.99, nesterov=True)

    def plain(ms: MetaStep) -> Callable[[], object]:
        opt = sgd()
        return lambda: ms.plain_step(x, y, d, opt)

    def restructured(**opts) -> Callable[[], object]:
        return lambda: restructured_meta_step(f, g, x, y, d, NUM_CLASSES, LR, **kw, **opts)

    def reference() -> object:
        return reference_meta_step(f, g, x, y, d, NUM_CLASSES, LR, **kw)

    ref_opt = sgd()

    def reference_plain() -> object:
        return reference_plain_step(f, g, x, y, d, NUM_CLASSES, ref_opt, **kw)

    rows = [
        Row("meta", "colabx", ds, DEFAULT_VARIANT, "default", meta(colabx())),
        Row("plain", "colabx", ds, "", "default", plain(colabx())),
        Row("meta", "restructured", ds, "", "default", restructured()),
        Row("meta", "reference", ds, "", "default", reference),
        Row("plain", "reference", ds, "", "default", reference_plain),
    ]
    if not ds:
        return rows
    rows.append(Row("meta", "colabx", ds, "theta_pm=grouped, meta_grad=fd", "default",
                    meta(colabx(theta_pm="grouped"))))
    rows.append(Row("meta", "colabx", ds, "theta_pm=sequential, meta_grad=exact", "default",
                    meta(colabx(meta_grad="exact"))))
    rows.append(Row("meta", "colabx", ds, RECOMPUTE_VARIANT, "default",
                    meta(colabx(recompute_generator=True))))
    if cuda:
        rows += [
            Row("meta", "colabx", ds, DEFAULT_VARIANT, "amp", meta(colabx(amp=True))),
            Row("plain", "colabx", ds, "", "amp", plain(colabx(amp=True))),
            Row("meta", "colabx", ds, DEFAULT_VARIANT, "tf32_off", meta(colabx())),
            Row("plain", "colabx", ds, "", "tf32_off", plain(colabx())),
            Row("meta", "restructured", ds, "", "tf32_off", restructured()),
            Row("meta", "restructured", ds, "", "amp", restructured(amp=True)),
            Row("meta", "colabx", ds, TF32_VARIANT, "default", meta(colabx(fd_tf32=True))),
            Row("meta", "colabx", ds, TF32_VARIANT, "amp", meta(colabx(amp=True, fd_tf32=True))),
            Row("meta", "restructured", ds, "fd_tf32", "default", restructured(fd_tf32=True)),
            Row("meta", "colabx", ds, RECOMPUTE_VARIANT, "amp",
                meta(colabx(amp=True, recompute_generator=True))),
        ]
    return rows


def build_rows(size: Size, device: torch.device, x: Tensor, y: Tensor, d: Tensor) -> list[Row]:
    """Every timed row: per deep-supervision setting the three meta parts and the two plain
    steps; with deep supervision the θ± variants, the exact meta-gradient and the recomputed
    generator; on CUDA bf16 autocast and TF32 off (colabx and the restructured meta part), and
    the meta parts with TF32 θ± forwards (``fd_tf32``)."""
    margin, tau = mask_params(size)
    rows: list[Row] = []
    for ds in (True, False):
        f, g = make_nets(size, ds, device)
        rows += _rows_for(f, g, ds, device.type == "cuda", x, y, d, margin, tau)
    return rows


def time_rows(rows: list[Row], device: torch.device, min_time_s: float,
              warmup: int = 2) -> list[dict]:
    """Median time (after ``warmup`` calls) and peak memory of every row; prints one line per
    row as it goes."""
    out = []
    for row in rows:
        with tf32_unless(row.precision != "tf32_off"):
            try:
                timing = time_callable(row.fn, device, min_time_s=min_time_s, warmup=warmup)
                memory = peak_memory_mb(row.fn, device)
            except Exception as err:  # a row that cannot run here is reported, not fatal
                timing, memory = {"error": f"{type(err).__name__}: {err}"[:300]}, None
        res = {**row.key(), "timing": timing, "memory": memory}
        out.append(res)
        shown = f"{timing['median_ms']:.2f} ms" if "median_ms" in timing else timing["error"]
        print(f"  {row.part:<6} {row.impl:<13} ds={row.ds!s:<6} {row.precision:<9} "
              f"{row.variant:<38} {shown}", flush=True)
    return out


def _find(results: list[dict], part: str, impl: str, ds: bool, precision: str,
          option: str | None = None) -> dict | None:
    """The row of the default variant, or for an ``option`` of :data:`OPTIONS` the meta part
    of the implementations that have that option."""
    variants: tuple[str, ...] = ("", DEFAULT_VARIANT)
    if option is not None and part == "meta" and impl in OPTIONS[option][0]:
        variants = (OPTIONS[option][0][impl],)
    for r in results:
        if (r["part"], r["impl"], r["ds"], r["precision"]) == (part, impl, ds, precision) \
                and r["variant"] in variants and "median_ms" in r["timing"]:
            return r
    return None


RATIOS = (
    # name, GPU target, comparison
    ("colabx meta / colabx plain", 2.5, "<="),
    ("restructured meta / colabx meta", 1.3, ">="),
    ("reference meta / colabx meta", None, ""),
    ("(reference meta + plain) / (colabx meta + plain)", 10.0, ">="),
    ("peak memory colabx meta / restructured meta", 1.0, "<="),
)


def derived_ratios(results: list[dict]) -> list[dict]:
    """The issue's ratios, per (deep supervision, precision) setting where both sides ran, and
    per option of :data:`OPTIONS` that ran (labelled "<precision>, <option label>")."""
    out = []
    settings = [(prec, None) for prec in ("default", "amp", "tf32_off")]
    settings += [(prec, opt) for opt in OPTIONS for prec in ("default", "amp")]
    for ds in (True, False):
        for prec, option in settings:
            def ms(part, impl, ds=ds, prec=prec, option=option):
                r = _find(results, part, impl, ds, prec, option)
                return r["timing"]["median_ms"] if r else None

            def mem(impl, ds=ds, prec=prec, option=option):
                r = _find(results, "meta", impl, ds, prec, option)
                return r["memory"]["growth_mb"] if r and r["memory"] else None

            if option is not None and not _find(results, "meta", "colabx", ds, prec, option):
                continue

            cm, cp, sm = ms("meta", "colabx"), ms("plain", "colabx"), ms("meta", "restructured")
            rm, rp = ms("meta", "reference"), ms("plain", "reference")
            values = {
                RATIOS[0][0]: cm / cp if cm and cp else None,
                RATIOS[1][0]: sm / cm if sm and cm else None,
                RATIOS[2][0]: rm / cm if rm and cm else None,
                RATIOS[3][0]: (rm + rp) / (cm + cp) if rm and rp and cm and cp else None,
                RATIOS[4][0]: mem("colabx") / mem("restructured")
                if mem("colabx") and mem("restructured") else None,
            }
            for name, target, cmp in RATIOS:
                if values[name] is None:
                    continue
                met = None if target is None else (
                    values[name] <= target if cmp == "<=" else values[name] >= target)
                label = prec if option is None else f"{prec}, {OPTIONS[option][1]}"
                out.append({"ratio": name, "ds": ds, "precision": label, "value": values[name],
                            "gpu_target": f"{cmp} {target}" if target else None,
                            "meets_gpu_target": met})
    return out


# -- accuracy --------------------------------------------------------------------------------------
def _generator_grad(ms: MetaStep, x: Tensor, y: Tensor, d: Tensor) -> Tensor:
    ms.step(x, y, d, LR)
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in ms.g.parameters()]).double()


def _compare(g: Tensor, g64: Tensor) -> dict[str, float]:
    return {"rel_error": float((g - g64).norm() / g64.norm()),
            "cosine": float(torch.nn.functional.cosine_similarity(g, g64, dim=0))}


def accuracy(size: Size, device: torch.device, x: Tensor, y: Tensor, d: Tensor) -> list[dict]:
    """Relative error ‖g − g64‖/‖g64‖ and cosine of colabx's generator gradient (deep
    supervision, batched, sequential θ±) against the same step with float64 copies of the nets
    and inputs, for fd and exact meta-gradients; on CUDA for fp32 (TF32 off), torch's default
    TF32 settings and bf16 autocast, and (fd only) the last two with TF32 θ± forwards. Also fd
    against exact, both in float64."""
    margin, tau = mask_params(size)
    f, g = make_nets(size, True, device)
    f64, g64 = copy.deepcopy(f).double(), copy.deepcopy(g).double()
    x64, d64 = x.double(), d.double()
    precisions = (("fp32, TF32 off", True, False, False),  # label, TF32 off, amp, fd_tf32
                  ("torch default TF32", False, False, False),
                  ("amp bf16", True, True, False),
                  ("torch default TF32, θ± TF32", False, False, True),
                  ("amp bf16, θ± TF32", False, True, True)) \
        if device.type == "cuda" else (("fp32", False, False, False),)
    out, exact64 = [], {}
    for mode in ("fd", "exact"):
        ref = _generator_grad(MetaStep(f64, g64, MetaConfig(NUM_CLASSES, margin, tau,
                                                            meta_grad=mode)), x64, y, d64)
        exact64[mode] = ref
        for label, tf32_off, amp, fd_tf32 in precisions:
            if fd_tf32 and mode == "exact":
                continue  # the exact meta-gradient always runs in full fp32
            ms = MetaStep(f, g, MetaConfig(NUM_CLASSES, margin, tau, meta_grad=mode, amp=amp,
                                           fd_tf32=fd_tf32))
            with tf32_unless(not tf32_off):
                got = _generator_grad(ms, x, y, d)
            out.append({"meta_grad": mode, "precision": label, **_compare(got, ref)})
    out.append({"meta_grad": "fd vs exact", "precision": "float64",
                **_compare(exact64["fd"], exact64["exact"])})
    return out


# -- output ----------------------------------------------------------------------------------
def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None or not math.isfinite(v) else format(v, spec)


def _on(ds: bool) -> str:
    return "on" if ds else "off"


def format_tables(results: list[dict], ratios: list[dict], acc: list[dict], cuda: bool) -> str:
    """Markdown: timings and peak memory per row, the derived ratios, the accuracy."""
    lines = ["| part | implementation | variant | DS | precision | median ms | min ms | "
             "peak growth MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        t, m = r["timing"], r["memory"]
        median = _fmt(t["median_ms"], ".2f") if "median_ms" in t else "error"
        lines.append(f"| {r['part']} | {r['impl']} | {r['variant'] or '—'} | {_on(r['ds'])} | "
                     f"{r['precision']} | {median} | {_fmt(t.get('min_ms'), '.2f')} | "
                     f"{_fmt(m and m['growth_mb'], '.1f')} |")
    met_col = cuda  # the targets are GPU targets: judged only on CUDA
    lines += ["", "| ratio | DS | precision | value | GPU target |" + (" met |" if met_col else ""),
              "|---|---|---|---|---|" + ("---|" if met_col else "")]
    for r in ratios:
        met = {True: " yes |", False: " no |", None: " — |"}[r["meets_gpu_target"]]
        lines.append(f"| {r['ratio']} | {_on(r['ds'])} | {r['precision']} | {r['value']:.2f}× | "
                     f"{r['gpu_target'] or '—'} |" + (met if met_col else ""))
    lines += ["", "| meta_grad | precision | rel. error vs float64 | cosine |",
              "|---|---|---|---|"]
    lines += [f"| {a['meta_grad']} | {a['precision']} | {a['rel_error']:.2e} | "
              f"{a['cosine']:.6f} |" for a in acc]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny nets ({SIZES['quick'].label()}), for a smoke run")
    parser.add_argument("--min-time", type=float, default=0.5,
                        help="seconds of timed repetitions per row, at least 5 (default 0.5)")
    parser.add_argument("--out", default="benchmarks/results/meta_{device}.json",
                        help="JSON output path ({device} is substituted)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but torch sees no CUDA device")
    size = SIZES["quick" if args.quick else ("cuda" if device.type == "cuda" else "cpu")]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnU-Net and the reference train
    info = machine_info(device)
    info["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    info["default_cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    info["default_matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    info["loadavg_1_5_15_start"] = os.getloadavg()  # a shared machine: was anything else running?
    print(f"# colabx bench_meta_step on {info.get('gpu', info['cpu'])} ({info['device']}), "
          f"torch {info['torch']}, {info['torch_threads']} CPU threads; {size.label()}, "
          f"c={NUM_CLASSES}, t={CONTEXTS}", flush=True)

    x, y, d = make_inputs(size, device)
    payload = {
        "machine": info,
        "command": "python -m benchmarks.bench_meta_step " + " ".join(argv or []),
        "quick": args.quick,
        "size": asdict(size) | {"classes": NUM_CLASSES, "contexts": CONTEXTS, "lr": LR,
                                "margin_tau": mask_params(size)},
        "memory_method": (
            "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus allocated before"
            if device.type == "cuda" else
            "peak RSS (VmHWM after /proc/self/clear_refs) minus RSS before, after malloc_trim"),
        "complete": False,
    }
    out_path = args.out.format(device=device.type)
    payload["rows"] = time_rows(build_rows(size, device, x, y, d), device, args.min_time,
                                warmup=1 if args.quick else 2)
    payload["ratios"] = derived_ratios(payload["rows"])
    info["loadavg_1_5_15_after_timings"] = os.getloadavg()
    write_json(out_path, payload)  # the timings survive a timeout in the accuracy part
    payload["accuracy"] = accuracy(size, device, x, y, d)
    payload["complete"] = True
    write_json(out_path, payload)
    print("\n" + format_tables(payload["rows"], payload["ratios"], payload["accuracy"],
                               device.type == "cuda"))
    return payload


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])

"""``colabx compare``: train every (mode, seed) on one split with identical options, evaluate all on
the same held-out cases, and tabulate the modes as the paper's Table I.

Layout of the compare folder (marker ``colabx_compare.json``)::

    <mode>-seed<seed>/    one run folder each (resumed when interrupted, skipped when finished)
    compare.md / .csv / .json / .png

Per mode: mean ± sd over seeds of each seed's foreground mean of DSC, sensitivity, precision
and HD95 (as the run's evaluation.json forms it: per class over the cases, then over classes;
with several ROI classes, each class's table follows the foreground one),
without and with post-processing (the largest connected component, :mod:`colabx.inference.
postprocess`); and against vanilla the paired difference: per seed, the mean over the test
cases of (mode − vanilla), then the mean of these over seeds with a 95 % t-interval (n_seeds − 1
degrees of freedom). The seed is the unit of replication: every case of a seed shares that
seed's two trained networks, so the (case, seed) pairs are not independent (a bootstrap over
them covered a true difference of 0 in 46–73 % of simulated 3-seed studies with seed-to-seed
variation, instead of 95 %). With one seed there is no interval.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from colabx._io import (
    atomic_write_text,
    check_output_folder,
    json_safe,
    mark_output_folder,
)
from colabx.data.datasets import Dataset
from colabx.train.config import MODES, TrainConfig
from colabx.train.distributed import Dist
from colabx.train.run_dir import holds_run

__all__ = ["COMPARE_MARKER", "METRIC_NAMES", "paired_seed_interval", "run_compare"]

COMPARE_MARKER = "colabx_compare.json"
METRIC_NAMES = {"dice": "DSC", "sensitivity": "sensitivity", "precision": "precision",
                "hd95": "HD95 (mm)"}
POSTPROCESSING = ("none", "lcc")


def paired_seed_interval(per_seed: Sequence[float]) -> tuple[float, float, float]:
    """Mean of the per-seed paired differences ``per_seed`` and its 95 % t-interval over seeds
    (``n − 1`` degrees of freedom; NaN entries dropped). The mean is NaN when nothing is left,
    the interval NaN with fewer than two seeds."""
    from scipy import stats

    d = np.asarray([v for v in per_seed if math.isfinite(v)], dtype=np.float64)
    if d.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(d.mean())
    if d.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    return mean, mean - half, mean + half


def _finite_mean(values: Sequence[float]) -> float:
    """Mean of the finite ``values``; NaN when there is none."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _case_values(result: dict[str, Any], cls: int | None = None) -> dict[str, dict[str, float]]:
    """case id → metric → mean over the ROI classes (NaN skipped) of one evaluation result; with
    ``cls`` (a label value) that class's value alone (NaN where undefined)."""
    def pick(metrics: dict) -> dict[str, float]:
        chosen = [v for k, v in metrics.items() if cls is None or int(k) == cls]
        return {m: _finite_mean([math.nan if v[m] is None else v[m] for v in chosen])
                for m in METRIC_NAMES}

    return {cid: pick(case["metrics"]) for cid, case in result["cases"].items()}


def _foreground(result: dict[str, Any], cls: int | None = None) -> dict[str, float]:
    """metric → the result's foreground mean (per class over cases, then over classes: the
    number evaluation.json and ``colabx evaluate`` report), or with ``cls`` that class's mean
    over the cases; NaN where undefined."""
    if cls is None:
        fg = result["foreground_mean"]
    else:
        fg = next((v for k, v in result["mean"].items() if int(k) == cls), {})
    return {m: math.nan if fg.get(m) is None else float(fg[m]) for m in METRIC_NAMES}


def _results(run: Path, ds: Dataset) -> dict[str, dict[str, Any]]:
    """One finished run's evaluations of dataset ``ds`` by post-processing: its final
    evaluation, and its test predictions again after the largest-connected-component
    post-processing."""
    from colabx.inference.metrics import evaluate_folders

    results = {"none": json.loads((run / "evaluation.json").read_text())}
    preds = run / "predictions_test"
    if preds.is_dir():
        results["lcc"] = evaluate_folders(preds, ds.root / "labelsTs", ds.labels,
                                          ds.file_ending, postprocess="lcc")
    return results


def _roi_classes(ds: Dataset) -> dict[str, int]:
    """ROI class name → label value, when the dataset has several (else none: the foreground
    table is that class's)."""
    roi = {k: v for k, v in ds.labels.items() if v != 0 and v != ds.ignore_label}
    return dict(sorted(roi.items(), key=lambda kv: kv[1])) if len(roi) > 1 else {}


def _table(results: dict[tuple[str, int], dict], modes: Sequence[str], seeds: Sequence[int],
           cls: int | None = None) -> tuple[dict[str, Any], dict[tuple[str, int], dict],
                                            dict[tuple[str, int], dict]]:
    """The summary table of the foreground (or of class ``cls``), the per-case values it pairs
    and the per-run means it summarises."""
    values = {key: {post: _case_values(r, cls) for post, r in res.items()}
              for key, res in results.items()}
    fg = {key: {post: _foreground(r, cls) for post, r in res.items()}
          for key, res in results.items()}
    return _summaries(values, fg, modes, seeds), values, fg


def _summaries(values: dict[tuple[str, int], dict], foreground: dict[tuple[str, int], dict],
               modes: Sequence[str], seeds: Sequence[int]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for post in POSTPROCESSING:
        rows = {}
        for mode in modes:
            if post not in values[(mode, seeds[0])]:
                continue
            row: dict[str, Any] = {}
            for m in METRIC_NAMES:
                per_seed = [foreground[(mode, s)][post][m] for s in seeds]
                finite = [v for v in per_seed if math.isfinite(v)]
                row[m] = {"mean": float(np.mean(finite)) if finite else math.nan,
                          "sd": float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan,
                          "per_seed": [float(v) for v in per_seed]}
                if mode != "vanilla" and "vanilla" in modes:
                    diffs = [[values[(mode, s)][post][cid][m] - values[("vanilla", s)][post][cid][m]
                              for cid in values[(mode, s)][post]] for s in seeds]
                    per_seed_diff = [_finite_mean(d) for d in diffs]
                    mean, lo, hi = paired_seed_interval(per_seed_diff)
                    row[m]["vs_vanilla"] = {
                        "mean": mean, "ci95": [lo, hi], "per_seed": per_seed_diff,
                        "seeds": sum(math.isfinite(v) for v in per_seed_diff),
                        "pairs": sum(math.isfinite(v) for d in diffs for v in d)}
            rows[mode] = row
        if rows:
            table[post] = rows
    return table


def _fmt(v: float, spec: str) -> str:
    """``v`` formatted, or n/a when undefined (one seed: no sd and no interval)."""
    return format(v, spec) if math.isfinite(v) else "n/a"


def _markdown(table: dict[str, Any], seeds: Sequence[int], scope: str = "") -> str:
    lines = []
    for post, rows in table.items():
        lines += [f"### {scope}post-processing: {post} (mean ± sd over seeds {list(seeds)}; Δ vs "
                  "vanilla: per seed the mean paired difference over the test cases, then its "
                  "mean over seeds with a 95 % t-interval)", "",
                  "| mode | " + " | ".join(METRIC_NAMES.values()) + " |",
                  "|---|" + "---|" * len(METRIC_NAMES)]
        for mode, row in rows.items():
            cells = []
            for m in METRIC_NAMES:
                r = row[m]
                cell = f"{_fmt(r['mean'], '.3f')} ± {_fmt(r['sd'], '.3f')}"
                if "vs_vanilla" in r:
                    v = r["vs_vanilla"]
                    lo, hi = v["ci95"]
                    cell += (f"<br>Δ {_fmt(v['mean'], '+.3f')} [{_fmt(lo, '+.3f')}, "
                             f"{_fmt(hi, '+.3f')}]")
                cells.append(cell)
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _csv(table: dict[str, Any], per_class: dict[str, dict[str, Any]]) -> str:
    """One row per (scope, post-processing, mode, metric); ``class`` is ``foreground`` or an
    ROI class's name."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["postprocess", "mode", "metric", "mean", "sd", "delta_vs_vanilla", "ci_low",
                "ci_high", "seeds", "pairs", "class"])
    for scope, scoped in (("foreground", table), *per_class.items()):
        for post, rows in scoped.items():
            for mode, row in rows.items():
                for m in METRIC_NAMES:
                    r = row[m]
                    v = r.get("vs_vanilla", {"mean": "", "ci95": ["", ""], "seeds": "",
                                             "pairs": ""})
                    w.writerow([post, mode, m, r["mean"], r["sd"], v["mean"], *v["ci95"],
                                v["seeds"], v["pairs"], scope])
    return buf.getvalue()


def _figure(values: dict[tuple[str, int], dict], modes: Sequence[str], seeds: Sequence[int],
            path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from colabx.viz.figures import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(5 + 1.2 * len(modes), 4.2))
    rng = np.random.default_rng(0)
    for ax, m in zip(axes, ("dice", "precision"), strict=True):
        data = [[c[m] for s in seeds for c in values[(mode, s)]["none"].values()
                 if math.isfinite(c[m])] for mode in modes]
        ax.boxplot(data, showfliers=False)
        for i, d in enumerate(data):
            ax.scatter(i + 1 + rng.uniform(-0.15, 0.15, len(d)), d, s=10, alpha=0.6)
        ax.set_xticks(range(1, len(modes) + 1), modes)
        ax.set_ylim(0, 1)
        ax.set_title(f"per-case {METRIC_NAMES[m]} (cases × seeds)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def run_compare(base: TrainConfig, modes: Sequence[str], seeds: Sequence[int],
                out_dir: str | Path, *, dist: Dist | None = None, overwrite: bool = False,
                echo: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Train and evaluate every (mode, seed) of ``base`` into ``out_dir`` and write the tables.

    Finished runs are skipped and interrupted ones resumed, so a stopped compare continues where
    it stopped when called again; a finished run trained with other options (how and where it
    ran aside) is refused before anything trains. Under ``torchrun`` the runs go one after
    another, each on all processes. Returns the table (rank 0; None elsewhere).

    Raises:
        OutputFolderError: ``out_dir`` holds files that are not a compare.
        ValueError: unknown modes, repeated modes or seeds, manual mode without context maps,
            or a finished run of other options.
    """
    from colabx.train.trainer import Trainer

    dist = dist or Dist()
    out = Path(out_dir)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes or len(set(modes)) != len(modes):
        raise ValueError(f"modes: expected distinct modes of {', '.join(MODES)}, got "
                         f"{list(modes)}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: expected distinct seeds, got {list(seeds)}")
    configs = {(m, s): base.replace(mode=m, seed=s) for m in modes for s in seeds}
    if "manual" in modes:
        _check_manual(base)
    if dist.is_main:
        check_output_folder(out, COMPARE_MARKER, "compare folder", overwrite=overwrite)
        mark_output_folder(out, COMPARE_MARKER, {"modes": list(modes), "seeds": list(seeds),
                                                 "options": base.to_dict()})
    dist.barrier()
    runs = {(m, s): f"{m}-seed{s}" for m, s in configs}  # run folder names
    finished = {key: out / name for key, name in runs.items() if _finished(out / name)}
    for key, run in finished.items():
        _check_finished_options(run, configs[key])
    for (mode, seed), cfg in configs.items():
        run = out / runs[(mode, seed)]
        if (mode, seed) in finished:
            echo(f"compare: {run.name} finished earlier, skipped")
            continue
        resume = holds_run(run)
        echo(f"compare: {run.name} {'resumed' if resume else 'started'}")
        Trainer(cfg, run, dist=dist, resume=resume, echo=echo).run()
    if not dist.is_main:
        return None
    from colabx.checkpoint import load_checkpoint
    from colabx.data import load_dataset

    # every run trained on the same dataset: read it once
    first = out / runs[(modes[0], seeds[0])] / "checkpoint_final.pth"
    ds = load_dataset(load_checkpoint(first)["dataset"]["root"])
    results = {key: _results(out / name, ds) for key, name in runs.items()}
    table, values, foreground = _table(results, modes, seeds)
    # several ROI classes: each one's table too (the foreground mean can hide a class)
    per_class = {name: _table(results, modes, seeds, v)[0]
                 for name, v in _roi_classes(ds).items()}
    payload = {"modes": list(modes), "seeds": list(seeds), "options": base.to_dict(),
               "table": table, "per_class": per_class,
               "cases": {runs[key]: v for key, v in values.items()},
               "foreground": {runs[key]: fg for key, fg in foreground.items()}}
    atomic_write_text(out / "compare.json", json.dumps(json_safe(payload), indent=1) + "\n")
    atomic_write_text(out / "compare.csv", _csv(table, per_class))
    text = "\n".join([_markdown(table, seeds),
                      *(_markdown(t, seeds, f"class {name}, ") for name, t in per_class.items())])
    atomic_write_text(out / "compare.md", text + "\n")
    _figure(values, modes, seeds, out / "compare.png")
    echo(text)
    return table


def _finished(run: Path) -> bool:
    return (run / "checkpoint_final.pth").is_file() and (run / "evaluation.json").is_file()


#: Options a finished run may differ in and still be tabulated: how and where it ran (and, as on
#: resume, how the same meta-gradient was computed).
_RUN_ONLY = frozenset({"num_workers", "device", "threads", "progress", "compile_mode",
                       "val_every", "val_cases", "snapshot_every", "save_every", "preprocessed",
                       "theta_pm", "fd_tf32", "recompute_generator", "cuda_graphs"})


def _check_finished_options(run: Path, cfg: TrainConfig) -> None:
    """A finished run is reused only when it was trained as ``cfg`` asks (how and where it ran
    aside): a table mixing, say, base features or epochs would compare different things."""
    from colabx.checkpoint import load_checkpoint
    from colabx.train.config import resume_differences, saved_options

    state = load_checkpoint(run / "checkpoint_final.pth")
    saved = TrainConfig(**saved_options(state["config"])).to_dict()
    fixed, changed = resume_differences(saved, cfg.to_dict())  # dataset paths compared absolute
    differ = {**fixed, **{k: v for k, v in changed.items() if k not in _RUN_ONLY}}
    if differ:
        listed = "; ".join(f"{k}: run {a!r}, asked {b!r}" for k, (a, b) in differ.items())
        raise ValueError(f"{run}: this finished run was trained with other options ({listed}); "
                         "a compare tabulates runs of the same options: give the same options, "
                         "or use another --out")


def _check_manual(cfg: TrainConfig) -> None:
    from colabx.data import load_dataset

    if cfg.dataset is None:
        return  # the built-in phantom has organ maps
    ds = load_dataset(cfg.dataset)
    if any(c.context is None for c in ds.cases):
        raise ValueError(f"modes: manual needs manual context maps (contextTr/) in {ds.root}")

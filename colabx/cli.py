"""``colabx`` command line: train, predict, evaluate, preprocess, make-phantom, bench.

``colabx train`` with no arguments trains CoLab on the built-in phantom (the ``phantom-cpu``
preset) and prints the held-out metrics. Every training option is a :class:`TrainConfig` field;
its flag is the field name with dashes, a YAML file given by ``--config`` may set any of them, and
flags given on the command line override the file. Multi-GPU: ``torchrun --nproc-per-node N -m
colabx train ...``. Errors in options, data or files print one message naming the problem and
exit with status 2 (``COLABX_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import MISSING, fields, replace
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _add_train_options(p: argparse.ArgumentParser, exclude: frozenset[str] | set[str] =
                       frozenset({"dataset"})) -> None:
    from colabx.train.config import TrainConfig

    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(TrainConfig):
        if f.name in exclude:
            continue
        meta = f.metadata
        g = groups.setdefault(meta["group"], p.add_argument_group(f"{meta['group']} options"))
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()
        # a None default is described by the help text itself
        text = meta["help"] if default is None else f"{meta['help']} (default: {default})"
        text = text.replace("%", "%%")  # argparse formats it
        kind = str(f.type).replace(" | None", "")
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": text}
        if kind == "bool":
            g.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif kind.startswith("list["):
            g.add_argument(flag, nargs="+", type=int if kind == "list[int]" else float,
                           metavar="N", **kw)
        else:
            conv = {"int": int, "float": float, "str": str}[kind]
            g.add_argument(flag, type=conv, choices=meta["choices"], **kw)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="colabx", description="Context Label Learning (CoLab) "
                                 "for medical image segmentation.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from colabx.inference.postprocess import POSTPROCESSING
    from colabx.train.config import TRAIN_PRESETS

    preset = ", ".join(f"{k}={v}" for k, v in TRAIN_PRESETS["phantom-cpu"].items())
    tr = sub.add_parser("train", help="train a model (default: CoLab on the built-in phantom)",
                        description="Train CoLab or a baseline. Without DATASET: the built-in "
                        "phantom with the phantom-cpu preset, which finishes in minutes on a "
                        f"CPU and replaces these defaults: {preset}.")
    tr.add_argument("dataset", nargs="?", default=None,
                    help="dataset folder, nnU-Net v2 raw or MSD layout (default: built-in "
                    "phantom)")
    tr.add_argument("--config", type=Path, help="YAML file of options (safe loader; unknown "
                    "keys are errors); command-line flags override it")
    tr.add_argument("--out", type=Path, help="run directory (default: "
                    "colabx_runs/<dataset>-<mode>-<time>)")
    from colabx.train.config import CHANGEABLE_ON_RESUME

    changeable = ", ".join("--" + k.replace("_", "-") for k in CHANGEABLE_ON_RESUME)
    tr.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its latest checkpoint; options given "
                    f"with it must match the run's, except {changeable}, which are applied and "
                    "logged")
    tr.add_argument("--overwrite", action="store_true",
                    help="start a new run in a --out folder that holds other files or an "
                    "earlier run (whose files are removed first)")
    _add_train_options(tr)

    pr = sub.add_parser(
        "predict", help="segment images with a trained run",
        description="Segment every case of INPUT with a trained run. Cases are "
        "{case}_{XXXX}.nii.gz files (one per channel, nnU-Net naming) or single {case}.nii.gz "
        "files (MSD naming: 3D, or 4D holding the channels on the last axis); .nii, .nrrd and "
        ".mha (with SimpleITK: pip install 'colabx[sitk]') too, one ending per folder. "
        "OUTPUT gets {case}.<ending> label maps in each image's grid and header, "
        "optionally probabilities ({case}.npz) and context maps (contexts/{case}.<ending>).")
    pr.add_argument("run", type=Path, help="run directory or checkpoint file (.pth)")
    pr.add_argument("input", type=Path, help="folder of images: {case}_{XXXX}.nii.gz or "
                    "{case}.nii.gz")
    pr.add_argument("output", type=Path, help="folder for the {case}.nii.gz label maps")
    pr.add_argument("--checkpoint", default="final", choices=("final", "best", "latest"),
                    help="which checkpoint of a run directory (default: final)")
    pr.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    pr.add_argument("--overlap", type=float, default=0.5,
                    help="sliding-window overlap in [0, 0.9] (default: 0.5)")
    pr.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=None,
                    help="mirror test-time augmentation over every spatial axis (nnU-Net's; "
                    "2^D network passes per window). Default: on with CUDA, off on the CPU, "
                    "where it multiplies the time by 8 in 3D; --no-mirror turns it off on GPUs")
    pr.add_argument("--save-probabilities", action="store_true",
                    help="also write {case}.npz: 'probabilities' float32 [K, *S] (softmax of "
                    "the context and ROI channels, in the image's voxel grid and axis order), "
                    "'channels' (their names), 'spacing' and 'affine'")
    pr.add_argument("--save-contexts", action="store_true",
                    help="also write contexts/{case}.<ending>: the network's context map (argmax "
                    "over the t context channels, values 0..t-1) in the image's grid")
    pr.add_argument("--overwrite", action="store_true",
                    help="write into an OUTPUT folder that holds other files, or replace "
                    "another prediction's outputs there")
    pr.add_argument("--continue", dest="continue_prediction", action="store_true",
                    help="in OUTPUT, the folder of the same prediction that was killed (kill -9, "
                    "out of memory, a lost machine), predict only the cases whose outputs are "
                    "not all there (files are written atomically: those there are complete; "
                    "a failure colabx sees, Ctrl-C included, removes what it wrote instead)")
    pr.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                    help="progress bar (default on)")
    pr.add_argument("--postprocess", default="none", choices=POSTPROCESSING,
                    help="lcc: keep the largest connected component of the ROI classes' union "
                    "(the paper's post-processing); lcc_per_class: per class (nnU-Net's); "
                    "default none. Applied to the label maps, not to probabilities or contexts")

    ev = sub.add_parser(
        "evaluate", help="DSC, sensitivity, precision, HD95 of predictions",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Per case and ROI class: DSC, sensitivity, precision and HD95 (mm), and their "
        "means over cases.\n\nEmpty masks (P = prediction, R = reference):\n"
        "  P empty, R empty:     DSC 1, sensitivity and precision undefined, HD95 0\n"
        "  P empty, R non-empty: DSC 0, sensitivity 0, precision undefined, HD95 = image "
        "diagonal\n"
        "  P non-empty, R empty: DSC 0, precision 0, sensitivity undefined, HD95 = image "
        "diagonal\n"
        "Undefined values are left out of the means, and the number of cases left out is "
        "printed\nbeside them (MONAI's not-nans). The image diagonal, sqrt(sum((n * "
        "spacing)^2)) in mm, is the\nlargest distance in the image (as BraTS scores a missed "
        "tumour); MONAI returns NaN there.")
    ev.add_argument("predictions", type=Path, help="folder of predicted {case}.nii.gz (or "
                    ".nii, .nrrd, .mha: the reference folder's ending)")
    ev.add_argument("reference", type=Path, help="folder of reference {case}.nii.gz")
    ev.add_argument("--labels", type=Path, required=True,
                    help="dataset.json whose labels name the classes")
    ev.add_argument("--out", type=Path, help="summary JSON (default: PREDICTIONS/summary.json); "
                    "the per-case CSV goes beside it, with the suffix .csv")
    ev.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                    help="progress bar (default on)")
    ev.add_argument("--postprocess", default="none", choices=POSTPROCESSING,
                    help="post-process each prediction before scoring (as predict "
                    "--postprocess; the files are unchanged); default none")

    pp = sub.add_parser("preprocess", help="crop, resample, normalise, distance maps (cached)",
                        description="Preprocess a dataset's training cases as nnU-Net v2 does "
                        "(crop to nonzero, normalisation by channel name, resampling to the "
                        "target spacing) and add the ROI distance maps, into a folder that "
                        "`colabx train --preprocessed` reads; an unchanged dataset is not "
                        "redone.")
    pp.add_argument("dataset", type=Path, help="dataset folder (nnU-Net v2 raw or MSD)")
    pp.add_argument("--out", type=Path, help="output folder (default: the trainer's cache, "
                    "where colabx train finds it; a folder given here is used by colabx train "
                    "--preprocessed FOLDER)")
    pp.add_argument("--target-spacing", type=float, nargs="+",
                    help="mm per array axis (default: nnU-Net's rule: the median spacing, or "
                    "the 10th percentile along a thick, sparsely sampled axis)")
    pp.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")

    cp = sub.add_parser(
        "compare", help="train and evaluate several modes x seeds on one split and tabulate "
        "them (the paper's Table I)",
        description="Train every (mode, seed) with identical options on the same split, each "
        "in its own run folder under --out, evaluate all on the same held-out cases, and write "
        "compare.md/.csv/.json/.png: per mode mean ± sd over seeds of DSC, sensitivity, "
        "precision and HD95, without and with post-processing (largest connected component), "
        "and the difference to vanilla: per seed the mean paired difference over the cases, "
        "then its mean over seeds with a 95% t-interval (n/a with one seed). "
        "Restartable: finished runs are skipped, interrupted ones resumed. Without DATASET: "
        f"the built-in phantom, with the phantom-cpu preset replacing these defaults: {preset}.")
    cp.add_argument("dataset", nargs="?", default=None,
                    help="dataset folder (default: the built-in phantom)")
    cp.add_argument("--modes", nargs="+", default=["vanilla", "manual", "dilation", "kmeans",
                                                   "colab"], metavar="MODE",
                    help="modes to compare (default: all five)")
    cp.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="SEED",
                    help="training seeds (default: 0 1 2)")
    cp.add_argument("--config", type=Path, help="YAML file of training options")
    cp.add_argument("--out", type=Path, help="compare folder (default: "
                    "colabx_runs/compare-<dataset>)")
    cp.add_argument("--overwrite", action="store_true",
                    help="write into an --out folder that holds other files")
    _add_train_options(cp, exclude={"dataset", "mode", "seed"})

    fg = sub.add_parser("figures", help="the paper's analysis figures (Fig. 3, 8, 11) and the "
                        "context-coherence numbers of trained runs")
    fg.add_argument("runs", type=Path, nargs="+", help="run directories (one panel each; e.g. "
                    "a vanilla and a CoLab run)")
    fg.add_argument("--cases", nargs="+", help="held-out case ids (default: all labelled test "
                    "cases, else the validation cases)")
    fg.add_argument("--out", type=Path, help="output folder (default: FIRST_RUN/figures)")
    fg.add_argument("--checkpoint", default="final", choices=("final", "best", "latest"),
                    help="which checkpoint of each run (default: final)")
    fg.add_argument("--max-cases", type=int, default=3,
                    help="cases shown in Fig. 8 per run (default: 3)")

    sub.add_parser("bench", add_help=False,
                   help="time the fused ops against their pure-PyTorch twins (colabx bench -h); "
                   "colabx bench meta: CoLab's cost per iteration over vanilla training "
                   "(colabx bench meta -h)")

    ph = sub.add_parser("make-phantom", help="write the built-in phantom in the nnU-Net layout")
    ph.add_argument("out", type=Path, help="output folder (must be empty or absent)")
    ph.add_argument("--cases", type=int, help="training cases (default: the preset's)")
    ph.add_argument("--test-cases", type=int, help="test cases (default: the preset's)")
    from colabx.data.phantom import PHANTOM_PRESETS

    ph.add_argument("--preset", default="default", choices=tuple(PHANTOM_PRESETS),
                    help="phantom preset (default: default)")
    ph.add_argument("--seed", type=int, default=0, help="generator seed")
    ph.add_argument("--overwrite", action="store_true", help="replace a non-empty folder")
    return ap


def _training_options(args: argparse.Namespace, own: set[str], dataset: str | None
                      ) -> tuple[dict[str, Any], set[str]]:
    """The training options of ``train``/``compare``: those of the ``--config`` file overridden
    by those on the command line (not the command's ``own`` flags), and the names of the
    latter (a --config file may hold every option, a run's config.yaml does)."""
    from colabx.train.config import read_yaml

    given = {k: v for k, v in vars(args).items()
             if k not in {"command", "config", "out", "overwrite", "dataset", *own}}
    if dataset is not None:
        given["dataset"] = dataset
    flags = set(given)
    return {**(read_yaml(args.config) if args.config is not None else {}), **given}, flags


def _warn_unused(command: str, configs: list, flags: set[str]) -> None:
    """A warning line for each option given on the command line that the run(s) would not
    use."""
    from colabx.train.config import unused_options

    if os.environ.get("RANK", "0") != "0":  # torchrun: once, from the first process
        return
    for message in unused_options(configs, sorted(flags)):
        print(f"colabx {command}: warning: {message}", file=sys.stderr)


def _train(args: argparse.Namespace) -> int:
    from colabx.checkpoint import load_checkpoint
    from colabx.train.config import from_mapping, saved_options
    from colabx.train.distributed import init_from_env
    from colabx.train.trainer import Trainer, default_config

    given, flags = _training_options(args, {"resume"},
                                     None if args.dataset is None else str(args.dataset))
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: "
                         "pass one of them")
    if args.resume:
        if args.out is None:
            raise ValueError("--resume needs --out RUN_DIR, the run folder to continue")
        latest = args.out / "checkpoint_latest.pth"
        if not latest.is_file():
            raise ValueError(f"{args.out}: nothing to resume (no checkpoint_latest.pth; a run "
                             "writes it after its first epoch, then every --save-every epochs); "
                             "start the run without --resume")
        try:
            state = load_checkpoint(latest)
        except ValueError as e:
            raise ValueError(f"{e}; the run cannot be resumed: --overwrite starts it anew "
                             "(its checkpoint_best.pth or checkpoint_final.pth, if readable, "
                             "can still be predicted from)") from e
        # the run's own options, then what was given: the trainer refuses what may not change
        saved = saved_options(state["config"])
        cfg = from_mapping({**saved, **given})
    else:
        cfg = from_mapping({**default_config(given.get("dataset")).to_dict(), **given})
    _warn_unused(args.command, [cfg], flags)
    out = args.out or Path("colabx_runs") / (
        f"{Path(cfg.dataset).name if cfg.dataset else 'phantom'}-{cfg.mode}-"
        f"{time.strftime('%Y%m%d-%H%M%S')}")
    if args.config is not None and (out / "config.yaml").resolve() == args.config.resolve():
        raise ValueError(f"--config: {args.config} is the config.yaml that colabx train writes "
                         "into --out; pass a copy kept outside the run folder")
    dist = init_from_env(cfg.device)
    trainer = Trainer(cfg, out, dist=dist, resume=args.resume, overwrite=args.overwrite)
    if dist.is_main:
        print(f"run directory: {out}")
    result = trainer.run()
    return 0 if result is not None or not dist.is_main else 1


def _compare(args: argparse.Namespace) -> int:
    from colabx.train.compare import run_compare
    from colabx.train.config import MODES, from_mapping
    from colabx.train.distributed import init_from_env
    from colabx.train.trainer import default_config

    given, flags = _training_options(args, {"modes", "seeds"}, None if args.dataset is None
                                     else str(Path(args.dataset).absolute()))
    for key in ("mode", "seed"):
        if key in given:
            raise ValueError(f"{key}: set by compare for each run (--modes, --seeds), not by "
                             "the configuration")
    # the base configuration takes the first compared mode (each run sets its own), so that
    # options valid for the compared modes but not for the default mode are accepted
    first = next((m for m in args.modes if m in MODES), None)
    cfg = from_mapping({**default_config(given.get("dataset")).to_dict(), **given,
                        **({"mode": first} if first else {})})
    _warn_unused(args.command, [replace(cfg, mode=m) for m in dict.fromkeys(args.modes)
                                if m in MODES], flags)
    out = args.out or Path("colabx_runs") / (
        f"compare-{Path(cfg.dataset).name if cfg.dataset else 'phantom'}")
    dist = init_from_env(cfg.device)
    run_compare(cfg, args.modes, args.seeds, out, dist=dist, overwrite=args.overwrite)
    if dist.is_main:
        print(f"written: {out / 'compare.md'} (.csv, .json, .png)")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from colabx.inference.run import predict_folder

    predict_folder(args.run, args.input, args.output, checkpoint=args.checkpoint,
                   device=args.device, overlap=args.overlap, mirror=args.mirror,
                   overwrite=args.overwrite, postprocess=args.postprocess,
                   save_probabilities=args.save_probabilities, save_contexts=args.save_contexts,
                   progress=args.progress, continue_prediction=args.continue_prediction)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from colabx.inference.metrics import check_summary_path, evaluate_folders, write_summary
    from colabx.train.evaluation import format_metrics

    out = check_summary_path(args.out or args.predictions / "summary.json")
    result = evaluate_folders(args.predictions, args.reference, args.labels,
                              progress=args.progress, postprocess=args.postprocess)
    written = write_summary(result, out)
    print(format_metrics(result))
    print(f"written: {', '.join(str(p) for p in written)}")
    return 0


def _figures(args: argparse.Namespace) -> int:
    from colabx.viz.run_figures import FIGURES, write_figures

    out = args.out or args.runs[0] / "figures"
    report = write_figures(args.runs, out, cases=args.cases, checkpoint=args.checkpoint,
                           max_cases=args.max_cases)
    for run, entry in report["runs"].items():
        mean = entry.get("neighbour_ratio_mean")
        if mean is not None:
            axes = " / ".join(f"{v:.2f}" for v in mean)
            print(f"{run}: generator context coherence, neighbour ratio per axis {axes} "
                  "(about 0.5 smooth, > 1 alternating voxels)")
    print(f"written: {', '.join(str(out / f) for f in (*FIGURES, 'figures.json'))}")
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    from colabx.data import load_dataset
    from colabx.data.preprocessing import preprocess_dataset
    from colabx.train.trainer import cache_dir, preprocessed_key

    ds = load_dataset(args.dataset)
    out = args.out or cache_dir() / "preprocessed" / preprocessed_key(ds)
    pre = preprocess_dataset(ds, out, target_spacing=args.target_spacing,
                             num_workers=args.workers)
    state = "up to date (cached)" if pre.from_cache else "written"
    spacing = [round(s, 6) for s in pre.target_spacing]
    print(f"{len(pre)} cases {state}: {out} (target spacing {spacing} mm)")
    if args.out is not None:  # its settings too: other ones would preprocess the folder anew
        spacing_flag = "" if args.target_spacing is None else \
            " --target-spacing " + " ".join(str(v) for v in args.target_spacing)
        print(f"train on them with: colabx train {shlex.quote(str(args.dataset))} "
              f"--preprocessed {shlex.quote(str(out))}{spacing_flag}")
    return 0


def _make_phantom(args: argparse.Namespace) -> int:
    from colabx.data.phantom import write_phantom

    if args.out.is_dir() and any(args.out.iterdir()) and not args.overwrite:
        raise ValueError(f"{args.out}: folder is not empty; choose a new folder or pass "
                         "--overwrite to replace it")

    out = write_phantom(args.out, num_cases=args.cases, num_test=args.test_cases,
                        seed=args.seed, preset=args.preset, overwrite=args.overwrite,
                        progress=True)
    print(f"phantom written: {out}")
    return 0


_COMMANDS = {"train": _train, "compare": _compare, "predict": _predict, "evaluate": _evaluate,
             "figures": _figures, "preprocess": _preprocess, "make-phantom": _make_phantom}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``colabx`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    name = " ".join(["colabx", *argv[:1]]) if argv and not argv[0].startswith("-") else "colabx"
    try:
        return _main(argv, name)
    except KeyboardInterrupt:  # every file is written atomically: nothing is half-written
        if os.environ.get("COLABX_DEBUG"):
            raise
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str], name: str) -> int:
    if argv[:2] == ["bench", "meta"]:  # its own parser: colabx.bench.meta
        from colabx.bench.meta import main as bench_meta

        bench_meta(argv[2:])
        return 0
    if argv[:1] == ["bench"]:  # its own parser: colabx.bench.ops
        from colabx.bench.ops import main as bench

        bench(argv[1:])
        return 0
    args = _parser().parse_args(argv)  # imports torch: Ctrl-C here is caught by main too
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, OSError) as e:  # bad options, data or files: a message, not a traceback
        if os.environ.get("COLABX_DEBUG"):
            raise
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The trainer's configuration: one dataclass, its validation, YAML in and out, presets.

Every option is a field of :class:`TrainConfig` with its help text and allowed range in the field
metadata; the CLI builds its flags from the same fields, so ``colabx train --help`` documents every
option and a YAML file (``--config``) can set any of them. Unknown keys and out-of-range values are
errors that name the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from colabx.data.phantom import PHANTOM_PRESETS
from colabx.method.meta_step import DIFFERENCES, META_GRADS, META_MODES, ORDERS, THETA_PM

__all__ = ["CHANGEABLE_ON_RESUME", "CUDA_GRAPH_COMPILE_MODES", "MODES", "PRESETS",
           "TRAIN_PRESETS", "ConfigError", "TrainConfig", "from_mapping", "load_config",
           "read_yaml", "resolved_meta_amp", "resolved_meta_difference", "resolved_meta_order",
           "resume_differences", "save_config", "saved_options", "unused_options"]

MODES = ("vanilla", "manual", "colab", "kmeans", "dilation")
AMP_CHOICES = ("auto", "none", "bf16", "fp16")


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid; the message names the key."""


def _opt(default: Any, help: str, *, choices: tuple | None = None,
         lo: float | None = None, hi: float | None = None, lo_open: bool = False,
         group: str = "training") -> Any:
    meta = {"help": help, "choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open,
            "group": group}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """All options of ``colabx train`` (see each field's help in ``colabx train --help``)."""

    # -- data -----------------------------------------------------------------------------------
    dataset: str | None = _opt(
        None, "dataset folder (nnU-Net v2 raw or MSD layout); default: the built-in phantom",
        group="data")
    phantom_preset: str = _opt("default", "built-in phantom preset used when no dataset is given",
                               choices=tuple(PHANTOM_PRESETS), group="data")
    preprocessed: str | None = _opt(
        None, "folder for the preprocessed dataset (default: a cache folder keyed by the dataset "
        "path; reused while the dataset and settings are unchanged)", group="data")
    target_spacing: list[float] | None = _opt(
        None, "resample to this spacing in mm (array axis order); default: nnU-Net's rule, the "
        "median spacing or the 10th percentile along a thick, sparsely sampled axis",
        group="data")
    val_fraction: float = _opt(0.2, "fraction of training cases held out for validation",
                               lo=0.0, hi=0.9, group="data")
    num_workers: int = _opt(-1, "data-loader worker processes (-1: min(4, CPU cores - 1))",
                            lo=-1, group="data")
    roi_fraction: float = _opt(0.5, "fraction of patches centred on an ROI voxel", lo=0.0, hi=1.0,
                               group="data")
    augment: bool = _opt(True, "spatial and intensity augmentation of training patches",
                         group="data")
    # -- method ---------------------------------------------------------------------------------
    mode: str = _opt("colab", "context labels: vanilla (none), manual (contextTr maps), colab "
                     "(meta-learned), kmeans (intensity clusters in the body), dilation "
                     "([1-M, M])", choices=MODES, group="method")
    t: int = _opt(2, "number of context classes t (colab, kmeans; dilation uses 2, manual 1 + "
                  "the context maps' classes, vanilla 1); 2 as the paper recommends for most "
                  "tasks (4 when false positives sit next to the ROI); the published code's "
                  "default is 3", lo=1, hi=16, group="method")
    margin: float = _opt(30.0, "soft-mask margin m in mm", lo=0.0, group="method")
    tau: float = _opt(20.0, "soft-mask temperature tau in mm", lo=0.0, lo_open=True,
                      group="method")
    meta_period: int = _opt(5, "update the task generator every N iterations (colab); 5 is the "
                            "published code's taskupdate default: context labels that change "
                            "too often keep the network from learning them (paper supplement); "
                            "at period 1 a CPU epoch costs 2.8-3.2x a vanilla one, at 5 "
                            "1.6-1.7x (benchmarks/RESULTS.md)",
                            lo=1, group="method")
    meta_mode: str = _opt("batched", "meta step on the whole batch (batched) or per sample as the "
                          "reference code (per_sample)", choices=META_MODES,
                          group="method")
    meta_grad: str = _opt("fd", "meta-gradient: finite difference (fd) or exact (double "
                          "backward)", choices=META_GRADS, group="method")
    meta_order: str = _opt(
        "auto", "iteration order: shared (one forward+backward of the network on labels from the "
        "current generator serves the meta step's inner step and the plain update, which then "
        "trains on labels one generator update old: one network forward+backward less per meta "
        "update; on the phantom, with the one-sided difference as well, a test DSC and "
        "precision no lower than reference's over 3 seeds: +0.022 [-0.001, +0.045] DSC, "
        "benchmarks/RESULTS.md), reference (the "
        "published code's: the meta step's own forward+backward, then the plain update on "
        "labels from the updated generator), or "
        "auto: shared in batched meta mode, reference in per_sample mode",
        choices=("auto", *ORDERS), group="method")
    meta_difference: str = _opt(
        "auto", "finite difference of the fd meta-gradient: central (the paper's, theta+ and "
        "theta- forwards), one_sided (reuses the inner forward's dL/dy at theta: one forward "
        "less, error within 2x of central's; needs the inner forward in fp32), or auto: "
        "one_sided when the network runs in fp32 (the CPU), central under mixed precision",
        choices=("auto", *DIFFERENCES), group="method")
    theta_pm: str = _opt("sequential", "how the theta+/- forwards run",
                         choices=THETA_PM, group="method")
    fd_tf32: bool = _opt(True, "let the theta+/- forwards (and a one-sided difference's inner "
                         "forward) use TF32 convolutions on the GPU as torch allows, as every "
                         "pass of the published code does; --no-fd-tf32 runs them in strict "
                         "fp32 (H200, 80^3: an update iteration 18-22% slower, the fd "
                         "meta-gradient 3.3% instead of 3.8% off the float64 one, against "
                         "the finite difference's own 9%; benchmarks/RESULTS.md)",
                         group="method")
    recompute_generator: bool = _opt(False, "recompute the task generator's forward before "
                                     "the meta step's backward instead of holding its "
                                     "activations (lower peak memory, one more forward)",
                                     group="method")
    generator_upsampling: str = _opt(
        "linear", "decoder upsampling of the task generator: linear (interpolation + 1x1 conv) "
        "or transposed (the published code's transposed convolutions, which leave a stride-2 "
        "checkerboard in the learned context maps: on the phantom the generator's neighbour "
        "ratio is 1.03-1.17 at initialisation with transposed, 0.71-0.96 with linear)",
        choices=("linear", "transposed"), group="method")
    manual_contexts: list[int] | None = _opt(
        None, "manual mode: the context-map values that become context classes, in this order "
        "(any other value joins context 0); default: every value > 0. The published code's "
        "manual labels are one class, the ROI's organ (on the phantom: 1, the liver)",
        group="method")
    gen_lr: float = _opt(3e-4, "task-generator Adam learning rate (poly decay)", lo=0.0,
                         lo_open=True, group="method")
    # -- network --------------------------------------------------------------------------------
    patch_size: list[int] | None = _opt(
        None, "training patch size (array axis order); default: the median resampled image, at "
        "most 128^3 voxels on CUDA and 64^3 on the CPU (the phantom: its preset's); the paper "
        "trains 80 80 80", group="network")
    base_features: int = _opt(30, "U-Net features of the first stage", lo=1, group="network")
    max_features: int | None = _opt(None, "U-Net feature cap (default 320 3D / 480 2D)", lo=1,
                                    group="network")
    num_pool: int | None = _opt(
        None, "U-Net downsamplings (default: as many as the patch allows, at most 5; the paper's "
        "80^3 patches use 4)", lo=1,
        hi=8, group="network")
    deep_supervision: bool = _opt(True, "deep-supervision heads and loss", group="network")
    # -- optimisation ---------------------------------------------------------------------------
    epochs: int = _opt(1000, "epochs (nnU-Net's 1000 x 250 iterations; the published CoLab "
                       "code runs 2000 x 100, 20% fewer iterations)", lo=1)
    iterations: int = _opt(250, "iterations per epoch (nnU-Net's; published CoLab code: 100)",
                           lo=1)
    batch_size: int = _opt(2, "global batch size (split over DDP processes)", lo=1)
    optimizer: str = _opt("sgd", "segmentation-network optimizer: sgd (Nesterov, the "
                          "reference's) or adamw", choices=("sgd", "adamw"))
    lr: float = _opt(0.01, "initial learning rate of the segmentation network (poly decay)",
                     lo=0.0, lo_open=True)
    momentum: float = _opt(0.99, "SGD momentum", lo=0.0, hi=1.0)
    weight_decay: float = _opt(3e-5, "weight decay", lo=0.0)
    poly_exponent: float = _opt(0.9, "exponent of the poly learning-rate decay", lo=0.0)
    grad_clip: float = _opt(12.0, "gradient-norm clip (0: off)", lo=0.0)
    amp: str = _opt("auto", "mixed precision for network forwards: auto (bf16 on CUDA, none on "
                    "CPU), none, bf16, fp16; the meta step's theta+/- passes stay fp32",
                    choices=AMP_CHOICES)
    meta_amp: str = _opt(
        "amp", "mixed precision of the meta step's own passes (the task generator's forward "
        "and backward, the L_ROI pass at theta*), which the finite difference never compares "
        "(it compares the network's logits at theta and theta+/- on the same labels): amp "
        "(as --amp), none, or bf16. bf16 on an AMX CPU: the CPU preset's epochs 1.12x faster, "
        "the meta-gradient 16-38 % of its norm away from the fp32 one (whose own finite-"
        "difference error is 2-18 %), the phantom's test DSC 0.479 against 0.472 over 3 seeds. "
        "Opt-in: the published code runs these passes in fp32, and the phantom cannot show "
        "CoLab's own effect (benchmarks/RESULTS.md)", choices=("amp", "none", "bf16"),
        group="method")
    compile: bool = _opt(False, "torch.compile both networks: every pass of the iteration (the "
                         "plain update, the inner step, L_ROI at theta*, the theta+/- forwards, "
                         "the generator's labels); not with meta_grad exact (double backward). "
                         "Off by default: on the CPU a compiled iteration was slower (colabx bench "
                         "meta: 302 vs 213 ms); colabx bench meta --compile measures it where "
                         "you train")
    compile_mode: str = _opt("default", "torch.compile mode with --compile: default, "
                             "max-autotune-no-cudagraphs, or reduce-overhead and max-autotune "
                             "(both capture CUDA graphs, whose replays overwrite outputs the meta "
                             "step holds from one pass to the next: not with mode colab)",
                             choices=("default", "max-autotune-no-cudagraphs",
                                      "reduce-overhead", "max-autotune"))
    cuda_graphs: bool = _opt(False, "replay the iteration's passes from CUDA graphs, each "
                             "captured at its first use, instead of launching their kernels "
                             "one by one: the network's update (labels, forward, loss, "
                             "backward) in every iteration without a generator update and, "
                             "with mode colab, an update iteration's meta passes (batched "
                             "finite-difference meta step; in the shared order with its shared "
                             "forward and backward); gradient clipping and optimizer steps stay "
                             "eager. CUDA only, one process, not with --compile or --amp fp16; "
                             "holds the activations of the captured iterations while training. "
                             "Off by default: on an H200 at 80^3 it made the meta iteration "
                             "5-11% and the others 2-5% faster, a period-5 run 3-8% faster "
                             "(benchmarks/RESULTS.md, run 9; colabx bench meta --cuda-graphs "
                             "measures it)")
    seed: int = _opt(0, "random seed (networks, data, augmentation)", lo=0, hi=2**32 - 1)
    deterministic: bool = _opt(False, "deterministic algorithms (slower on GPU)")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N", group="run")
    threads: int = _opt(0, "CPU threads for torch (0: torch's default)", lo=0, group="run")
    # -- evaluation and outputs -----------------------------------------------------------------
    val_every: int = _opt(1, "validate every N epochs", lo=1, group="evaluation")
    val_cases: int = _opt(0, "validate on at most N held-out cases (0: all)", lo=0,
                          group="evaluation")
    overlap: float = _opt(0.5, "sliding-window overlap at evaluation", lo=0.0, hi=0.9,
                          group="evaluation")
    snapshot_every: int = _opt(5, "context-label snapshot PNG every N epochs (0: off)", lo=0,
                               group="evaluation")
    save_every: int = _opt(1, "write the latest checkpoint every N epochs", lo=1, group="run")
    progress: bool = _opt(True, "progress bars", group="run")

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return from_mapping({**self.to_dict(), **changes})


def _check_value(name: str, value: Any, meta: Mapping[str, Any], default: Any) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{name}: must be one of {', '.join(map(str, choices))}, got {value!r}")
    numbers = value if isinstance(value, list) else [value]
    for v in numbers:
        if v is None or isinstance(v, str):
            continue
        if isinstance(v, bool):
            if not isinstance(default, bool):
                raise ConfigError(f"{name}: expected a number, got {v!r}")
            continue
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{name}: expected a finite number, got {v!r}")
        lo, hi = meta.get("lo"), meta.get("hi")
        if lo is not None and (v < lo or (meta.get("lo_open") and v == lo)):
            op = ">" if meta.get("lo_open") else ">="
            raise ConfigError(f"{name}: must be {op} {lo}, got {v!r}")
        if hi is not None and v > hi:
            raise ConfigError(f"{name}: must be <= {hi}, got {v!r}")


def validate(cfg: TrainConfig) -> None:
    """Check every field's type and range; raise :class:`ConfigError` naming the first bad key."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        _check_type(f.name, value, f.type, default)
        _check_value(f.name, value, f.metadata, default)
    if cfg.patch_size is not None and len(cfg.patch_size) not in (2, 3):
        raise ConfigError(f"patch_size: 2 or 3 sizes expected, got {cfg.patch_size}")
    if cfg.patch_size is not None and any(p < 4 for p in cfg.patch_size):
        raise ConfigError(f"patch_size: every size must be >= 4, got {cfg.patch_size}")
    if cfg.target_spacing is not None and any(s <= 0 for s in cfg.target_spacing):
        raise ConfigError(f"target_spacing: must be > 0, got {cfg.target_spacing}")
    if cfg.mode in ("colab", "kmeans") and cfg.t < 2:
        raise ConfigError(f"t: mode {cfg.mode!r} needs t >= 2 context classes, got {cfg.t}")
    if cfg.manual_contexts is not None and (
            not cfg.manual_contexts or min(cfg.manual_contexts) < 1
            or len(set(cfg.manual_contexts)) != len(cfg.manual_contexts)):
        raise ConfigError(f"manual_contexts: distinct context-map values >= 1 expected, got "
                          f"{cfg.manual_contexts}")
    colab = cfg.mode == "colab"  # the meta step's options concern CoLab alone
    if colab and cfg.meta_order == "shared" and cfg.meta_mode != "batched":  # (auto: reference)
        raise ConfigError("meta_order: shared needs meta_mode batched (per_sample takes one "
                          "inner step per sample, the published code's semantics)")
    if (colab and cfg.meta_difference == "one_sided" and cfg.meta_grad == "fd"
            and cfg.amp in ("bf16", "fp16")):
        raise ConfigError(f"meta_difference: one_sided needs the inner forward in fp32, but amp "
                          f"is {cfg.amp}; use central or --amp none")
    if colab and cfg.meta_amp == "bf16" and cfg.amp == "fp16":
        raise ConfigError("meta_amp: bf16 with amp fp16 would need two autocast dtypes in one "
                          "meta step; use meta_amp amp (fp16) or none")
    if colab and cfg.compile and cfg.meta_grad == "exact":
        raise ConfigError("compile: torch.compile does not differentiate its graphs twice, which "
                          "the exact meta-gradient needs; use meta_grad fd or no --compile")
    if colab and cfg.compile and cfg.compile_mode in CUDA_GRAPH_COMPILE_MODES:
        raise ConfigError(f"compile_mode: {cfg.compile_mode} captures CUDA graphs, whose replays "
                          "overwrite outputs that the meta step holds from one pass to the next "
                          "(the inner gradient, the theta+ logits, the generator's logits: a "
                          "RuntimeError on an H200); with mode colab use compile_mode default "
                          "or max-autotune-no-cudagraphs")
    if colab and cfg.compile and cfg.theta_pm == "grouped":
        raise ConfigError("compile: the grouped theta+/- forward is colabx's own grouped U-Net, "
                          "not the compiled network; use theta_pm sequential")
    if cfg.cuda_graphs and cfg.compile:
        raise ConfigError("cuda_graphs: not with --compile (torch.compile's reduce-overhead mode "
                          "is its own CUDA-graph capture); use one of them")
    if cfg.cuda_graphs and cfg.amp == "fp16":
        raise ConfigError("cuda_graphs: not with amp fp16, whose loss scaler checks for "
                          "overflow on the host; use amp bf16 or none")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {cfg.device!r}")


def _check_type(name: str, value: Any, annotation: str, default: Any) -> None:
    optional = "None" in str(annotation)
    if value is None:
        if not optional:
            raise ConfigError(f"{name}: may not be empty")
        return
    base = str(annotation).replace(" | None", "")
    ok = {
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "list[int]": isinstance(value, list)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
        "list[float]": isinstance(value, list)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value),
    }.get(base)
    if ok is None:
        raise AssertionError(f"unhandled config type {annotation!r} of {name}")
    if not ok:
        raise ConfigError(f"{name}: expected {base}, got {value!r}")


def from_mapping(values: Mapping[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from a mapping; unknown keys raise :class:`ConfigError`."""
    known = {f.name: f for f in fields(TrainConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown configuration key (known: "
                          f"{', '.join(sorted(known))})")
    clean = {}
    for k, v in values.items():
        if isinstance(v, tuple):
            v = list(v)
        if known[k].type in ("float", "float | None") and isinstance(v, int) \
                and not isinstance(v, bool):
            v = float(v)
        if known[k].type == "list[float] | None" and isinstance(v, list):
            v = [float(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in v]
        clean[k] = v
    return TrainConfig(**clean)


#: torch.compile modes that capture CUDA graphs (torch's cudagraph trees): refused for the meta
#: step, measured to fail there (a RuntimeError reading overwritten graph outputs, H200,
#: 2026-12-04).
_WITHOUT_CUDA_GRAPHS = {"reduce-overhead": "default",
                        "max-autotune": "max-autotune-no-cudagraphs"}
CUDA_GRAPH_COMPILE_MODES = tuple(_WITHOUT_CUDA_GRAPHS)


#: Options a resumed run may change (how it runs, how long, what it reports); every other option
#: decides what the run computes and must equal the run's own. theta_pm, fd_tf32 and
#: recompute_generator compute the same meta-gradient in another way or precision, as amp does.
CHANGEABLE_ON_RESUME = ("epochs", "num_workers", "device", "threads", "progress", "amp",
                        "meta_amp", "compile", "compile_mode", "deterministic", "val_every",
                        "val_cases", "overlap", "snapshot_every", "save_every", "preprocessed",
                        "theta_pm", "fd_tf32", "recompute_generator", "cuda_graphs")


#: Options added after runs were saved with an older behaviour than today's default: a saved
#: configuration without them meant these values.
LEGACY_DEFAULTS = {"generator_upsampling": "transposed", "meta_order": "reference",
                   "meta_difference": "central", "fd_tf32": False}
#: Values older runs could hold that are gone, and what replaces them (same results): the vmap
#: θ± forwards were slower than the sequential ones in every measurement.
RETIRED_VALUES = {"theta_pm": {"vmap": "sequential"}}


def resolved_meta_order(cfg: TrainConfig) -> str:
    """The iteration order a run uses: ``meta_order``, with ``auto`` meaning shared in batched
    meta mode and reference in per-sample mode."""
    if cfg.meta_order != "auto":
        return cfg.meta_order
    return "shared" if cfg.meta_mode == "batched" else "reference"


def _colab(c: TrainConfig) -> bool:
    return c.mode == "colab"


def _fd(c: TrainConfig) -> bool:
    return c.mode == "colab" and c.meta_grad == "fd"


#: Options that only some configurations use: (does ``cfg`` use it, which configurations do).
_USED_BY: dict[str, tuple[Callable[[TrainConfig], bool], str]] = {
    "t": (lambda c: c.mode in ("colab", "kmeans"),
          "modes colab and kmeans (dilation has 2 contexts, manual its maps' classes)"),
    "manual_contexts": (lambda c: c.mode == "manual", "mode manual"),
    **dict.fromkeys(("meta_period", "meta_mode", "meta_grad", "meta_order", "recompute_generator",
                     "generator_upsampling", "gen_lr", "meta_amp"), (_colab, "mode colab")),
    **dict.fromkeys(("meta_difference", "fd_tf32"), (_fd, "mode colab with meta_grad fd")),
    "theta_pm": (lambda c: _fd(c) and c.meta_difference != "one_sided",
                 "mode colab with meta_grad fd and the central difference (one_sided runs "
                 "theta+ only)"),
    "compile_mode": (lambda c: c.compile, "--compile"),
}


def unused_options(configs: Sequence[TrainConfig], given: Iterable[str]) -> list[str]:
    """Messages for the options in ``given`` (set by the user) that none of ``configs`` uses
    (``colabx train``: one configuration; ``colabx compare``: one per mode), e.g. ``--t`` with
    ``--mode manual``: they would silently do nothing."""
    out = []
    for name in given:
        if name in _USED_BY:
            used, by = _USED_BY[name]
            if not any(used(c) for c in configs):
                flag = "--" + name.replace("_", "-")
                out.append(f"{flag} has no effect here: it is used by {by} only")
    return out


def resolved_meta_difference(cfg: TrainConfig, mixed_precision: bool) -> str:
    """The finite difference a run uses: ``meta_difference``, with ``auto`` meaning one-sided
    when the network runs in fp32 and central under mixed precision (``mixed_precision``: the
    run's resolved ``amp`` is not none)."""
    if cfg.meta_difference != "auto":
        return cfg.meta_difference
    return "central" if mixed_precision else "one_sided"


def resolved_meta_amp(cfg: TrainConfig, amp: str) -> str:
    """The precision of a run's meta-step passes (generator, L_ROI at θ*): ``meta_amp``, with
    ``amp`` meaning the run's resolved ``amp`` (none, bf16 or fp16)."""
    return amp if cfg.meta_amp == "amp" else cfg.meta_amp


def saved_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's configuration with the values older runs implied for options they lack,
    and retired values replaced by their successors."""
    out = {**LEGACY_DEFAULTS, **config}
    for key, renamed in RETIRED_VALUES.items():
        if out.get(key) in renamed:
            out[key] = renamed[out[key]]
    if out.get("mode", "colab") == "colab" and out.get("compile_mode") in CUDA_GRAPH_COMPILE_MODES:
        # refused for CoLab since (CUDA graphs fail in the meta step; on the CPU these modes
        # compiled as their counterparts without graphs), so that the run can resume
        out["compile_mode"] = _WITHOUT_CUDA_GRAPHS[out["compile_mode"]]
    return out


def _same(key: str, a: Any, b: Any) -> bool:
    if key in ("dataset", "preprocessed") and a is not None and b is not None:
        return os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))
    return a == b


def resume_differences(saved: Mapping[str, Any], requested: Mapping[str, Any]
                       ) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """Compare a run's saved options with those requested for resuming it.

    Returns:
        ``(fixed, changed)``: option → ``(saved, requested)`` for the options that differ, split
        into those that must match (anything not in :data:`CHANGEABLE_ON_RESUME`) and those a
        resumed run may change.
    """
    defaults = TrainConfig(dataset=None).to_dict()
    fixed, changed = {}, {}
    for key in defaults:
        old = saved.get(key, defaults[key])
        new = requested.get(key, old)
        if not _same(key, old, new):
            (changed if key in CHANGEABLE_ON_RESUME else fixed)[key] = (old, new)
    return fixed, changed


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The options a YAML file sets (safe loader); unknown keys raise :class:`ConfigError`."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the configuration file ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of option: value, got {type(data).__name__}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown configuration key in {p}")
    return data


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Read a YAML file into a :class:`TrainConfig`, then apply ``overrides``."""
    return from_mapping({**read_yaml(path), **(overrides or {})})


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved configuration as YAML (atomically)."""
    from colabx._io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))


#: Named starting points. ``phantom-cpu`` is what ``colabx train`` uses without a dataset: about
#: 600 iterations of an 8-feature, 3-pool U-Net on 48 x 48 x 16 patches, minutes on 2 CPU cores.
#: AdamW, because at this budget SGD with momentum 0.99 has not left the all-background phase
#: when the targets have many channels: manual mode (6 channels) predicted no tumour at all after
#: 600 SGD iterations (test DSC 0.000; vanilla 0.434), as the phantom's calibration found too.
#: The meta step's inner step is still plain SGD, θ* = θ − α∇θ L, with α = the current LR.
#: The generator's learning rate, 1e-4 instead of the published 3e-4, is the study's choice on
#: validation DSC of a one-seed study (benchmarks/RESULTS.md: 0.586 against 0.551–0.574 for
#: periods 1/5/20 and learning rates 3e-4/1e-3); over three seeds the settings tie.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "phantom-cpu": {
        "epochs": 10, "iterations": 60, "batch_size": 2, "base_features": 8,
        "max_features": 64, "num_pool": 3, "optimizer": "adamw", "lr": 2e-3, "gen_lr": 1e-4,
        "val_every": 2, "val_cases": 3, "snapshot_every": 2, "num_workers": 1,
    },
}
#: The former name of :data:`TRAIN_PRESETS` (deprecated).
PRESETS = TRAIN_PRESETS

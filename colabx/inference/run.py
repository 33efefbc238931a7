"""Prediction with a trained run: load its checkpoint, segment a folder of raw images.

A checkpoint carries the network plan and the preprocessing plans (target spacing, normalisation,
labels), so a run directory, or a single checkpoint file, is all ``colabx predict`` needs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from colabx._io import (
    OutputFolderError,
    atomic_write,
    check_output_folder,
    mark_output_folder,
    remove_stale_temporaries,
)
from colabx.checkpoint import load_checkpoint
from colabx.data.datasets import scan_images
from colabx.data.image_io import (
    IMAGE_ENDINGS,
    SITK_ENDINGS,
    DatasetError,
    folder_ending,
    require_sitk,
)
from colabx.device import resolve_device
from colabx.inference.postprocess import POSTPROCESSING
from colabx.inference.postprocess import postprocess as apply_postprocess
from colabx.inference.predict import predict_raw, save_prediction
from colabx.models.plan import NetworkPlan, build_networks

__all__ = ["MAX_OVERLAP", "PREDICT_MARKER", "channel_names", "load_trained_model",
           "predict_folder"]


def _checkpoint_path(run: Path, which: str) -> Path:
    if run.is_file():
        return run
    if not run.is_dir():
        kind = "checkpoint file" if run.suffix == ".pth" else "run folder"
        raise FileNotFoundError(f"{run}: no such {kind}")
    p = run / f"checkpoint_{which}.pth"
    if not p.is_file():
        have = sorted(x.name for x in run.glob("checkpoint_*.pth")) if run.is_dir() else []
        raise FileNotFoundError(f"{p}: no such checkpoint"
                                f"{f' (the run has {have})' if have else ''}")
    return p


def load_trained_model(run: str | os.PathLike[str], checkpoint: str = "final",
                       device: str | torch.device = "cpu"
                       ) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """The segmentation network of a run (eval mode, on ``device``), its network plan and the
    preprocessing plans. ``run`` is a run directory (``checkpoint`` = final, best or latest) or a
    checkpoint file."""
    state = load_checkpoint(_checkpoint_path(Path(run), checkpoint))
    plan = NetworkPlan(**{**state["network_plan"], "with_generator": False})
    dev = torch.device(device)
    f, _ = build_networks(plan, dev)
    f.load_state_dict(state["model"])
    f.eval()
    return f, state["network_plan"], state["preprocessing_plans"]


#: Marker of a folder written by :func:`predict_folder`.
PREDICT_MARKER = "colabx_predict.json"
#: Largest sliding-window overlap accepted (as in training): beyond it the window count explodes
#: for no measurable gain.
MAX_OVERLAP = 0.9


def channel_names(plan: dict[str, Any], plans: dict[str, Any]) -> list[str]:
    """Names of the network's K output channels: ``context 0``, the ROI classes by their
    dataset.json names, ``context 1 .. t-1``."""
    c, t = plan["num_classes"], plan["t"]
    names = {v: n for n, v in plans["dataset"]["labels"].items()}
    return ["context 0", *(names.get(j, f"class {j}") for j in range(1, c)),
            *(f"context {j}" for j in range(1, t))]


def _save_probabilities(path: Path, probabilities: np.ndarray, names: list[str],
                        spacing: tuple[float, ...], affine: np.ndarray) -> None:
    def write(f: Any) -> None:
        np.savez_compressed(f, probabilities=probabilities, channels=np.array(names),
                            spacing=np.asarray(spacing, np.float64), affine=affine)
    atomic_write(path, write)


def _reuse_output_folder(out: Path, info: dict[str, Any], overwrite: bool) -> None:
    """An earlier prediction folder may be written again by the same prediction (same run,
    checkpoint, input cases and options: a rerun, e.g. after an interruption); another
    prediction's files would mix with this one's and be listed under this one's marker, so it
    is refused, or with ``overwrite`` its label maps, probabilities and contexts are removed
    first. Temporaries of a killed writer are removed either way."""
    marker = out / PREDICT_MARKER
    if not marker.is_file():
        return
    try:
        previous = json.loads(marker.read_text())
    except (OSError, ValueError):
        previous = None
    if previous != json.loads(json.dumps(info)):
        if not overwrite:
            shown = "" if not isinstance(previous, dict) else (
                f" (run {previous.get('run')}, checkpoint {previous.get('checkpoint')}, input "
                f"{previous.get('input')})")
            raise OutputFolderError(
                f"{out}: holds the predictions of another colabx predict{shown}, or of other "
                "options or cases; they would mix with this one's: choose another folder, or "
                "pass --overwrite to replace them")
        _remove_predictions(out, previous if isinstance(previous, dict) else {})
    remove_stale_temporaries(out)


def _remove_predictions(out: Path, previous: dict[str, Any]) -> None:
    """The outputs an earlier prediction wrote into ``out`` (all label maps of its file ending,
    when its marker does not list its cases)."""
    ending = previous.get("file_ending")
    endings = (ending,) if ending in IMAGE_ENDINGS else tuple(IMAGE_ENDINGS)
    cases = previous.get("cases")
    contexts = out / "contexts"
    targets = [(out, (*endings, ".npz"))] + ([(contexts, endings)] if contexts.is_dir() else [])
    for folder, suffixes in targets:
        for p in folder.iterdir():
            stem = next((p.name[:-len(e)] for e in suffixes if p.name.endswith(e)), None)
            if stem is not None and p.is_file() and (cases is None or stem in cases):
                p.unlink()


def predict_folder(run: str | os.PathLike[str], input_dir: str | os.PathLike[str],
                   output_dir: str | os.PathLike[str], *, checkpoint: str = "final",
                   device: str = "auto", overlap: float = 0.5, mirror: bool | None = None,
                   file_ending: str | None = None, progress: bool = True,
                   overwrite: bool = False, postprocess: str = "none",
                   save_probabilities: bool = False, save_contexts: bool = False,
                   continue_prediction: bool = False) -> list[Path]:
    """Segment every case of ``input_dir`` into ``output_dir/{case}{file_ending}`` (the
    images' grid and header; every file written atomically).

    Input cases are ``{case}_{XXXX}{file_ending}`` files (one per channel, nnU-Net naming) or
    single ``{case}{file_ending}`` files (MSD naming: a 3D image of a one-channel model, or a 4D
    image holding the channels on its last axis). ``file_ending`` None: the one ending the
    input files share (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``); predictions use it too.

    Outputs besides the label maps: with ``save_probabilities``, ``{case}.npz`` holding
    ``probabilities`` (float32 ``[K, *S]``, the softmax over the K channels in the image's
    voxel grid and axis order, context 0 = 1 outside the cropped region), ``channels`` (their
    names, see :func:`channel_names`), ``spacing`` and ``affine`` (the image's); with
    ``save_contexts``, ``contexts/{case}{file_ending}``: the argmax over the t context channels
    (:func:`~colabx.inference.predict.predict_contexts`, values 0..t-1) in the image's grid.

    ``mirror`` None: mirror test-time augmentation over every spatial axis on CUDA, none on
    the CPU (where it multiplies the time by 2^D). ``postprocess``
    (:data:`~colabx.inference.postprocess.POSTPROCESSING`) is applied to each label map before it
    is written (not to contexts or probabilities). ``output_dir`` must be absent, empty or the
    output of the same prediction (``colabx_predict.json`` records run, checkpoint, input cases
    and options: a rerun), unless ``overwrite``; ``overwrite`` writes into a folder of other
    files and leaves them, and replaces another prediction's outputs (removed first).
    Everything is checked before it is created; when prediction fails (an unreadable case, or
    Ctrl-C), a folder this call created is removed again, and in an existing folder the files
    this call wrote are.

    ``continue_prediction`` (nnU-Net's ``--continue_prediction``): in the folder of the same
    prediction, cases whose outputs are all there (label map, and the probabilities and context
    map when asked for) are not predicted again: after a run that was killed (``kill -9``, out
    of memory, a lost machine; a failure this function sees, Ctrl-C included, removes what the
    call wrote, as above). Every file is written atomically, so one that is there is complete.
    Returns the label maps of all cases, in case order.

    Raises:
        FileNotFoundError: no checkpoint, or no input folder.
        DatasetError: input files misnamed, mixed endings, missing channels, unreadable or
            inconsistent; SimpleITK missing for ``.nrrd``/``.mha``.
        OutputFolderError: ``output_dir`` holds other files, or another prediction's (and not
            ``overwrite``).
        ValueError: ``overlap`` outside ``[0, 0.9]``, a bad ``device``, or
            ``continue_prediction`` with ``overwrite``.
    """
    if continue_prediction and overwrite:
        raise ValueError("continue_prediction keeps the outputs of an interrupted run of the "
                         "same prediction and overwrite replaces another prediction's: pass one")
    if not 0.0 <= overlap <= MAX_OVERLAP:
        raise ValueError(f"overlap: must be in [0, {MAX_OVERLAP}], got {overlap}")
    if postprocess not in POSTPROCESSING:
        raise ValueError(f"postprocess: must be one of {', '.join(POSTPROCESSING)}, got "
                         f"{postprocess!r}")
    if file_ending is not None and file_ending not in IMAGE_ENDINGS:
        raise ValueError(f"file_ending: must be one of {', '.join(IMAGE_ENDINGS)}, got "
                         f"{file_ending!r}")
    out = Path(output_dir)
    check_output_folder(out, PREDICT_MARKER, "prediction folder", overwrite=overwrite)
    dev = resolve_device(device)
    f, plan, plans = load_trained_model(run, checkpoint, dev)
    src = Path(input_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such input folder")
    ending = folder_ending(src, "input image") if file_ending is None else file_ending
    cases = scan_images(src, ending, plan["in_channels"],
                        declared_by=f"the model of {run} expects", whole_files=True)
    if not cases:
        raise DatasetError(f"{src}: no images named {{case}}_{{XXXX}}{ending} or "
                           f"{{case}}{ending}")
    if ending in SITK_ENDINGS:
        require_sitk(src)
    mirror = dev.type == "cuda" if mirror is None else mirror
    mirror_axes = tuple(range(plan["spatial_dims"])) if mirror else ()
    amp = torch.bfloat16 if dev.type == "cuda" else None
    names = channel_names(plan, plans)
    info = {"run": str(Path(run).absolute()), "checkpoint": checkpoint,
            "input": str(src.absolute()), "overlap": overlap, "mirror": mirror,
            "postprocess": postprocess, "file_ending": ending,
            "probabilities": save_probabilities, "contexts": save_contexts, "channels": names,
            "cases": sorted(cases)}
    _reuse_output_folder(out, info, overwrite)
    had_marker = (out / PREDICT_MARKER).is_file()
    labels = {cid: out / f"{cid}{ending}" for cid in sorted(cases)}

    def complete(cid: str) -> bool:
        files = [labels[cid]] + [out / f"{cid}.npz"] * save_probabilities + \
            [out / "contexts" / f"{cid}{ending}"] * save_contexts
        return all(p.is_file() for p in files)

    todo = [cid for cid in labels if not (continue_prediction and had_marker and complete(cid))]
    created = mark_output_folder(out, PREDICT_MARKER, info)
    from tqdm.auto import tqdm

    if progress and len(todo) < len(cases):
        tqdm.write(f"continuing: {len(cases) - len(todo)} of {len(cases)} cases already "
                   f"predicted in {out}")
    written: list[Path] = []
    extras: list[Path] = []  # probabilities and contexts
    try:
        for cid in tqdm(todo, desc="predicting", unit="case", disable=not progress):
            images = cases[cid]
            pred = predict_raw(f, images, plans, plan["patch_size"],
                               num_classes=plan["num_classes"], overlap=overlap,
                               mirror_axes=mirror_axes, amp=amp)
            if save_probabilities:
                extras.append(out / f"{cid}.npz")
                _save_probabilities(extras[-1], pred.probabilities(), names, pred.spacing,
                                    pred.affine)
            if save_contexts:
                extras.append(out / "contexts" / f"{cid}{ending}")
                save_prediction(pred.contexts(), images[0], extras[-1])
            label = pred.labels()
            if postprocess != "none":
                label = apply_postprocess(label, postprocess)
            written.append(save_prediction(label, images[0], labels[cid]))
    except BaseException:
        # nothing half-done stays: a folder this call created goes, else what it wrote
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        else:
            for path in written + extras:
                path.unlink(missing_ok=True)
            if save_contexts and (out / "contexts").is_dir() and not any(
                    (out / "contexts").iterdir()):
                (out / "contexts").rmdir()
            if not had_marker:
                (out / PREDICT_MARKER).unlink(missing_ok=True)
        raise
    return list(labels.values())

"""Prediction with a trained run: load its checkpoint, segment a folder of raw NIfTI images.

A checkpoint carries the network plan and the preprocessing plans (target spacing, normalisation,
labels), so a run directory, or a single checkpoint file, is all ``colabx predict`` needs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from colabx._io import check_output_folder, mark_output_folder
from colabx.checkpoint import load_checkpoint
from colabx.data.datasets import scan_images
from colabx.data.nifti import DatasetError
from colabx.device import resolve_device
from colabx.inference.postprocess import POSTPROCESSING
from colabx.inference.postprocess import postprocess as apply_postprocess
from colabx.inference.predict import predict_raw_case, save_prediction
from colabx.models.plan import NetworkPlan, build_networks

__all__ = ["MAX_OVERLAP", "PREDICT_MARKER", "load_trained_model", "predict_folder"]


def _checkpoint_path(run: Path, which: str) -> Path:
    if run.is_file():
        return run
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


def predict_folder(run: str | os.PathLike[str], input_dir: str | os.PathLike[str],
                   output_dir: str | os.PathLike[str], *, checkpoint: str = "final",
                   device: str = "auto", overlap: float = 0.5, mirror: bool = False,
                   file_ending: str = ".nii.gz", progress: bool = True,
                   overwrite: bool = False, postprocess: str = "none") -> list[Path]:
    """Segment every case ``{case}_{XXXX}{file_ending}`` of ``input_dir`` into
    ``output_dir/{case}{file_ending}`` (the images' grid and header; written atomically).

    ``postprocess`` (:data:`~colabx.inference.postprocess.POSTPROCESSING`) is applied to each
    label map before it is written. ``output_dir`` must be absent, empty or an earlier
    ``predict_folder`` output (it holds
    ``colabx_predict.json``), unless ``overwrite``. Everything is checked before it is created;
    when prediction fails, a folder this call created is removed again if it holds no
    prediction.

    Raises:
        FileNotFoundError: no checkpoint, or no input folder.
        DatasetError: input files misnamed, missing channels, unreadable or inconsistent.
        OutputFolderError: ``output_dir`` holds other files (and not ``overwrite``).
        ValueError: ``overlap`` outside ``[0, 0.9]`` or a bad ``device``.
    """
    if not 0.0 <= overlap <= MAX_OVERLAP:
        raise ValueError(f"overlap: must be in [0, {MAX_OVERLAP}], got {overlap}")
    if postprocess not in POSTPROCESSING:
        raise ValueError(f"postprocess: must be one of {', '.join(POSTPROCESSING)}, got "
                         f"{postprocess!r}")
    out = Path(output_dir)
    check_output_folder(out, PREDICT_MARKER, "prediction folder", overwrite=overwrite)
    dev = resolve_device(device)
    f, plan, plans = load_trained_model(run, checkpoint, dev)
    src = Path(input_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such input folder")
    cases = scan_images(src, file_ending, plan["in_channels"],
                         declared_by=f"the model of {run} expects")
    if not cases:
        raise DatasetError(f"{src}: no images named {{case}}_{{XXXX}}{file_ending}")
    mirror_axes = tuple(range(plan["spatial_dims"])) if mirror else ()
    amp = torch.bfloat16 if dev.type == "cuda" else None
    created = mark_output_folder(out, PREDICT_MARKER, {
        "run": str(Path(run).absolute()), "checkpoint": checkpoint,
        "input": str(src.absolute()), "overlap": overlap, "mirror": mirror,
        "postprocess": postprocess})
    from tqdm.auto import tqdm

    written: list[Path] = []
    try:
        for cid, images in tqdm(sorted(cases.items()), desc="predicting", unit="case",
                                disable=not progress):
            label, _ = predict_raw_case(f, images, plans, plan["patch_size"],
                                        num_classes=plan["num_classes"], overlap=overlap,
                                        mirror_axes=mirror_axes, amp=amp)
            if postprocess != "none":
                label = apply_postprocess(label, postprocess)
            written.append(save_prediction(label, images[0], out / f"{cid}{file_ending}"))
    except BaseException:
        if created and not written:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return written

"""From logits to label maps, and from raw image files to a prediction in the original grid.

``predict_labels`` applies the prediction rule of docs/design.md (argmax over all K = c + t - 1
channels; the context channels 0 and c..K-1 all mean background); ``predict_contexts`` gives the
argmax over the context channels alone (the network's context map). ``predict_raw`` runs the
training preprocessing of :mod:`colabx.data.preprocessing` on a case's raw files (crop to nonzero,
normalise with the stored statistics, cubic resampling to the target spacing, "separate z" for
anisotropic spacings), sliding-window inference, then inverts the geometry as nnU-Net does: the
logits are resampled linearly back to the cropped original shape (same voxel-centre mapping as
the forward resampling; for anisotropic spacings linear within slices, nearest across); labels,
context maps and probabilities are taken there and pasted into a background volume of the
original shape (:class:`RawPrediction`). ``predict_raw_case`` returns the labels.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from colabx.data.datasets import Case, Dataset
from colabx.data.image_io import image_ending, write_label_map
from colabx.data.preprocessing import (
    IMAGE_PIPELINE_FORMAT,
    nearest_indices,
    plan_normalization,
    prepare_image,
    separate_z_axis,
)
from colabx.inference.sliding_window import Model, sliding_window_logits

__all__ = [
    "RawPrediction",
    "predict_case",
    "predict_contexts",
    "predict_labels",
    "predict_raw",
    "predict_raw_case",
    "roi_probabilities",
    "save_prediction",
]


def _check_logits(logits: torch.Tensor, num_classes: int) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor [B, K, *S], got "
                        f"{getattr(logits, 'dtype', type(logits).__name__)}")
    if logits.dim() < 3:
        raise ValueError(f"logits must be [B, K, *S], got shape {tuple(logits.shape)}")
    k = logits.shape[1]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) \
            or not 2 <= num_classes <= k:
        raise ValueError(f"num_classes must be an int in [2, K={k}] (classes incl. background; "
                         f"K = num_classes + t - 1 logit channels), got {num_classes!r}")


def _context_logits(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The t context channels ``[B, t, *S]`` (channel 0, then c..K-1)."""
    ctx = logits[:, :1]
    if logits.shape[1] > num_classes:
        ctx = torch.cat([ctx, logits[:, num_classes:]], dim=1)
    return ctx


def _context_max(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    return _context_logits(logits, num_classes).amax(dim=1)


def predict_labels(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label map from CoLab logits (docs/design.md, "Conventions").

    Args:
        logits: ``[B, K, *S]`` floating, channels ``[context 0, ROI 1..c-1, contexts c..K-1]``.
        num_classes: ``c``, classes including background (``2 <= c <= K``).

    Returns:
        int64 ``[B, *S]`` on the logits' device: ``j`` in ``1..c-1`` where ROI channel ``j`` is
        the largest ROI channel (ties: the lowest ``j``) and strictly beats every context channel;
        0 (background) elsewhere, ties with a context channel included.
    """
    _check_logits(logits, num_classes)
    roi_max, roi_arg = logits[:, 1:num_classes].max(dim=1)
    return torch.where(roi_max > _context_max(logits, num_classes), roi_arg + 1, 0)


def predict_contexts(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The network's context of every voxel: the argmax over the t context channels.

    Args:
        logits: ``[B, K, *S]`` floating, channels ``[context 0, ROI 1..c-1, contexts c..K-1]``.
        num_classes: ``c``, classes including background.

    Returns:
        int64 ``[B, *S]`` in ``0..t-1`` (``t = K - c + 1``): 0 where channel 0 is the largest
        context channel, ``j`` where channel ``c - 1 + j`` is (ties: the lower index). ROI
        voxels get the context that ranks first among the context channels there too.
    """
    _check_logits(logits, num_classes)
    return _context_logits(logits, num_classes).argmax(dim=1)


def roi_probabilities(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class probabilities ``[B, c, *S]`` float32 from CoLab logits ``[B, K, *S]``.

    Softmax over all K channels; channel ``j`` in ``1..c-1`` is the ROI channel's probability and
    channel 0 the summed probability of the t context channels, so the c channels sum to 1. (Their
    argmax can differ from :func:`predict_labels`, which compares ROI logits with the *largest*
    context logit, as the reference's argmax does.)
    """
    _check_logits(logits, num_classes)
    p = torch.softmax(logits.float(), dim=1)
    background = p[:, :1].clone()
    if p.shape[1] > num_classes:
        background += p[:, num_classes:].sum(dim=1, keepdim=True)
    return torch.cat([background, p[:, 1:num_classes]], dim=1)


def predict_case(
    model: Model,
    image: torch.Tensor | np.ndarray,
    num_classes: int,
    patch_size: Sequence[int],
    **kwargs: Any,
) -> torch.Tensor:
    """Label map of one preprocessed image.

    Args:
        model: the segmentation network (see :func:`sliding_window_logits`).
        image: float ``[C, *S]``, normalised as in preprocessing (e.g.
            ``PreprocessedDataset.load_case(id).image``).
        num_classes: ``c``, classes including background.
        patch_size: tile size, one int per spatial axis.
        **kwargs: ``overlap``, ``gaussian``, ``mirror_axes``, ``batch_size``, ``amp``,
            ``progress`` of :func:`sliding_window_logits`.

    Returns:
        int64 ``[*S]`` on the model's device.
    """
    if isinstance(image, np.ndarray):
        # a read-only memory map (load_case) is copied: torch has no read-only tensors
        image = np.require(image, requirements=["C_CONTIGUOUS", "WRITEABLE"])
    x = torch.from_numpy(image) if isinstance(image, np.ndarray) else image
    if x.dim() != len(patch_size) + 1:
        raise ValueError(f"image must be [C, *S] with {len(patch_size)} spatial axes (as "
                         f"patch_size), got shape {tuple(x.shape)}")
    logits = sliding_window_logits(model, x, patch_size, **kwargs)
    return predict_labels(logits, num_classes)[0]


def _reader(plans: dict[str, Any]) -> Dataset:
    """A Dataset carrying only what :meth:`Dataset.load_image` needs (channel names), so raw
    files get the same reading and checks as in training."""
    d = plans["dataset"]
    return Dataset(root=Path(d["root"]), layout=d["layout"], name=d["name"],
                   channel_names=tuple(d["channel_names"]), labels=dict(d["labels"]),
                   file_ending=".nii.gz", cases=[], ignore_label=d.get("ignore_label"),
                   squeezed_axis=d.get("squeezed_axis"))


def _num_classes(plans: dict[str, Any]) -> int:
    d = plans["dataset"]
    ignore = d.get("ignore_label")
    return max(v for v in d["labels"].values() if v != ignore) + 1


def _resize_logits(logits: torch.Tensor, shape: tuple[int, ...],
                   separate_axis: int | None = None) -> torch.Tensor:
    """Linear resampling ``[1, K, *S] -> [1, K, *shape]`` with voxel centres mapped as the forward
    resampling does (``align_corners=False`` is scipy's ``grid_mode=True``; edges clamped). With
    ``separate_axis`` (a spatial axis), bilinear within each slice across it and nearest neighbour
    along it (nnU-Net's export of anisotropic data)."""
    if tuple(logits.shape[2:]) == shape:
        return logits
    if separate_axis is None:
        mode = "bilinear" if len(shape) == 2 else "trilinear"
        return F.interpolate(logits, size=shape, mode=mode, align_corners=False)
    dim = 2 + separate_axis
    plane = tuple(n for a, n in enumerate(shape) if a != separate_axis)
    slices = logits[0].movedim(dim - 1, 0)  # [S_axis, K, *plane_in]
    if tuple(slices.shape[2:]) != plane:
        slices = F.interpolate(slices, size=plane, mode="bilinear", align_corners=False)
    index = torch.from_numpy(nearest_indices(slices.shape[0], shape[separate_axis]))
    return slices[index.to(slices.device)].movedim(0, dim - 1)[None]


@dataclass(frozen=True)
class RawPrediction:
    """The network's output on one raw case, in the case's original geometry.

    Attributes:
        logits: float ``[1, K, *C]`` on the model's device: the logits resampled back to the
            cropped original grid ``C`` (the nonzero bounding box ``bbox`` of the image).
        bbox: one slice per spatial axis of the original grid: where ``logits`` belong.
        shape: the original spatial shape ``S``.
        spacing: the original spacing (mm, array axis order).
        affine: the 4×4 affine of the first image file.
        num_classes: ``c``, classes including background.
    """

    logits: torch.Tensor
    bbox: tuple[slice, ...]
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    affine: np.ndarray
    num_classes: int

    def _paste(self, inside: torch.Tensor, outside: float, dtype: type) -> np.ndarray:
        lead = tuple(inside.shape[:-len(self.shape)])
        out = np.full((*lead, *self.shape), outside, dtype)
        out[(Ellipsis, *self.bbox)] = inside.cpu().numpy()
        return out

    def labels(self) -> np.ndarray:
        """int16 ``[*S]``: :func:`predict_labels` inside the bounding box, 0 outside."""
        return self._paste(predict_labels(self.logits, self.num_classes)[0].to(torch.int16),
                           0, np.int16)

    def contexts(self) -> np.ndarray:
        """int16 ``[*S]``: :func:`predict_contexts` (the learned context of every voxel, ROI
        voxels included) inside the bounding box, context 0 outside."""
        return self._paste(predict_contexts(self.logits, self.num_classes)[0].to(torch.int16),
                           0, np.int16)

    def probabilities(self) -> np.ndarray:
        """float32 ``[K, *S]``: the softmax over all K channels (``[context 0, ROI 1..c-1,
        contexts c..K-1]``); outside the bounding box, where the network does not look,
        context 0 has probability 1."""
        p = torch.softmax(self.logits[0].float(), dim=0)
        out = self._paste(p, 0.0, np.float32)
        outside = np.ones(self.shape, bool)
        outside[self.bbox] = False
        out[0][outside] = 1.0
        return out


def predict_raw(
    model: Model,
    images: Sequence[str | os.PathLike[str]],
    plans: dict[str, Any],
    patch_size: Sequence[int],
    *,
    num_classes: int | None = None,
    **kwargs: Any,
) -> RawPrediction:
    """Run the network on one raw case and bring its logits back to the original geometry.

    The preprocessing of training is applied with the plans' settings: crop to the nonzero
    bounding box, per-channel normalisation (CT: the stored dataset statistics; z-score: this
    case's statistics, within its nonzero mask when the plans' ``use_mask_for_norm`` says so),
    cubic resampling to ``plans["target_spacing"]`` (separate z for anisotropic spacings). The
    logits are resampled back to the cropped shape in the same way at order 1 (labels, contexts
    and probabilities are then taken there and pasted into the original shape, see
    :class:`RawPrediction`). Plans of an older format (before this preprocessing followed
    nnU-Net v2's) get a warning: the model was trained on differently resampled data.

    Args:
        model: the segmentation network.
        images: the case's image files, one per channel in channel order, or one 4D file holding
            the channels (last axis).
        plans: the parsed ``plans.json`` of the preprocessed training set.
        patch_size: tile size in the preprocessed grid.
        num_classes: ``c``; default from the plans' labels (largest value, ignore excluded, + 1).
        **kwargs: options of :func:`sliding_window_logits`.

    Raises:
        DatasetError: unreadable or inconsistent image files (the message names the file).
        ValueError: plans whose spatial dimensionality or channel count does not fit the image.
    """
    paths = tuple(Path(p) for p in ([images] if isinstance(images, (str, os.PathLike))
                                    else images))
    if not paths:
        raise ValueError("images must name at least one image file")
    reader = _reader(plans)
    name = paths[0].name
    name = name[: len(name) - len(image_ending(name) or "")]
    image, spacing, affine = reader.load_image(Case(name, paths))
    target = tuple(float(s) for s in plans["target_spacing"])
    if len(target) != len(spacing):
        raise ValueError(f"{paths[0]}: image has {len(spacing)} spatial axes but the plans' "
                         f"target spacing {target} has {len(target)}")
    c = _num_classes(plans) if num_classes is None else num_classes
    if plans.get("format_version", 1) < IMAGE_PIPELINE_FORMAT:
        warnings.warn(f"these plans are format {plans.get('format_version', 1)}: the model was "
                      "trained before colabx preprocessed as nnU-Net v2 does (separate-z and "
                      "clipped resampling, hole-filled nonzero mask), which prediction now "
                      "applies; retrain for predictions that match its training exactly",
                      RuntimeWarning, stacklevel=2)

    prep = prepare_image(image, spacing, target, plan_normalization(plans), paths[0])
    logits = sliding_window_logits(model, torch.from_numpy(prep.image), patch_size, **kwargs)
    cropped = tuple(s.stop - s.start for s in prep.bbox)
    logits = _resize_logits(logits, cropped, separate_z_axis(target, spacing))
    return RawPrediction(logits, prep.bbox, tuple(image.shape[1:]), spacing, affine, c)


def predict_raw_case(
    model: Model,
    images: Sequence[str | os.PathLike[str]],
    plans: dict[str, Any],
    patch_size: Sequence[int],
    *,
    num_classes: int | None = None,
    **kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Predict one raw case and return the label map in its original voxel grid
    (:func:`predict_raw`, then :func:`predict_labels` in the cropped grid pasted into a zero
    (background) volume of the original shape).

    Returns:
        ``(label, affine)``: int16 ``[*S]`` in the first image file's grid and its 4×4 affine.

    Raises:
        DatasetError, ValueError: as :func:`predict_raw`.
    """
    pred = predict_raw(model, images, plans, patch_size, num_classes=num_classes, **kwargs)
    return pred.labels(), pred.affine


def save_prediction(label: np.ndarray | torch.Tensor, reference: str | os.PathLike[str],
                    out_path: str | os.PathLike[str]) -> Path:
    """Write a label map in the reference image's grid, atomically
    (:func:`colabx.data.image_io.write_label_map`: uint8 when every value fits, else int16; a
    NIfTI reference's header is kept for NIfTI output).

    Args:
        label: integer ``[*S]`` with ``S`` the reference's spatial shape (its first 2 or 3 axes).
        reference: the image file whose grid the labels are in (e.g. the case's first image).
        out_path: ``.nii.gz``, ``.nii``, ``.nrrd`` or ``.mha``.

    Returns:
        ``out_path`` as a Path.

    Raises:
        DatasetError: the reference cannot be read.
        ValueError: bad file ending, shape mismatch, or values outside ``[0, 32767]``.
    """
    arr = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    return write_label_map(arr, reference, out_path)

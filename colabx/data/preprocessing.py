"""Preprocess a dataset once into a cached folder: crop, resample, normalise, distance maps.

``preprocess_dataset(dataset, out_dir)`` turns every training case of a dataset read by
:func:`colabx.data.datasets.load_dataset` into arrays ready for patch sampling, following nnU-Net
v2's order of operations (crop → normalise → resample):

1. **Crop to nonzero** (nnU-Net's ``crop_to_nonzero``): the bounding box of the nonzero mask (the
   union over channels of ``image != 0``, holes filled) is applied to the image, the label and the
   context map. An all-zero image is not cropped. Foreground outside the box is lost, as in
   nnU-Net.
2. **Normalise** per channel, the scheme chosen from the channel name by nnU-Net v2's table
   (case-insensitive: ``"CT"`` → ct, ``"noNorm"``, ``"zscore"``, ``"rescale_to_0_1"``,
   ``"rgb_to_0_1"``; any other name → zscore) unless ``modality`` overrides it:

   * ``"ct"``: clip to the 0.5 / 99.5 percentiles of the foreground voxels (label > 0, the
     ``ignore`` label excluded; nnU-Net includes it) of the training cases after cropping, then
     subtract their mean and divide by their standard deviation (unclipped), as nnU-Net v2's
     ``CTNormalization``. Every case weighs the same, as in nnU-Net, which draws 10^8 / N voxels
     from each case; colabx computes that equal-weight distribution's statistics exactly from
     every foreground voxel instead of from random draws (4 bytes per foreground voxel of the
     dataset in memory once, sorted in place).
   * ``"zscore"``: per case and channel, mean and standard deviation, nnU-Net's
     ``ZScoreNormalization``. Over the nonzero mask (and the labelled voxels of training cases,
     as nnU-Net's ``seg >= 0``), with voxels outside it set to 0, when the median training case
     kept less than 75 % of its voxels after cropping (nnU-Net's ``use_mask_for_norm``, recorded
     in ``plans.json``); else over every voxel of the cropped image.
   * ``"nonorm"``: unchanged; ``"rescale_to_0_1"``: minus the case's minimum, divided by the
     range; ``"rgb_to_0_1"``: divided by 255 (values outside [0, 255] are refused).

   Standard deviations below 1e-8 are replaced by 1e-8.
3. **Resample** to ``target_spacing`` onto the shape ``round(shape * spacing / target_spacing)``
   (nnU-Net's rule). The default target is nnU-Net v2's: the per-axis median spacing of the
   training cases, except that a median coarsest axis over 3x the others whose median cropped
   size is under a third of the others' (thick, few slices) takes the 10th percentile of its
   spacings (at least the others' spacing). Resampling uses
   ``scipy.ndimage.zoom(..., grid_mode=True, mode="nearest")``: voxel *centres* are mapped
   (``x_in = (x_out + 0.5) * n_in / n_out - 0.5``, as ``skimage.transform.resize`` used by nnU-Net)
   and the edge is extended. Images: cubic spline (order 3), float32, clipped to the input's
   range as skimage does. Label and context maps as nnU-Net's ``resize_segmentation``: each
   class present in the case is resampled as a 0/1 map with order 1, and in ascending class order
   every output voxel whose weight for the class is at least 0.5 takes it (so a tie at 0.5 goes to
   the higher class, and thin structures halved by downsampling are kept); a voxel no class
   reaches 0.5 in (three or more classes meeting) is 0. This gives smooth boundaries where
   nearest-neighbour gives staircases and shifts them by up to half a voxel; it can only produce
   the classes of the input and 0.
   input. A case whose shape does not change is not resampled (nnU-Net does the same).
   **Anisotropic data** (the case's or the target spacing's largest/smallest ratio over 3, with
   one coarsest axis: :func:`separate_z_axis`) is resampled as nnU-Net's "separate z": as above
   within each slice across the coarse axis, nearest neighbour along it.
4. **Distance map**: ``colabx.distance_transform(roi, spacing=target_spacing)`` with
   ``roi = label > 0`` (the ``ignore`` label excluded): the distance in mm from each voxel to the
   nearest ROI voxel, 0 on the ROI. A case without ROI gets ``+inf`` everywhere; it is stored as
   is (IEEE +inf in a float32 ``.npy``), and ``plans.json`` records ``"roi_voxels": 0``.

Output folder (``out_dir``)::

    plans.json                  settings, target spacing, normalisation, fingerprint, per-case meta
    {case}_image.npy            float32 [C, *S]
    {case}_label.npy            int16 [*S]
    {case}_distance.npy         float32 [*S] (mm; +inf when the case has no ROI)
    {case}_context.npy          int16 [*S] (only when the dataset has contextTr/)

Plain ``.npy`` (uncompressed) so a loader can memory-map a case and read patches without
decompressing it. Every file is written to a temporary name in ``out_dir`` and moved into place with
``os.replace``; ``plans.json`` is removed before any case is (re)written and written last, so a
folder holding a ``plans.json`` is always complete and consistent with it, and a failed run leaves
no ``plans.json`` and no half-written file.

**Fingerprint**: SHA-256 of the format version, the settings (``target_spacing``, ``modality``),
the dataset's ``dataset.json`` content and, for every input file (images, labels, context maps),
its path relative to the dataset root, size and modification time (ns). When ``out_dir/plans.json``
holds the same fingerprint and every file it lists exists, nothing is recomputed; any change reruns
everything. Contents are not hashed: a file rewritten with the same size and the same mtime is not
noticed. Files of cases no longer in the dataset are left in ``out_dir`` (not listed in
``plans.json``, so never read).

**Parallelism**: ``num_workers > 0`` runs cases (and the fingerprint pass) in a ``spawn`` process
pool; each worker writes its own case's files and returns only metadata, so results are identical
to the serial run. Workers use one torch thread each.

Only training cases are preprocessed (``imagesTs`` is not).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage as ndi

from colabx._io import (
    atomic_write,
    atomic_write_text,
    check_output_folder,
    mark_output_folder,
    remove_stale_temporaries,
)
from colabx.data.datasets import Case, Dataset, DatasetError, load_dataset

__all__ = [
    "PreprocessedCase",
    "PreprocessedDataset",
    "compute_fingerprint",
    "crop_to_nonzero",
    "ct_statistics",
    "fullres_target_spacing",
    "load_preprocessed",
    "nearest_indices",
    "normalization_schemes",
    "normalize_image",
    "plan_normalization",
    "prepare_image",
    "preprocess_dataset",
    "preprocess_held_out_case",
    "resample_image",
    "resample_labels",
    "separate_z_axis",
    "target_shape",
]

#: Bumped whenever the output format or the computation changes; part of the fingerprint.
FORMAT_VERSION = 3
#: The first format whose images are prepared as :func:`prepare_image` prepares them now (nnU-Net
#: v2's resampling and masks); prediction warns for plans older than that.
IMAGE_PIPELINE_FORMAT = 2
PLANS_NAME = "plans.json"
#: Marker of a folder written by :func:`preprocess_dataset` (other non-empty folders are refused).
PREPROCESSED_MARKER = "colabx_preprocessed.json"
CT_PERCENTILES = (0.5, 99.5)
#: nnU-Net's anisotropy threshold: a coarsest spacing more than 3x the finest is "anisotropic".
ANISOTROPY_THRESHOLD = 3.0
#: nnU-Net normalises z-score channels within the nonzero mask only when cropping to it left less
#: than this fraction of the voxels (median over the training cases).
MASK_FOR_NORM_BELOW = 0.75
_STD_EPS = 1e-8
#: nnU-Net v2's channel-name → scheme table (names compared case-insensitively; others: zscore).
SCHEMES = ("ct", "nonorm", "zscore", "rescale_to_0_1", "rgb_to_0_1")


# -- array operations -----------------------------------------------------------------------------


def crop_to_nonzero(image: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray]:
    """Bounding box of nnU-Net's nonzero mask: the union over channels of ``image != 0``, in 3D
    with its holes filled (``scipy.ndimage.binary_fill_holes``, as nnU-Net's
    ``create_nonzero_mask``).

    Args:
        image: ``[C, *S]``.

    Returns:
        ``(bbox, mask)``: one slice per spatial axis (the whole axis when the image is all zero)
        and the hole-filled nonzero mask ``[*S]`` of the *uncropped* image.
    """
    mask = np.any(image != 0, axis=0)
    if mask.ndim == 3:  # nnU-Net fills 2D images as [1, x, y]: nothing is enclosed there
        mask = ndi.binary_fill_holes(mask)
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape), mask
    bbox = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        nz = np.flatnonzero(mask.any(axis=other))
        bbox.append(slice(int(nz[0]), int(nz[-1]) + 1))
    return tuple(bbox), mask


def fullres_target_spacing(spacings: Sequence[Sequence[float]],
                           cropped_shapes: Sequence[Sequence[int]]) -> tuple[float, ...]:
    """nnU-Net v2's target spacing: the per-axis median spacing, except for anisotropic data.

    When the median's coarsest axis is more than 3x the coarsest other axis *and* the median
    cropped size along it times 3 is below the smallest other median size (thick slices, few of
    them), that axis takes the 10th percentile of its spacings instead (at least the coarsest other
    spacing + 1e-5), so that the cases with thinner slices are not thrown away. 3D only: 2D
    datasets keep the median, as in nnU-Net.
    """
    sp = np.asarray(spacings, np.float64)
    target = np.percentile(sp, 50, axis=0)
    if sp.shape[1] != 3:  # nnU-Net's 2D images carry a placeholder third axis, always the worst
        return tuple(float(t) for t in target)
    size = np.percentile(np.asarray(cropped_shapes, np.float64), 50, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != worst]
    other_spacing = max(target[a] for a in others)
    if (target[worst] > ANISOTROPY_THRESHOLD * other_spacing
            and size[worst] * ANISOTROPY_THRESHOLD < min(size[a] for a in others)):
        low = float(np.percentile(sp[:, worst], 10))
        target[worst] = low if low >= other_spacing else other_spacing + 1e-5
    return tuple(float(t) for t in target)


def separate_z_axis(spacing: Sequence[float], target: Sequence[float]) -> int | None:
    """The axis nnU-Net resamples on its own, with nearest neighbour ("separate z"), or None.

    ``spacing`` is checked first, then ``target``: the first whose largest/smallest ratio exceeds
    3 names its coarsest axis, unless two axes share that spacing (then None). 2D images: None.
    """
    if len(spacing) != 3:
        return None
    for sp in (np.asarray(spacing, np.float64), np.asarray(target, np.float64)):
        if sp.max() / sp.min() > ANISOTROPY_THRESHOLD:
            coarsest = np.flatnonzero(sp == sp.max())
            return int(coarsest[0]) if len(coarsest) == 1 else None
    return None


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Nearest input index of every output position when ``n_in`` voxels are resampled to
    ``n_out`` with voxel centres mapped (``x_in = (x_out + 0.5) * n_in / n_out - 0.5``)."""
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


def target_shape(shape: Sequence[int], spacing: Sequence[float],
                 target_spacing: Sequence[float]) -> tuple[int, ...]:
    """nnU-Net's resampled shape: ``round(spacing / target_spacing * shape)`` (in that order, as
    nnU-Net computes it: a product near .5 rounds as there), at least 1."""
    return tuple(max(1, int(round(s / t * n)))
                 for n, s, t in zip(shape, spacing, target_spacing, strict=True))


def _zoom(arr: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    factors = [o / i for o, i in zip(shape, arr.shape, strict=True)]
    out = ndi.zoom(arr, factors, order=order, mode="nearest", grid_mode=True, prefilter=order > 1)
    if out.shape != shape:  # scipy rounds in*zoom; cannot differ for integer ratios, but check
        raise AssertionError(f"zoom produced {out.shape}, expected {shape}")
    return out


def _clipped_cubic(arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Cubic resampling clipped to the input's value range (``skimage.transform.resize``'s
    ``clip=True``, which nnU-Net uses): no overshoot at sharp edges."""
    if arr.shape == shape:
        return arr.copy()
    out = _zoom(arr, shape, 3)
    return np.clip(out, arr.min(), arr.max(), out=out)


def _separately(arr: np.ndarray, shape: tuple[int, ...], axis: int,
                in_plane: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]) -> np.ndarray:
    """``arr`` resampled slice by slice across ``axis`` with ``in_plane``, then along ``axis``
    by nearest neighbour."""
    plane = tuple(n for a, n in enumerate(shape) if a != axis)
    moved = np.moveaxis(arr, axis, 0)
    slices = np.stack([in_plane(np.ascontiguousarray(s), plane) for s in moved])
    slices = np.take(slices, nearest_indices(moved.shape[0], shape[axis]), axis=0)
    return np.ascontiguousarray(np.moveaxis(slices, 0, axis))


def resample_image(image: np.ndarray, shape: Sequence[int],
                   separate_axis: int | None = None) -> np.ndarray:
    """Resample ``image [C, *S]`` to ``[C, *shape]``: a new float32 array (a copy when the shape is
    unchanged). Cubic splines (order 3) clipped to each input's range; with ``separate_axis``
    (see :func:`separate_z_axis`) cubic within each slice across that axis and nearest neighbour
    along it, as nnU-Net does for anisotropic data."""
    shape = tuple(int(n) for n in shape)
    if tuple(image.shape[1:]) == shape:
        return np.array(image, dtype=np.float32)  # a copy, as when resampling
    channels = [np.asarray(c, np.float32) for c in image]
    if separate_axis is None:
        out = [_clipped_cubic(c, shape) for c in channels]
    else:
        out = [_separately(c, shape, separate_axis, _clipped_cubic) for c in channels]
    return np.stack(out).astype(np.float32, copy=False)


def resample_labels(labels: np.ndarray, shape: Sequence[int],
                    separate_axis: int | None = None) -> np.ndarray:
    """Resample a label map to ``shape`` as nnU-Net's ``resize_segmentation`` at order 1: each
    class's 0/1 map linearly, and in ascending class order every voxel whose weight is at least
    0.5 takes the class; voxels no class reaches 0.5 in are 0. With ``separate_axis``, so within
    each slice across that axis and nearest neighbour along it. Same dtype.
    """
    shape = tuple(int(n) for n in shape)
    if tuple(labels.shape) == shape:
        return labels.copy()
    if separate_axis is not None:
        return _separately(labels, shape, separate_axis, resample_labels)
    classes = np.unique(labels)
    if len(classes) == 1:
        return np.full(shape, classes[0], dtype=labels.dtype)
    out = np.zeros(shape, dtype=labels.dtype)
    for c in classes:
        if c != 0:
            out[_zoom((labels == c).astype(np.float32), shape, 1) >= 0.5] = c
    return out


def normalization_schemes(channel_names: Sequence[str],
                          modality: str | Sequence[str] | None = None) -> tuple[str, ...]:
    """Per-channel scheme, one of :data:`SCHEMES`, by nnU-Net v2's table.

    ``modality`` None: from the channel names. A string applies to every channel, a sequence gives
    one per channel. Names are compared case-insensitively: ``"CT"`` → ct, ``"noNorm"`` → nonorm,
    ``"zscore"``, ``"rescale_to_0_1"``, ``"rgb_to_0_1"``; any other name (e.g. ``"MR"``, ``"T2"``)
    → zscore.
    """
    n = len(channel_names)
    if modality is None:
        names: Sequence[str] = channel_names
    elif isinstance(modality, str):
        names = [modality] * n
    else:
        names = list(modality)
        if len(names) != n or not all(isinstance(m, str) for m in names):
            raise ValueError(f"modality must be a string or {n} strings (one per channel "
                             f"{list(channel_names)}), got {modality!r}")
    return tuple(m.strip().casefold() if m.strip().casefold() in SCHEMES else "zscore"
                 for m in names)


def normalize_image(image: np.ndarray, mask: np.ndarray, schemes: Sequence[str],
                    ct_stats: Sequence[dict[str, float] | None],
                    use_mask: Sequence[bool] | None = None) -> tuple[np.ndarray, list[dict]]:
    """Normalise the cropped ``image [C, *S]`` into a new float32 array, channel by channel, as
    nnU-Net v2's schemes do; also return per channel the statistics used for this case.

    Args:
        image: ``[C, *S]``, cropped.
        mask: bool ``[*S]``: the region z-score channels are normalised within when their
            ``use_mask`` is true (nnU-Net: the hole-filled nonzero mask, and for training cases
            also the labelled voxels); voxels outside it are set to 0. An empty mask means every
            voxel.
        schemes: one of :data:`SCHEMES` per channel.
        ct_stats: per channel the dataset's CT statistics (``lower``, ``upper``, ``mean``,
            ``std``), None for other schemes.
        use_mask: per channel; default True for every channel (colabx's plans before format 2).

    Raises:
        ValueError: an ``rgb_to_0_1`` channel with values outside ``[0, 255]``.
    """
    out = np.empty_like(image, dtype=np.float32)
    used: list[dict] = []
    region = mask if mask.any() else np.ones_like(mask)
    for c, scheme in enumerate(schemes):
        x = image[c].astype(np.float64)
        stats: dict = {}
        if scheme == "ct":
            st = ct_stats[c]
            assert st is not None
            x = (np.clip(x, st["lower"], st["upper"]) - st["mean"]) / max(st["std"], _STD_EPS)
        elif scheme == "zscore":
            masked = True if use_mask is None else bool(use_mask[c])
            v = x[region] if masked else x
            stats = {"mean": float(v.mean()), "std": float(v.std())}
            x = (x - stats["mean"]) / max(stats["std"], _STD_EPS)
            if masked:
                x[~region] = 0.0
        elif scheme == "rescale_to_0_1":
            x = x - x.min()
            x /= max(float(x.max()), _STD_EPS)
        elif scheme == "rgb_to_0_1":
            if x.min() < 0 or x.max() > 255:
                raise ValueError(f"channel {c} (rgb_to_0_1) has values in [{x.min():g}, "
                                 f"{x.max():g}]; RGB channels must lie in [0, 255]")
            x = x / 255.0
        elif scheme != "nonorm":
            raise ValueError(f"unknown normalisation scheme {scheme!r}; expected one of {SCHEMES}")
        used.append(stats)
        out[c] = x
    return out, used


def _foreground(label: np.ndarray, ignore: int | None) -> np.ndarray:
    fg = label > 0
    if ignore is not None:
        fg &= label != ignore
    return fg


def _distance(roi: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    import torch

    from colabx.ops.distance_transform import distance_transform

    d = distance_transform(torch.from_numpy(np.ascontiguousarray(roi))[None],
                           spacing=[float(s) for s in spacing])
    return d[0].numpy()


# -- files ----------------------------------------------------------------------------------------


def _save_npy(path: Path, arr: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))


def _case_files(case_id: str, has_context: bool) -> dict[str, str]:
    files = {k: f"{case_id}_{k}.npy" for k in ("image", "label", "distance")}
    if has_context:
        files["context"] = f"{case_id}_context.npy"
    return files


# -- per-case work (module level: runs in worker processes) --------------------------------------


@dataclass(frozen=True)
class _Job:
    dataset: Dataset
    case: Case
    out_dir: Path
    normalization: tuple  # (schemes, ct_stats, use_mask), as plan_normalization gives them
    target_spacing: tuple[float, ...]


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def _case_fingerprint(args: tuple[Dataset, Case, tuple[int, ...]]) -> dict[str, Any]:
    """What the dataset-level choices need of one case (nnU-Net's fingerprint): its shape after
    cropping, the fraction of voxels cropping kept, and the foreground intensities (label > 0,
    ignore excluded, after cropping) of the CT channels ``args[2]``."""
    dataset, case, channels = args
    d = dataset.load_case(case)
    bbox, _ = crop_to_nonzero(d.image)
    assert d.label is not None
    fg = _foreground(d.label[bbox], dataset.ignore_label)
    cropped = [s.stop - s.start for s in bbox]
    return {"cropped_shape": cropped,
            "relative_size": float(np.prod(cropped) / np.prod(d.image.shape[1:])),
            "ct": [d.image[(c, *bbox)][fg].astype(np.float32) for c in channels]}


def _mixture_quantile(cases: Sequence[np.ndarray], q: float) -> float:
    """The smallest value ``v`` of the sorted ``cases`` where the equal-weight mixture's CDF,
    the mean over cases of the fraction of values <= v, reaches ``q`` percent (bisection on the
    value: no concatenated copy of the data)."""
    def cdf(x: float) -> float:
        return float(np.mean([np.searchsorted(c, x, side="right") / c.size for c in cases]))

    lo = float(min(c[0] for c in cases))
    hi = float(max(c[-1] for c in cases))
    if cdf(lo) >= q / 100.0:
        return lo
    while True:  # cdf(lo) < q <= cdf(hi)
        mid = lo + (hi - lo) / 2
        if mid in (lo, hi):
            break
        if cdf(mid) >= q / 100.0:
            hi = mid
        else:
            lo = mid
    return float(min(c[i] for c in cases if (i := np.searchsorted(c, lo, side="right")) < c.size))


def ct_statistics(per_case: Sequence[np.ndarray]) -> dict[str, float]:
    """CT normalisation statistics of one channel from each training case's foreground
    intensities, every case weighing the same (nnU-Net draws the same number of voxels from each
    case; this is that distribution exactly, without the random draws): the 0.5 / 99.5
    percentiles, mean and standard deviation. The arrays are sorted in place; besides them it
    needs one float64 copy of the largest case at a time.

    Raises:
        ValueError: no case has foreground voxels.
    """
    cases = [np.asarray(v) for v in per_case if np.size(v)]
    if not cases:
        raise ValueError("no foreground voxels")
    for c in cases:
        c.sort()
    means = np.array([c.mean(dtype=np.float64) for c in cases])
    mean = float(means.mean())
    # the mixture's variance: the mean of each case's variance about the common mean
    variances = np.array([c.var(dtype=np.float64) for c in cases])
    var = float(np.mean(variances + (means - mean) ** 2))
    lower, upper = (_mixture_quantile(cases, q) for q in CT_PERCENTILES)
    return {"lower": lower, "upper": upper, "mean": mean, "std": float(np.sqrt(var)),
            "voxels": int(sum(c.size for c in cases)), "cases": len(cases)}


@dataclass(frozen=True)
class PreparedImage:
    """An image cropped, normalised and resampled (:func:`prepare_image`).

    Attributes:
        image: float32 ``[C, *shape]`` at the target spacing.
        bbox: the crop, one slice per spatial axis of the original grid.
        shape: the resampled spatial shape.
        separate_axis: the axis resampled by nearest neighbour, or None (:func:`separate_z_axis`).
        stats: per channel the statistics used (z-score: mean and std).
    """

    image: np.ndarray
    bbox: tuple[slice, ...]
    shape: tuple[int, ...]
    separate_axis: int | None
    stats: list[dict]


def prepare_image(image: np.ndarray, spacing: Sequence[float], target: Sequence[float],
                  normalization: tuple[Sequence[str], Sequence[dict | None], Sequence[bool] | None],
                  source: str | os.PathLike[str], label: np.ndarray | None = None
                  ) -> PreparedImage:
    """Steps 1–3 of the module docstring for one image ``[C, *S]``: crop to nonzero, normalise
    with ``normalization`` = ``(schemes, ct_stats, use_mask)`` (:func:`plan_normalization`),
    resample to ``target``. ``label`` (uncropped): its labelled voxels join the z-score mask, as
    for nnU-Net's training cases; None normalises from the image alone, as prediction does.

    Raises:
        DatasetError: a channel its scheme refuses (named with ``source``).
    """
    bbox, mask = crop_to_nonzero(image)
    cropped = image[(slice(None), *bbox)]
    region = mask[bbox] if label is None else mask[bbox] | (label[bbox] != 0)
    try:
        x, stats = normalize_image(cropped, region, *normalization)
    except ValueError as e:
        raise DatasetError(f"{source}: {e}") from e
    shape = target_shape(cropped.shape[1:], spacing, target)
    axis = separate_z_axis(spacing, target)
    return PreparedImage(resample_image(x, shape, axis), bbox, shape, axis, stats)


def _case_arrays(ds: Dataset, case: Case,
                 normalization: tuple[Sequence[str], Sequence[dict | None], Sequence[bool]],
                 target: Sequence[float], *, label_in_mask: bool
                 ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One labelled case cropped, normalised, resampled to ``target``, with its distance map:
    the arrays (image, label, distance, context when present) and their metadata.
    ``label_in_mask``: the z-score mask also holds the labelled voxels (nnU-Net's training cases);
    False normalises as prediction does, from the image alone."""
    d = ds.load_case(case)
    if d.label is None:
        raise DatasetError(f"{case.images[0]}: case {case.id!r} has no label file")
    prep = prepare_image(d.image, d.spacing, target, normalization, case.images[0],
                         d.label if label_in_mask else None)
    bbox, shape, axis = prep.bbox, prep.shape, prep.separate_axis
    label = resample_labels(d.label[bbox], shape, axis)
    roi = _foreground(label, ds.ignore_label)
    arrays = {"image": prep.image, "label": label.astype(np.int16),
              "distance": _distance(roi, tuple(target))}
    if d.context is not None:
        arrays["context"] = resample_labels(d.context[bbox], shape, axis).astype(np.int16)
    meta = {
        "original_shape": list(d.label.shape),
        "original_spacing": list(d.spacing),
        "crop_bbox": [[s.start, s.stop] for s in bbox],
        "cropped_shape": [s.stop - s.start for s in bbox],
        "shape": list(shape),
        "separate_z_axis": axis,
        "classes": [int(x) for x in np.unique(label)],
        "roi_voxels": int(np.count_nonzero(roi)),
        "channel_stats": prep.stats,
    }
    return arrays, meta


def plan_normalization(plans: dict[str, Any]
                       ) -> tuple[tuple[str, ...], tuple[dict | None, ...], tuple[bool, ...]]:
    """``(schemes, ct_stats, use_mask)`` of a ``plans.json`` (plans before format 2, which always
    normalised z-score channels within the nonzero mask, give use_mask True)."""
    norm = plans["normalization"]
    return (tuple(n["scheme"] for n in norm),
            tuple(n if n["scheme"] == "ct" else None for n in norm),
            tuple(bool(n.get("use_mask_for_norm", True)) for n in norm))


def preprocess_held_out_case(dataset: Dataset, case: Case, plans: dict[str, Any]
                             ) -> PreprocessedCase:
    """A labelled held-out (test) case preprocessed in memory as the training cases of ``plans``
    were (their normalisation statistics and target spacing), except that its label does not
    enter the z-score mask: the image is normalised exactly as prediction normalises it.

    Raises:
        DatasetError: the case's files are invalid or it has no label.
    """
    target = tuple(float(s) for s in plans["target_spacing"])
    arrays, meta = _case_arrays(dataset, case, plan_normalization(plans), target,
                                label_in_mask=False)
    return PreprocessedCase(case.id, arrays["image"], arrays["label"], arrays["distance"],
                            arrays.get("context"), target, meta)


def _process_case(job: _Job) -> dict[str, Any]:
    arrays, meta = _case_arrays(job.dataset, job.case, job.normalization, job.target_spacing,
                                label_in_mask=True)
    files = _case_files(job.case.id, "context" in arrays)
    for k, arr in arrays.items():
        _save_npy(job.out_dir / files[k], arr)
    return {"files": files, **meta}


def _pool(num_workers: int, n_items: int) -> ProcessPoolExecutor | None:
    """A ``spawn`` process pool (fork is unsafe once torch has started its threads), or None."""
    if num_workers <= 0 or n_items <= 1:
        return None
    return ProcessPoolExecutor(max_workers=min(num_workers, n_items),
                               mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init)


def _map(fn: Callable[[Any], Any], items: Sequence[Any], pool: ProcessPoolExecutor | None,
         progress: bool, desc: str) -> list[Any]:
    """``[fn(x) for x in items]`` in order, serially or in ``pool``, with a progress bar. The
    first failure (in item order) is raised once the items already running have finished; the
    ones not started are cancelled."""
    bar = _progress(len(items), desc, progress)
    out: list[Any] = []
    try:
        if pool is None:
            for x in items:
                out.append(fn(x))
                bar.update(1)
            return out
        futures = [pool.submit(fn, x) for x in items]
        try:
            for f in futures:
                out.append(f.result())
                bar.update(1)
        except BaseException:
            for f in futures:
                f.cancel()
            wait(futures)
            raise
        return out
    finally:
        bar.close()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a declared dependency; tolerate its absence
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="case")


# -- the dataset ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreprocessedCase:
    """One preprocessed case (arrays memory-mapped read-only unless ``mmap=False``).

    Attributes:
        id: case id.
        image: float32 ``[C, *S]``, normalised, at ``spacing``.
        label: int16 ``[*S]``.
        distance: float32 ``[*S]``: mm to the nearest ROI voxel (label > 0, ignore excluded); +inf
            everywhere when the case has no ROI.
        context: int16 ``[*S]`` or None.
        spacing: the target spacing.
        meta: the case's entry in ``plans.json``.
    """

    id: str
    image: np.ndarray
    label: np.ndarray
    distance: np.ndarray
    context: np.ndarray | None
    spacing: tuple[float, ...]
    meta: dict[str, Any] = field(repr=False)


@dataclass
class PreprocessedDataset:
    """A preprocessed folder: ``plans.json`` and per-case ``.npy`` files.

    Attributes:
        root: the folder.
        plans: the parsed ``plans.json``.
        from_cache: True when :func:`preprocess_dataset` found the folder up to date and did
            nothing.
    """

    root: Path
    plans: dict[str, Any]
    from_cache: bool = False

    @property
    def case_ids(self) -> list[str]:
        return list(self.plans["cases"])

    @property
    def target_spacing(self) -> tuple[float, ...]:
        return tuple(self.plans["target_spacing"])

    @property
    def fingerprint(self) -> str:
        return str(self.plans["fingerprint"])

    def __len__(self) -> int:
        return len(self.plans["cases"])

    def __iter__(self) -> Iterator[str]:
        return iter(self.case_ids)

    def load_case(self, case_id: str, *, mmap: bool = True) -> PreprocessedCase:
        """Read one case's arrays (``mmap=True``: read-only memory maps)."""
        meta = self.plans["cases"][case_id]
        mode = "r" if mmap else None
        arr = {k: np.load(self.root / f, mmap_mode=mode, allow_pickle=False)
               for k, f in meta["files"].items()}
        return PreprocessedCase(case_id, arr["image"], arr["label"], arr["distance"],
                                arr.get("context"), self.target_spacing, meta)


def load_preprocessed(out_dir: str | os.PathLike[str]) -> PreprocessedDataset:
    """Open a folder written by :func:`preprocess_dataset`.

    Raises:
        FileNotFoundError: no ``plans.json`` (never preprocessed, or the last run failed) or a
            listed file is missing.
    """
    root = Path(out_dir)
    plans = json.loads((root / PLANS_NAME).read_text())
    missing = _missing_files(root, plans)
    if missing:
        raise FileNotFoundError(f"{root / missing[0]}: preprocessed file listed in "
                                f"{PLANS_NAME} is missing")
    return PreprocessedDataset(root, plans)


def _missing_files(root: Path, plans: dict[str, Any]) -> list[str]:
    return [f for meta in plans.get("cases", {}).values() for f in meta["files"].values()
            if not (root / f).is_file()]


def _input_files(ds: Dataset) -> Iterable[Path]:
    for c in ds.cases:
        yield from c.images
        if c.label is not None:
            yield c.label
        if c.context is not None:
            yield c.context


def compute_fingerprint(ds: Dataset, settings: dict[str, Any]) -> str:
    """SHA-256 of the format version, settings, dataset.json and every input file's relative
    path, size and mtime (ns)."""
    h = hashlib.sha256()
    h.update(json.dumps({"format_version": FORMAT_VERSION, "settings": settings,
                         "dataset_json": ds.json}, sort_keys=True, default=str).encode())
    for p in _input_files(ds):
        try:
            st = p.stat()
        except OSError as e:
            raise DatasetError(f"{p}: cannot stat input file ({e})") from e
        try:
            rel = str(p.relative_to(ds.root))
        except ValueError:
            rel = str(p)
        h.update(f"\n{rel}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _check_spacing(target: Sequence[float], ndim: int) -> tuple[float, ...]:
    try:
        t = tuple(float(s) for s in target)
    except (TypeError, ValueError) as e:
        raise ValueError(f"target_spacing must be a sequence of {ndim} floats, got "
                         f"{target!r}") from e
    if len(t) != ndim or not all(np.isfinite(s) and s > 0 for s in t):
        raise ValueError(f"target_spacing must be {ndim} finite values > 0 (one per spatial axis, "
                         f"array order), got {target!r}")
    return t


def preprocess_dataset(
    dataset: Dataset | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    target_spacing: Sequence[float] | None = None,
    modality: str | Sequence[str] | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> PreprocessedDataset:
    """Crop, normalise, resample and compute distance maps for every training case (see the module
    docstring for each step), caching the result in ``out_dir``.

    Args:
        dataset: a :class:`~colabx.data.datasets.Dataset` or a dataset folder.
        out_dir: output folder (created).
        target_spacing: mm per spatial axis in array order; default the per-axis median spacing.
        modality: overrides the channel names for choosing the normalisation (see
            :func:`normalization_schemes`).
        num_workers: 0 = serial; > 0 = that many worker processes.
        progress: show tqdm progress bars.

    Returns:
        The :class:`PreprocessedDataset` (``from_cache`` True when nothing had to be done).

    Raises:
        DatasetError: a case's files are invalid (the message names the file), or the dataset has
            no foreground anywhere. ``plans.json`` is then not written.
        ValueError: bad ``target_spacing`` or ``modality``.
    """
    ds = dataset if isinstance(dataset, Dataset) else load_dataset(dataset)
    out = Path(out_dir)
    schemes = normalization_schemes(ds.channel_names, modality)
    settings = {
        "target_spacing": None if target_spacing is None else [float(s) for s in target_spacing],
        "modality": modality if modality is None or isinstance(modality, str) else list(modality),
    }
    fingerprint = compute_fingerprint(ds, settings)
    plans_path = out / PLANS_NAME
    if plans_path.is_file():
        try:
            old = json.loads(plans_path.read_text())
        except (OSError, ValueError):
            old = None
        if (isinstance(old, dict) and old.get("fingerprint") == fingerprint
                and not _missing_files(out, old)):
            return PreprocessedDataset(out, old, from_cache=True)
    check_output_folder(out, PREPROCESSED_MARKER, "preprocessed dataset", accept=(PLANS_NAME,))
    # the options are checked against the data before anything is created
    spacings = [ds.header_spacing(c) for c in ds.cases]
    ndims = {len(s) for s in spacings}
    if len(ndims) != 1:
        raise DatasetError(f"{ds.root}: training cases mix 2D and 3D images "
                           f"({sorted(ndims)} spatial axes)")
    ndim = ndims.pop()
    median = tuple(float(x) for x in np.median(np.array(spacings, np.float64), axis=0))
    chosen = None if target_spacing is None else _check_spacing(target_spacing, ndim)

    created = mark_output_folder(out, PREPROCESSED_MARKER, {"dataset": str(ds.root)})
    try:
        return _preprocess_into(ds, out, schemes, settings, fingerprint, spacings, median,
                                chosen, num_workers, progress)
    except BaseException:
        if created is not None:  # a failed first run leaves no folder behind
            shutil.rmtree(created, ignore_errors=True)
        raise


def _preprocess_into(ds: Dataset, out: Path, schemes: tuple[str, ...], settings: dict[str, Any],
                     fingerprint: str, spacings: list[tuple[float, ...]],
                     median: tuple[float, ...], chosen: tuple[float, ...] | None,
                     num_workers: int, progress: bool) -> PreprocessedDataset:
    """The work of :func:`preprocess_dataset` once ``out`` is marked."""
    plans_path = out / PLANS_NAME
    remove_stale_temporaries(out, recursive=False)
    plans_path.unlink(missing_ok=True)  # from here on the folder is invalid until written anew

    ct_channels = tuple(i for i, s in enumerate(schemes) if s == "ct")
    ct_stats: list[dict[str, float] | None] = [None] * len(schemes)
    pool = _pool(num_workers, len(ds.cases))
    try:
        prints = _map(_case_fingerprint, [(ds, c, ct_channels) for c in ds.cases], pool,
                      progress, "dataset fingerprint")
        relative_size = float(np.median([f["relative_size"] for f in prints]))
        use_mask = tuple(s == "zscore" and relative_size < MASK_FOR_NORM_BELOW for s in schemes)
        target = chosen if chosen is not None else fullres_target_spacing(
            spacings, [f["cropped_shape"] for f in prints])
        for j, ch in enumerate(ct_channels):
            try:
                ct_stats[ch] = ct_statistics([f["ct"][j] for f in prints])
            except ValueError:
                raise DatasetError(f"{ds.root}: no foreground anywhere: CT normalisation needs "
                                   "foreground voxels (label > 0) in the training labels") from None
        del prints
        normalization = (schemes, tuple(ct_stats), use_mask)
        jobs = [_Job(ds, c, out, normalization, target) for c in ds.cases]
        metas = _map(_process_case, jobs, pool, progress, "preprocessing")
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if not any(m["roi_voxels"] for m in metas):
        raise DatasetError(f"{ds.root}: no foreground anywhere: every preprocessed training label "
                           "map is background only; nothing to segment")

    plans = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "settings": settings,
        "dataset": {"root": str(ds.root), "name": ds.name, "layout": ds.layout,
                    "channel_names": list(ds.channel_names), "labels": ds.labels,
                    "ignore_label": ds.ignore_label, "squeezed_axis": ds.squeezed_axis},
        "median_spacing": list(median),
        "target_spacing": list(target),
        "median_relative_size_after_cropping": relative_size,
        "normalization": [
            {"channel": i, "name": ds.channel_names[i], "scheme": s, "use_mask_for_norm": m,
             **({"percentiles": list(CT_PERCENTILES), **ct_stats[i]} if s == "ct" else {})}
            for i, (s, m) in enumerate(zip(schemes, use_mask, strict=True))
        ],
        "resampling": {
            "image": "scipy.ndimage.zoom order 3, grid_mode=True, mode='nearest', clipped to "
                     "the input's range",
            "label": "one-hot per class, order 1, each class where >= 0.5 in ascending order, "
                     "else 0 (nnU-Net's resize_segmentation)",
            "separate_z": "spacing or target anisotropic (> 3): within slices as above, "
                          "nearest neighbour across them",
            "shape": "round(shape * spacing / target_spacing)",
        },
        "distance": {"of": "label > 0 (ignore label excluded)", "units": "mm",
                     "dtype": "float32", "no_roi": "+inf everywhere"},
        "cases": {c.id: m for c, m in zip(ds.cases, metas, strict=True)},
    }
    text = json.dumps(plans, indent=1, allow_nan=False)
    atomic_write_text(plans_path, text)
    return PreprocessedDataset(out, plans)

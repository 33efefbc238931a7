"""Patch sampling from preprocessed cases (nnU-Net's uniform / foreground-oversampled patches).

``sample_patch(case, patch_size, rng, force_roi=...)`` cuts one patch out of a
:class:`~colabx.data.preprocessing.PreprocessedCase` (2D or 3D):

* **uniform** (``force_roi=False``): the patch start is uniform over the positions that keep the
  patch inside the volume; along an axis where the volume is smaller than the patch, the volume is
  centred in the patch (±½ voxel), as nnU-Net's ``get_bbox`` does.
* **ROI-forced** (``force_roi=True``): an ROI class present in the case is chosen uniformly, then
  one of its voxels uniformly (nnU-Net's class-balanced foreground oversampling); the patch is
  placed so that voxel lies at ``patch_size // 2 + offset``, ``offset`` uniform in
  ``[-(P // 4), P // 4]`` per axis (or given), so the ROI sits anywhere in the central half of the
  patch rather than always at its exact centre. A case without ROI falls back to uniform.

Voxel locations come from :func:`roi_locations`, a deterministic subsample of each class's
coordinates (at most ``max(10 000, 1 %)`` per class, like nnU-Net's ``class_locations``) computed
once per case (:class:`SamplingCase`), so each draw costs O(patch), not O(volume).

Where the patch leaves the volume it is padded: image 0 (the mean of normalised intensities, as
nnU-Net pads), label and context 0 (background), distance by **edge replication**. Distance is
replicated, not set to 0 or +inf, because a constant would invent structure: 0 would make the
padding ROI-adjacent (the CoLab soft mask M would be 1 there) and +inf would make it infinitely
far even right next to an ROI touching the border (a jump in M). Replication keeps the map
continuous; it underestimates the true distance of padded voxels by at most their distance to
the border, which the soft mask treats as "near the ROI" only when the ROI is near that border.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from colabx.data.preprocessing import PreprocessedCase

__all__ = ["SamplingCase", "as_patch_size", "roi_locations", "sample_patch"]

#: Per class, keep max(min(n, MAX_LOCATIONS), ceil(MIN_COVERAGE * n)) of its n voxels (nnU-Net).
MAX_LOCATIONS = 10_000
MIN_COVERAGE = 0.01
#: The subsample is a fixed function of the label map, identical in every process.
_LOCATION_SEED = 1234


def roi_locations(label: np.ndarray, ignore_label: int | None = None) -> dict[int, np.ndarray]:
    """Deterministic subsample of the flat indices of each ROI class's voxels.

    Args:
        label: integer label map ``[*S]`` (a memory map is read once).
        ignore_label: a label value that is not ROI (nnU-Net's ``ignore``), or None.

    Returns:
        ROI class value (> 0, not ``ignore_label``) → sorted int64 flat indices into ``label``:
        all of them when the class has at most 10 000 voxels, else ``max(10 000, ceil(1 % of
        n))`` drawn without replacement by a fixed-seed generator. Empty dict when no ROI.
    """
    flat = np.asarray(label).reshape(-1)
    fg = flat > 0
    if ignore_label is not None:
        fg &= flat != ignore_label
    idx = np.flatnonzero(fg)
    values = flat[idx]
    rng = np.random.default_rng(_LOCATION_SEED)
    out: dict[int, np.ndarray] = {}
    for c in np.unique(values):
        sel = idx[values == c]
        n = max(min(sel.size, MAX_LOCATIONS), int(np.ceil(MIN_COVERAGE * sel.size)))
        if n < sel.size:
            sel = np.sort(rng.choice(sel, n, replace=False))
        out[int(c)] = sel.astype(np.int64, copy=False)
    return out


@dataclass(frozen=True)
class SamplingCase:
    """A case ready for repeated sampling: its (memory-mapped) arrays and its ROI locations.

    Build it with :meth:`from_case` once per case and process; pickling it carries the arrays,
    so worker processes should build their own (see :mod:`colabx.data.loader`).
    """

    case: PreprocessedCase
    locations: dict[int, np.ndarray] = field(repr=False)

    @classmethod
    def from_case(cls, case: PreprocessedCase, ignore_label: int | None = None) -> SamplingCase:
        """Wrap ``case``, reading its label map once for :func:`roi_locations`."""
        return cls(case, roi_locations(case.label, ignore_label))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.case.label.shape)

    @property
    def has_roi(self) -> bool:
        return bool(self.locations)


def as_patch_size(patch_size: int | Sequence[int], ndim: int,
                  name: str = "patch_size") -> tuple[int, ...]:
    """``patch_size`` as ``ndim`` positive ints (a single int applies to every axis)."""
    if isinstance(patch_size, (int, np.integer)) and not isinstance(patch_size, bool):
        patch_size = (int(patch_size),) * ndim
    try:
        p = tuple(int(n) for n in patch_size)  # type: ignore[union-attr]
        ok = len(p) == ndim and all(n >= 1 and n == m for n, m in zip(p, patch_size, strict=True))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be {ndim} positive integers (one per spatial axis), "
                         f"got {patch_size!r}")
    return p


def _uniform_start(shape: Sequence[int], size: Sequence[int],
                   rng: np.random.Generator) -> list[int]:
    starts = []
    for n, p in zip(shape, size, strict=True):
        need = max(0, p - n)
        lo = -((need + 1) // 2)
        hi = n - p + (need + 1) // 2
        starts.append(int(rng.integers(lo, hi + 1)))
    return starts


def _crop(arr: np.ndarray, start: Sequence[int], size: Sequence[int],
          pad: float | str) -> np.ndarray:
    """``arr[..., start:start+size]`` over the trailing axes, padded outside with the constant
    ``pad`` or, for ``pad="edge"``, by replicating the border. Always a new C-contiguous array."""
    lead = arr.shape[: arr.ndim - len(size)]
    shape = arr.shape[arr.ndim - len(size):]
    src, dst, widths = [], [], []
    for s, p, n in zip(start, size, shape, strict=True):
        a, b = max(s, 0), min(s + p, n)
        if a >= b:
            raise AssertionError(f"patch [{s}, {s + p}) misses the axis of length {n}")
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
        widths.append((a - s, s + p - b))
    inner = arr[(..., *src)]
    if not any(w != (0, 0) for w in widths):
        return np.array(inner, order="C")  # one copy out of the memory map
    if pad == "edge":
        return np.pad(inner, [(0, 0)] * len(lead) + widths, mode="edge")
    out = np.full((*lead, *size), pad, dtype=arr.dtype)
    out[(..., *dst)] = inner
    return out


def sample_patch(
    case: PreprocessedCase | SamplingCase,
    patch_size: int | Sequence[int],
    rng: np.random.Generator,
    *,
    force_roi: bool,
    roi_offset: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """One patch of a preprocessed case, uniform or centred on an ROI voxel (module docstring).

    Args:
        case: a :class:`SamplingCase` (ROI locations precomputed; use this to sample repeatedly)
            or a :class:`PreprocessedCase` (its locations are computed on each call, O(volume)).
        patch_size: ``P``, one size per spatial axis (or one int); larger than the volume is fine.
        rng: the only source of randomness.
        force_roi: centre the patch on an ROI voxel (uniform when the case has no ROI).
        roi_offset: with ``force_roi``, where the ROI voxel goes relative to ``P // 2``; default
            uniform in ``[-(P // 4), P // 4]`` per axis.

    Returns:
        ``image`` float32 ``[C, *P]``, ``label`` ``[*P]`` and ``context`` ``[*P]`` (the case's
        integer dtype; ``context`` only when the case has one), ``distance`` float32 ``[*P]``;
        new arrays (never views of the memory maps). Padding as in the module docstring.
    """
    if not isinstance(case, SamplingCase):
        if not isinstance(case, PreprocessedCase):
            raise TypeError(f"case must be a PreprocessedCase or SamplingCase, got "
                            f"{type(case).__name__}")
        case = SamplingCase.from_case(case)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    shape = case.shape
    size = as_patch_size(patch_size, len(shape))
    if force_roi and case.has_roi:
        classes = sorted(case.locations)
        locs = case.locations[classes[int(rng.integers(len(classes)))]]
        voxel = np.unravel_index(int(locs[int(rng.integers(locs.size))]), shape)
        if roi_offset is None:
            offset = [int(rng.integers(-(p // 4), p // 4 + 1)) for p in size]
        else:
            offset = [int(o) for o in roi_offset]
            if len(offset) != len(shape) or not all(
                    -(p // 2) <= o < p - p // 2 for o, p in zip(offset, size, strict=True)):
                raise ValueError(f"roi_offset must be {len(shape)} ints o with -(P // 2) <= o < "
                                 f"P - P // 2 (inside the patch), got {roi_offset!r}")
        start = [int(v) - p // 2 - o for v, p, o in zip(voxel, size, offset, strict=True)]
    else:
        start = _uniform_start(shape, size, rng)
    c = case.case
    out = {
        "image": _crop(c.image, start, size, 0.0).astype(np.float32, copy=False),
        "label": _crop(c.label, start, size, 0),
        "distance": _crop(c.distance, start, size, "edge").astype(np.float32, copy=False),
    }
    if c.context is not None:
        out["context"] = _crop(c.context, start, size, 0)
    return out

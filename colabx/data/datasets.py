"""Readers for the nnU-Net v2 raw layout and the Medical Segmentation Decathlon (MSD) layout.

``load_dataset(path)`` reads ``dataset.json``, detects the layout, lists the cases and checks
what can be checked without reading voxels (keys, file endings, files present, channel counts,
paths inside the dataset folder, a non-empty training set). ``Dataset.load_case(case)`` reads one
case and checks the voxels (readable, shapes, geometry, finite images, integer labels declared in
``dataset.json``). Every problem raises :class:`DatasetError` (a ``ValueError``) naming the file.

Layouts:

* **nnU-Net v2 raw**: ``dataset.json`` with ``channel_names`` (``{"0": "CT", ...}``), ``labels``
  (name → int, background 0), ``numTraining`` and ``file_ending``; images
  ``imagesTr/{case}_{XXXX}{file_ending}`` (one 3D file per channel), labels
  ``labelsTr/{case}{file_ending}``; ``imagesTs/`` (and ``labelsTs/``) when present; optional manual
  context maps ``contextTr/{case}{file_ending}`` (when the folder exists, every training case must
  have one). An explicit ``"dataset"`` entry (case → ``{"images": [...], "label": ...}``, paths
  relative to the dataset folder), as nnU-Net v2 allows, replaces the folder scan for training.
* **MSD**: ``dataset.json`` with ``modality`` (``{"0": "FLAIR", ...}``), ``labels``
  (``{"0": "background", ...}``), ``training`` (list of ``{"image", "label"}`` relative paths) and
  optionally ``test`` (list of paths). Images are 3D (one channel) or 4D with channels last
  (``[X, Y, Z, C]``); they are returned channel-first. nnU-Net v1 folders (same ``dataset.json``
  but images split into ``{case}_{XXXX}.nii.gz``) are read too.

File formats and axis order: see :mod:`colabx.data.image_io` (NIfTI; ``.nrrd`` and ``.mha`` with
SimpleITK; nibabel's axis order is kept, spacing in the same order).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from colabx.data.image_io import (
    IMAGE_ENDINGS,
    SITK_ENDINGS,
    DatasetError,
    Volume,
    image_ending,
    read_geometry,
    read_image,
    read_label_map,
    require_sitk,
)

__all__ = [
    "Case",
    "CaseData",
    "Dataset",
    "DatasetError",
    "check_foreground",
    "check_same_grid",
    "load_dataset",
    "scan_images",
]

#: Differences (mm) between two files' spacing or affine entries up to this pass silently.
GEOMETRY_TOLERANCE_MM = 1e-4
#: Larger differences up to this fraction of the smallest voxel spacing warn and the files are
#: taken as one grid (annotation tools often save labels with such drift; nnU-Net only warns
#: about affines); beyond it they are an error.
GEOMETRY_WARN_VOXELS = 0.01
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class Case:
    """One case's files.

    Attributes:
        id: the case identifier (file name without channel suffix and ending).
        images: one path per channel in channel order, or a single 4D file holding all channels
            (MSD).
        label: the label map, or None (test cases without labels).
        context: the manual context label map (``contextTr/``), or None.
    """

    id: str
    images: tuple[Path, ...]
    label: Path | None = None
    context: Path | None = None


@dataclass(frozen=True)
class CaseData:
    """One case's voxels, as returned by :meth:`Dataset.load_case`.

    Attributes:
        image: ``float32 [C, *S]``, channels in ``Dataset.channel_names`` order.
        label: ``int16 [*S]`` or None when the case has no label.
        spacing: voxel size in mm per spatial axis, in array axis order.
        affine: 4×4 voxel-to-world affine of the first image file.
        context: ``int16 [*S]`` manual context map or None.
    """

    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, ...]
    affine: np.ndarray
    context: np.ndarray | None = None


@dataclass
class Dataset:
    """A dataset read by :func:`load_dataset`.

    Attributes:
        root: the dataset folder.
        layout: ``"nnunet"`` or ``"msd"``.
        name: ``dataset.json``'s ``name`` (or the folder name).
        channel_names: channel names in channel order.
        labels: label name → integer value (background is 0).
        file_ending: one of :data:`~colabx.data.image_io.IMAGE_ENDINGS`.
        cases: the training cases, sorted by id.
        test_cases: the test cases (``imagesTs``), sorted by id; labels only with ``labelsTs``.
        ignore_label: nnU-Net's ``"ignore"`` label value, or None.
        json: the parsed ``dataset.json``.
        squeezed_axis: 2D data stored in 3D files (nnU-Net's 2D layout, shape ``(1, X, Y)`` or
            ``(X, Y, 1)``): the spatial axis of size 1 in every training image, which reading
            drops, so that the data is 2D from there on (nnU-Net plans only its 2D
            configuration for such data); None for 2D and 3D data.
    """

    root: Path
    layout: str
    name: str
    channel_names: tuple[str, ...]
    labels: dict[str, int]
    file_ending: str
    cases: list[Case]
    test_cases: list[Case] = field(default_factory=list)
    ignore_label: int | None = None
    json: dict[str, Any] = field(default_factory=dict, repr=False)
    squeezed_axis: int | None = None

    @property
    def num_channels(self) -> int:
        """Number of image channels."""
        return len(self.channel_names)

    @property
    def _channels_source(self) -> str:
        """Who declares the channels, for error messages: dataset.json, or (for the reader
        prediction builds from a model's plans, which has no dataset.json) the model."""
        return "dataset.json declares" if self.json else "the model was trained with"

    @property
    def label_values(self) -> frozenset[int]:
        """Integer values allowed in label maps."""
        return frozenset(self.labels.values())

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self) -> Iterator[Case]:
        return iter(self.cases)

    def __getitem__(self, case_id: str) -> Case:
        for c in (*self.cases, *self.test_cases):
            if c.id == case_id:
                return c
        raise KeyError(case_id)

    # -- voxels -------------------------------------------------------------------------------

    def load_image(self, case: Case) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
        """Read a case's image channels.

        Returns:
            ``(image float32 [C, *S], spacing, affine)``.

        Raises:
            DatasetError: unreadable file, wrong channel count, shape or geometry mismatch between
                channels, NaN/inf voxels.
        """
        vols = [read_image(p, "image") for p in case.images]
        c = self.num_channels
        if len(vols) == 1 and vols[0].data.ndim == 4:
            v = vols[0]
            if v.data.shape[3] != c:
                raise DatasetError(
                    f"{v.path}: image has {v.data.shape[3]} channels (4D shape "
                    f"{v.data.shape}) but {self._channels_source} {c}: "
                    f"{', '.join(self.channel_names)}"
                )
            channels = [np.asarray(v.data[..., i], dtype=np.float32) for i in range(c)]
            paths = [v.path] * c
        else:
            if len(vols) != c:
                kind = (f"is {vols[0].data.ndim}D (one channel)" if len(vols) == 1
                        else f"has {len(vols)} channel files")
                raise DatasetError(
                    f"{case.images[0]}: image of case {case.id!r} {kind} but "
                    f"{self._channels_source} {c} channel(s)"
                )
            for v in vols:
                if v.data.ndim not in (2, 3):
                    raise DatasetError(
                        f"{v.path}: expected a 2D or 3D image channel, got shape {v.data.shape}"
                    )
            channels = [np.asarray(v.data, dtype=np.float32) for v in vols]
            paths = [v.path for v in vols]
        ref = vols[0]
        for v in vols[1:]:
            check_same_grid(ref, v, "image channel")
        for i, (ch, p) in enumerate(zip(channels, paths, strict=True)):
            bad = ch.size - int(np.count_nonzero(np.isfinite(ch)))
            if bad:
                where = f" in channel {i} ({self.channel_names[i]})" if c > 1 else ""
                raise DatasetError(f"{p}: image has {bad} non-finite voxel(s) (NaN or inf){where}")
        image, spacing = self._squeezed(np.stack(channels), ref.spacing, ref.path, "image", 1)
        return image, spacing, ref.affine

    def header_spacing(self, case: Case) -> tuple[float, ...]:
        """The spacing :meth:`load_image` returns for ``case``, from its first file's header."""
        spacing = read_geometry(case.images[0], "image")[1]
        a = self.squeezed_axis
        return spacing if a is None or len(spacing) != 3 else spacing[:a] + spacing[a + 1:]

    def load_label(self, case: Case, *, context: bool = False) -> np.ndarray | None:
        """Read and validate a case's label map (or its context map with ``context=True``).

        Returns:
            ``int16 [*S]``, or None when the case has no such file.

        Raises:
            DatasetError: unreadable file, non-integer values, values not in dataset.json.
        """
        vol = self._read_label_volume(case, context=context)
        return None if vol is None else vol.data

    def _read_label_volume(self, case: Case, *, context: bool) -> Volume | None:
        path = case.context if context else case.label
        if path is None:
            return None
        # Context maps hold their own classes (organs, structures): any non-negative integers.
        if context:
            vol = read_label_map(path, "context")
        else:
            vol = read_label_map(path, "label", self.label_values, "dataset.json labels")
        data, spacing = self._squeezed(vol.data, vol.spacing, vol.path, "context" if context
                                       else "label")
        return Volume(data, spacing, vol.affine, vol.path)

    def _squeezed(self, data: np.ndarray, spacing: tuple[float, ...], path: Path, what: str,
                  lead: int = 0) -> tuple[np.ndarray, tuple[float, ...]]:
        """``data`` (``lead`` leading non-spatial axes) and ``spacing`` without
        :attr:`squeezed_axis`."""
        a = self.squeezed_axis
        if a is None:
            return data, spacing
        if data.ndim - lead != 3 or data.shape[lead + a] != 1:
            raise DatasetError(
                f"{path}: {what} of spatial shape {data.shape[lead:]} is not 2D stored as 3D "
                f"(size 1 along axis {a}), as every training image of this dataset is")
        return np.squeeze(data, axis=lead + a), spacing[:a] + spacing[a + 1:]

    def load_case(self, case: Case | str) -> CaseData:
        """Read one case: image, label (and context map when present), spacing and affine.

        Args:
            case: a :class:`Case` of this dataset or its id.

        Raises:
            DatasetError: any problem with the case's files (see the module docstring).
        """
        if isinstance(case, str):
            case = self[case]
        image, spacing, affine = self.load_image(case)
        ref = Volume(image[0], spacing, affine, case.images[0])
        out: dict[str, np.ndarray | None] = {}
        for key, is_ctx in (("label", False), ("context", True)):
            vol = self._read_label_volume(case, context=is_ctx)
            if vol is not None:
                if vol.data.shape != ref.data.shape:
                    raise DatasetError(
                        f"{vol.path}: {key} shape {vol.data.shape} differs from image shape "
                        f"{ref.data.shape} ({ref.path})"
                    )
                check_same_grid(ref, vol, key)
            out[key] = None if vol is None else vol.data
        return CaseData(image=image, label=out["label"], spacing=spacing, affine=affine,
                        context=out["context"])


def check_same_grid(ref: Volume, other: Volume, what: str) -> None:
    """Raise unless ``other`` has ``ref``'s shape, and its spacing and affine within
    :data:`GEOMETRY_WARN_VOXELS` of ``ref``'s smallest voxel spacing; warn for differences over
    :data:`GEOMETRY_TOLERANCE_MM` that are within it."""
    rs, os_ = ref.data.shape[:3], other.data.shape[:3]
    if rs != os_:
        raise DatasetError(f"{other.path}: {what} shape {os_} differs from {ref.path} shape {rs}")
    limit = max(GEOMETRY_TOLERANCE_MM, GEOMETRY_WARN_VOXELS * min(ref.spacing))
    tolerance = f"tolerance {limit:.3g} mm, {GEOMETRY_WARN_VOXELS:.0%} of a voxel"
    ds = np.abs(np.subtract(ref.spacing, other.spacing)).max()
    if ds > limit:
        raise DatasetError(
            f"{other.path}: {what} spacing {other.spacing} differs from {ref.path} spacing "
            f"{ref.spacing} by {ds:.3g} mm ({tolerance})"
        )
    da = np.abs(ref.affine - other.affine).max()
    if da > limit:
        raise DatasetError(
            f"{other.path}: {what} affine differs from {ref.path} affine by {da:.3g} mm "
            f"({tolerance}); origin/orientation mismatch"
        )
    if max(ds, da) > GEOMETRY_TOLERANCE_MM:
        warnings.warn(f"{other.path}: {what} geometry differs from {ref.path} by "
                      f"{max(ds, da):.3g} mm, under {GEOMETRY_WARN_VOXELS:.0%} of a voxel: "
                      "taken as the same grid", RuntimeWarning, stacklevel=2)


# -- dataset.json ---------------------------------------------------------------------------------


def _read_json(root: Path) -> dict[str, Any]:
    path = root / "dataset.json"
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist")
    if not path.is_file():
        raise DatasetError(f"{path}: dataset.json is missing (expected nnU-Net v2 or MSD layout)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read dataset.json ({e})") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") \
            from e
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: invalid dataset.json: top level must be an object")
    return data


def _require(js: dict[str, Any], keys: Sequence[str], path: Path, layout: str) -> None:
    missing = [k for k in keys if k not in js]
    if missing:
        raise DatasetError(
            f"{path}: dataset.json ({layout} layout) is missing required key(s) {missing}"
        )


def _index_map(obj: Any, key: str, path: Path) -> tuple[str, ...]:
    """``{"0": "CT", "1": "PET"}`` → ``("CT", "PET")``; keys must be 0..n-1."""
    if not isinstance(obj, dict) or not obj:
        raise DatasetError(f"{path}: dataset.json {key!r} must be a non-empty object "
                           '{"0": name, ...}')
    try:
        idx = {int(k): str(v) for k, v in obj.items()}
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{path}: dataset.json {key!r} keys must be channel indices "
                           f"'0', '1', ...; got {list(obj)}") from e
    if sorted(idx) != list(range(len(idx))):
        raise DatasetError(f"{path}: dataset.json {key!r} keys must be 0..{len(idx) - 1}; "
                           f"got {sorted(idx)}")
    return tuple(idx[i] for i in range(len(idx)))


def _check_labels(labels: dict[str, int], path: Path) -> None:
    if 0 not in labels.values():
        raise DatasetError(f"{path}: dataset.json labels {labels} have no background (value 0)")
    if any(v < 0 for v in labels.values()):
        raise DatasetError(f"{path}: dataset.json labels {labels} must be >= 0")
    # nnU-Net v2's rule: the network has one output per value up to the largest, so a gap would
    # be a class that dataset.json does not declare (trained, scored and averaged all the same)
    values = sorted(labels.values())
    if values != list(range(len(values))):
        missing = sorted(set(range(values[-1] + 1)) - set(values))
        repeated = sorted({v for v in values if values.count(v) > 1})
        what = f"missing {missing}" if missing else f"repeated {repeated}"
        raise DatasetError(f"{path}: dataset.json labels {labels} must take the values 0, 1, "
                           f"..., N-1 once each, as nnU-Net v2 requires ({what}); renumber the "
                           "label maps and dataset.json")
    ignore = labels.get("ignore")
    if ignore is not None and ignore != values[-1]:
        raise DatasetError(f"{path}: dataset.json's ignore label ({ignore}) must be the largest "
                           f"label value ({values[-1]}), as nnU-Net v2 requires")


def _nnunet_labels(obj: Any, path: Path) -> tuple[dict[str, int], int | None]:
    if not isinstance(obj, dict) or not obj:
        raise DatasetError(f"{path}: dataset.json 'labels' must be a non-empty object name → int")
    labels: dict[str, int] = {}
    for name, v in obj.items():
        if isinstance(v, (list, tuple)):
            raise DatasetError(f"{path}: dataset.json label {name!r} is a region {v}; region-based "
                               "labels are not supported")
        if isinstance(v, bool) or not isinstance(v, int):
            raise DatasetError(f"{path}: dataset.json label {name!r} must map to an integer, "
                               f"got {v!r} (nnU-Net v2 labels are name → int)")
        labels[str(name)] = v
    _check_labels(labels, path)
    ignore = labels.get("ignore")
    return labels, ignore


def _msd_labels(obj: Any, path: Path) -> dict[str, int]:
    if not isinstance(obj, dict) or not obj:
        raise DatasetError(f"{path}: dataset.json 'labels' must be a non-empty object "
                           '{"0": "background", ...}')
    labels: dict[str, int] = {}
    for k, name in obj.items():
        try:
            labels[str(name)] = int(k)
        except (TypeError, ValueError) as e:
            raise DatasetError(f"{path}: dataset.json MSD labels map integer strings to names; "
                               f"key {k!r} is not an integer") from e
    _check_labels(labels, path)
    return labels


def _inside(root: Path, rel: Any, path: Path, what: str) -> Path:
    """Resolve a dataset.json path entry; refuse absolute paths and paths leaving ``root``.

    The check is lexical (``..`` components), so symlinked files inside the folder are allowed.
    """
    if not isinstance(rel, str) or not rel:
        raise DatasetError(f"{path}: dataset.json {what} entry {rel!r} must be a non-empty path")
    if os.path.isabs(rel) or re.match(r"^[A-Za-z]:[\\/]", rel):
        raise DatasetError(f"{path}: dataset.json {what} entry {rel!r} is an absolute path; "
                           "entries must be relative to the dataset folder")
    norm = os.path.normpath(rel)
    if norm == ".." or norm.startswith(".." + os.sep) or norm.startswith("../"):
        raise DatasetError(f"{path}: dataset.json {what} entry {rel!r} points outside the "
                           f"dataset folder {root}")
    return root / norm


def _check_ending(p: Path, ending: str, what: str) -> None:
    if not p.name.endswith(ending):
        raise DatasetError(f"{p}: {what} file has the wrong file ending (expected {ending!r})")


def _check_num_training(js: dict[str, Any], n: int, path: Path) -> None:
    if "numTraining" not in js:
        return
    nt = js["numTraining"]
    if isinstance(nt, bool) or not isinstance(nt, int):
        raise DatasetError(f"{path}: dataset.json numTraining must be an integer, got {nt!r}")
    if nt != n:
        raise DatasetError(f"{path}: dataset.json numTraining is {nt} but {n} training case(s) "
                           "were found")


# -- nnU-Net v2 -----------------------------------------------------------------------------------


def scan_images(folder: Path, ending: str, n_channels: int,
                declared_by: str = "dataset.json declares", whole_files: bool = False
                ) -> dict[str, tuple[Path, ...]]:
    """Group ``{case}_{XXXX}{ending}`` files of ``folder`` by case, checking channels
    (``declared_by`` says, in error messages, where the channel count comes from).

    Files that are no image (a README, a CSV, notes) are left out, as nnU-Net leaves out files
    without the dataset's ending; an image of another ending is an error (nnU-Net would skip the
    case silently). ``whole_files`` (a folder of images to predict): a file whose name has no
    4-digit channel suffix is one whole case (MSD-named, ``{case}{ending}``: a 3D image of one
    channel, or a 4D image holding the channels, checked when it is read) instead of an
    error."""
    groups: dict[str, dict[int, Path]] = {}
    whole: dict[str, tuple[Path, ...]] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.is_dir():
            continue
        if image_ending(p) is None:
            continue
        if not p.name.endswith(ending):
            expected = f"expected {ending!r}" if whole_files else \
                f"dataset.json file_ending is {ending!r}"
            raise DatasetError(f"{p}: image file has the wrong file ending ({expected})")
        m = _CHANNEL_RE.match(p.name[: -len(ending)])
        if m is not None:
            groups.setdefault(m["case"], {})[int(m["channel"])] = p
        elif whole_files:
            whole[p.name[: -len(ending)]] = (p,)
        else:
            raise DatasetError(f"{p}: image file name must be {{case}}_{{XXXX}}{ending} "
                               "(4-digit channel index)")
    out: dict[str, tuple[Path, ...]] = {}
    for case, chans in groups.items():
        want = list(range(n_channels))
        if sorted(chans) != want:
            missing = [folder / f"{case}_{i:04d}{ending}" for i in want if i not in chans]
            extra = [chans[i].name for i in sorted(chans) if i >= n_channels]
            detail = (f"missing {', '.join(str(m) for m in missing)}" if missing
                      else f"unexpected {extra}")
            hint = (f" (a name ending in _XXXX is channel XXXX of a case; a single-file case "
                    f"must be named otherwise, e.g. {case}_{min(chans):03d}{ending})"
                    if whole_files and missing else "")
            raise DatasetError(f"{folder}: case {case!r} has channel files {sorted(chans)} but "
                               f"{declared_by} {n_channels} channel(s): {detail}{hint}")
        out[case] = tuple(chans[i] for i in want)
    for case, paths in whole.items():
        if case in out:
            raise DatasetError(f"{paths[0]}: case {case!r} is both a whole image file and "
                               f"channel files {case}_XXXX{ending}; keep one of them")
        out[case] = paths
    if groups and whole:  # e.g. a label map copied among the images
        names = sorted(p[0].name for p in whole.values())
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        warnings.warn(f"{folder}: besides {{case}}_XXXX{ending} channel files it holds "
                      f"{len(names)} file(s) without a channel suffix ({shown}), each predicted "
                      "as a single-file case", RuntimeWarning, stacklevel=2)
    return out


def _scan_labels(folder: Path, ending: str, what: str) -> dict[str, Path]:
    """``{case}{ending}`` files of ``folder`` by case; files that are no image are left out."""
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.is_dir() or image_ending(p) is None:
            continue
        _check_ending(p, ending, what)
        out[p.name[: -len(ending)]] = p
    return out


def _nnunet_split(root: Path, img_dir: str, lbl_dir: str, ctx_dir: str | None, ending: str,
                  n_channels: int, need_labels: bool) -> list[Case]:
    images = scan_images(root / img_dir, ending, n_channels) if (root / img_dir).is_dir() else {}
    labels = _scan_labels(root / lbl_dir, ending, "label") if (root / lbl_dir).is_dir() else None
    if labels is None and need_labels and images:
        raise DatasetError(f"{root / lbl_dir}: label folder is missing")
    contexts = None
    if ctx_dir is not None and (root / ctx_dir).is_dir():
        contexts = _scan_labels(root / ctx_dir, ending, "context")
    cases = []
    for cid, paths in sorted(images.items()):
        label = None
        if labels is not None:
            if cid not in labels:
                raise DatasetError(f"{root / lbl_dir / (cid + ending)}: label file is missing "
                                   f"for case {cid!r}")
            label = labels[cid]
        ctx = None
        if contexts is not None:
            if cid not in contexts:
                raise DatasetError(f"{root / ctx_dir / (cid + ending)}: context file is missing "
                                   f"for case {cid!r} ({ctx_dir}/ exists, so every case needs one)")
            ctx = contexts[cid]
        cases.append(Case(cid, paths, label, ctx))
    for name, found in ((lbl_dir, labels), (ctx_dir, contexts)):
        for cid in sorted(set(found or ()) - set(images)):
            raise DatasetError(f"{found[cid]}: {name} file has no image files "
                               f"({root / img_dir / (cid + '_0000' + ending)} missing)")
    return cases


def _nnunet_explicit(root: Path, js: dict[str, Any], path: Path, ending: str,
                     n_channels: int) -> list[Case]:
    entries = js["dataset"]
    if not isinstance(entries, dict):
        raise DatasetError(f"{path}: dataset.json 'dataset' must be an object case → "
                           '{"images": [...], "label": ...}')
    cases = []
    for cid, e in sorted(entries.items()):
        if not isinstance(e, dict) or "images" not in e or "label" not in e:
            raise DatasetError(f"{path}: dataset.json 'dataset' entry {cid!r} needs 'images' and "
                               "'label'")
        imgs = e["images"] if isinstance(e["images"], list) else [e["images"]]
        ims = tuple(_inside(root, r, path, f"case {cid!r} image") for r in imgs)
        if len(ims) != n_channels:
            raise DatasetError(f"{path}: dataset.json case {cid!r} lists {len(ims)} image(s) but "
                               f"{n_channels} channel(s) are declared")
        lbl = _inside(root, e["label"], path, f"case {cid!r} label")
        for p in (*ims, lbl):
            _check_ending(p, ending, "dataset.json entry")
            if not p.is_file():
                raise DatasetError(f"{p}: file listed for case {cid!r} in dataset.json is missing")
        cases.append(Case(str(cid), ims, lbl))
    return cases


def _load_nnunet(root: Path, js: dict[str, Any]) -> Dataset:
    path = root / "dataset.json"
    _require(js, ["channel_names", "labels", "numTraining", "file_ending"], path, "nnU-Net v2")
    channels = _index_map(js["channel_names"], "channel_names", path)
    labels, ignore = _nnunet_labels(js["labels"], path)
    ending = js["file_ending"]
    if ending not in IMAGE_ENDINGS:
        raise DatasetError(f"{path}: dataset.json file_ending {ending!r} is not supported "
                           f"(colabx reads {', '.join(IMAGE_ENDINGS)})")
    if ending in SITK_ENDINGS:
        require_sitk(path)
    if "dataset" in js:
        cases = _nnunet_explicit(root, js, path, ending, len(channels))
    else:
        cases = _nnunet_split(root, "imagesTr", "labelsTr", "contextTr", ending, len(channels),
                              need_labels=True)
    if not cases:
        raise DatasetError(f"{root / 'imagesTr'}: empty dataset: no training cases "
                           f"({{case}}_0000{ending} files) found")
    _check_num_training(js, len(cases), path)
    test = _nnunet_split(root, "imagesTs", "labelsTs", None, ending, len(channels),
                         need_labels=False)
    return Dataset(root=root, layout="nnunet", name=str(js.get("name", root.name)),
                   channel_names=channels, labels=labels, file_ending=ending, cases=cases,
                   test_cases=test, ignore_label=ignore, json=js,
                   squeezed_axis=singleton_axis(cases))


# -- MSD ------------------------------------------------------------------------------------------


def _msd_images(root: Path, rel: Any, path: Path, n_channels: int, what: str) -> tuple[Path, ...]:
    """An MSD image entry: one (3D or 4D) file, or nnU-Net v1's split ``_XXXX`` channel files."""
    p = _inside(root, rel, path, what)
    ending = image_ending(p)
    if ending is None:
        raise DatasetError(f"{p}: {what} has the wrong file ending (expected one of "
                           f"{', '.join(IMAGE_ENDINGS)})")
    if p.is_file():
        return (p,)
    stem = p.name[: -len(ending)]
    split = tuple(p.with_name(f"{stem}_{i:04d}{ending}") for i in range(n_channels))
    if split[0].is_file():  # nnU-Net v1 layout
        for s in split:
            if not s.is_file():
                raise DatasetError(f"{s}: image channel file is missing ({n_channels} channel(s) "
                                   "declared in dataset.json modality)")
        return split
    raise DatasetError(f"{p}: image file listed in dataset.json is missing")


def _case_id(p: Path) -> str:
    ending = image_ending(p)
    return p.name[: -len(ending)] if ending else p.stem


def _load_msd(root: Path, js: dict[str, Any]) -> Dataset:
    path = root / "dataset.json"
    _require(js, ["modality", "labels", "training"], path, "MSD")
    channels = _index_map(js["modality"], "modality", path)
    labels = _msd_labels(js["labels"], path)
    training = js["training"]
    if not isinstance(training, list):
        raise DatasetError(f"{path}: dataset.json 'training' must be a list of "
                           '{"image": ..., "label": ...}')
    if not training:
        raise DatasetError(f"{path}: empty dataset: dataset.json 'training' lists no cases")
    cases: list[Case] = []
    for i, e in enumerate(training):
        if not isinstance(e, dict) or "image" not in e or "label" not in e:
            raise DatasetError(f"{path}: dataset.json training[{i}] must be an object with "
                               f"'image' and 'label', got {e!r}")
        ims = _msd_images(root, e["image"], path, len(channels), f"training[{i}] image")
        lbl = _inside(root, e["label"], path, f"training[{i}] label")
        if image_ending(lbl) is None:
            raise DatasetError(f"{lbl}: label file has the wrong file ending (expected one of "
                               f"{', '.join(IMAGE_ENDINGS)})")
        if not lbl.is_file():
            raise DatasetError(f"{lbl}: label file listed in dataset.json is missing")
        cases.append(Case(_case_id(_inside(root, e["image"], path, "image")), ims, lbl))
    ids = [c.id for c in cases]
    dup = sorted({x for x in ids if ids.count(x) > 1})
    if dup:
        raise DatasetError(f"{path}: dataset.json training lists case id(s) {dup} more than once")
    _check_num_training(js, len(cases), path)
    test: list[Case] = []
    raw_test = js.get("test", [])
    if not isinstance(raw_test, list):
        raise DatasetError(f"{path}: dataset.json 'test' must be a list of paths")
    for i, rel in enumerate(raw_test):
        rel = rel.get("image") if isinstance(rel, dict) else rel
        ims = _msd_images(root, rel, path, len(channels), f"test[{i}] image")
        test.append(Case(_case_id(_inside(root, rel, path, "image")), ims))
    ending = image_ending(cases[0].images[0])
    return Dataset(root=root, layout="msd", name=str(js.get("name", root.name)),
                   channel_names=channels, labels=labels, file_ending=ending,
                   cases=sorted(cases, key=lambda c: c.id),
                   test_cases=sorted(test, key=lambda c: c.id), json=js,
                   squeezed_axis=singleton_axis(cases))


def singleton_axis(cases: Sequence[Case]) -> int | None:
    """The spatial axis of size 1 in every case's first image file (2D data stored as 3D, read
    from the headers), or None. A file whose header cannot be read is left out here; reading
    the case says what is wrong with it.

    Raises:
        DatasetError: images of size 1 along more than one axis.
    """
    common: set[int] | None = None
    for case in cases:
        try:
            shape, spacing, _ = read_geometry(case.images[0], "image")
        except DatasetError:
            continue
        spatial = shape[:len(spacing)]
        if len(spatial) != 3:
            return None
        ones = {a for a, n in enumerate(spatial) if n == 1}
        common = ones if common is None else common & ones
        if not common:
            return None
    if common is None:
        return None
    if len(common) > 1:
        raise DatasetError(f"{cases[0].images[0]}: every training image has size 1 along axes "
                           f"{sorted(common)}: colabx trains 2D and 3D data only")
    return common.pop()


# -- public entry points --------------------------------------------------------------------------


def load_dataset(path: str | os.PathLike[str]) -> Dataset:
    """Read a dataset folder in the nnU-Net v2 raw layout or the MSD layout.

    The layout is detected from ``dataset.json``: ``channel_names`` means nnU-Net v2, ``modality``
    (or a ``training`` list) means MSD. File lists, endings, channel counts and paths are checked
    here; voxels are checked when a case is loaded (:meth:`Dataset.load_case`) and the presence of
    foreground by :func:`check_foreground`.

    Raises:
        DatasetError: naming the file and the problem.
    """
    root = Path(path)
    js = _read_json(root)
    if "channel_names" in js:
        return _load_nnunet(root, js)
    if "modality" in js or "training" in js:
        return _load_msd(root, js)
    raise DatasetError(
        f"{root / 'dataset.json'}: dataset.json is missing required keys: neither nnU-Net v2 "
        "('channel_names', 'labels', 'numTraining', 'file_ending') nor MSD ('modality', "
        "'labels', 'training')"
    )


def check_foreground(dataset: Dataset) -> dict[str, int]:
    """Refuse a dataset whose training labels contain no foreground voxel at all.

    Cost: one full pass over the training label files (each is read, decompressed and validated),
    so run it once, e.g. during preprocessing, not per epoch. Values 0 and the nnU-Net ``ignore``
    label do not count as foreground.

    Returns:
        case id → number of foreground voxels (cases with zero foreground are allowed as long as
        one case has some).

    Raises:
        DatasetError: no training case has foreground, or a label file is invalid.
    """
    counts: dict[str, int] = {}
    for case in dataset.cases:
        lbl = dataset.load_label(case)
        if lbl is None:
            continue
        fg = lbl > 0
        if dataset.ignore_label is not None:
            fg &= lbl != dataset.ignore_label
        counts[case.id] = int(np.count_nonzero(fg))
    if not any(counts.values()):
        raise DatasetError(
            f"{dataset.root}: no foreground anywhere: all {len(counts)} training label map(s) "
            "contain only background (0); nothing to segment"
        )
    return counts

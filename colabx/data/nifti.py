"""Reading NIfTI files with nibabel, turning every failure into a :class:`DatasetError`.

Axis order: arrays are kept in nibabel's order (the NIfTI ``i, j, k`` voxel axes, the order of the
affine's columns), and the spacing is reported in that same order, so ``spacing[a]`` is the voxel
size along ``array.shape[a]``. nnU-Net's default SimpleITK reader returns the reversed order
(``k, j, i``) with the reversed spacing; both are consistent pairs, and a colabx array equals an
nnU-Net/SimpleITK array transposed by ``(2, 1, 0)``. Nothing is reoriented.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["DatasetError", "NiftiVolume", "read_label_map", "read_nifti"]


class DatasetError(ValueError):
    """A dataset or one of its files cannot be used; the message names the file and problem."""


@dataclass(frozen=True)
class NiftiVolume:
    """One NIfTI file's voxels and geometry.

    Attributes:
        data: the voxel array in nibabel's axis order (scaling by ``scl_slope``/``scl_inter``
            applied when the header asks for it; otherwise the on-disk dtype).
        spacing: voxel size in mm per spatial axis, in the array's axis order.
        affine: the 4×4 voxel-to-world affine (float64).
        path: the file it was read from.
    """

    data: np.ndarray
    spacing: tuple[float, ...]
    affine: np.ndarray
    path: Path


def _gzip_problem(path: Path) -> str | None:
    """Describe what is wrong with a ``.gz`` file's stream; None if it is whole."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 22):
                pass
    except EOFError:
        return "truncated gzip stream (the file ends before the end-of-stream marker)"
    except (OSError, zlib.error) as e:
        return f"corrupt gzip stream ({e})"
    return None


def read_nifti(path: str | Path, what: str = "image") -> NiftiVolume:
    """Read a ``.nii`` or ``.nii.gz`` file.

    Args:
        path: the file.
        what: a word for the file's role ("image", "label", ...) used in error messages.

    Returns:
        The voxels, spacing (mm, array axis order) and affine.

    Raises:
        DatasetError: the file is missing, unreadable, truncated, not NIfTI, or has a
            non-positive or non-finite spacing.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: {what} file is missing")
    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise DatasetError(f"{path}: {what} file is not NIfTI (nibabel read it as "
                               f"{type(img).__name__})")
        data = np.asanyarray(img.dataobj)
    except DatasetError:
        raise
    except Exception as e:  # nibabel raises many types: ImageFileError, EOFError, OSError, ...
        problem = _gzip_problem(path) if path.name.endswith(".gz") else None
        if problem is None:
            problem = f"not a readable NIfTI file ({type(e).__name__}: {e})"
        raise DatasetError(f"{path}: cannot read {what} file: {problem}") from e
    ndim = min(data.ndim, 3)
    # nibabel silently replaces a zero pixdim by 1 on load, so the spacing is checked as stored
    # (otherwise the error would fall on the next file compared with this one)
    stored = _stored_pixdim(path, img)[1: 1 + ndim]
    if not all(np.isfinite(z) and z > 0 for z in stored):
        raise DatasetError(f"{path}: {what} file has invalid voxel spacing (pixdim "
                           f"{[float(z) for z in stored]}; must be finite and > 0)")
    spacing = tuple(float(z) for z in img.header.get_zooms()[:ndim])
    return NiftiVolume(data=data, spacing=spacing, affine=np.asarray(img.affine, np.float64),
                       path=path)


def _stored_pixdim(path: Path, img: nib.Nifti1Image | nib.Nifti2Image) -> np.ndarray:
    """The header's ``pixdim`` as written in the file (before nibabel's fix-ups)."""
    with nib.openers.ImageOpener(str(path)) as f:
        header = type(img.header).from_fileobj(f, check=False)
    return np.asarray(header["pixdim"], dtype=np.float64)


def read_label_map(path: str | Path, what: str = "label",
                   allowed: Collection[int] | None = None,
                   allowed_from: str = "the labels") -> NiftiVolume:
    """Read an integer label map (labels, context maps, predictions) and check its values.

    A trailing singleton fourth axis is dropped; float files are accepted when every value is a
    finite whole number.

    Args:
        path: the file.
        what: its role in error messages ("label", "context", "prediction", ...).
        allowed: the values it may hold; None: any non-negative integer.
        allowed_from: where ``allowed`` comes from, for the error message.

    Returns:
        The volume with ``int16`` data.

    Raises:
        DatasetError: unreadable file (see :func:`read_nifti`), not 2D/3D, non-finite or
            non-integer values, or values outside ``allowed``.
    """
    vol = read_nifti(path, what)
    path, data = vol.path, vol.data
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3):
        raise DatasetError(f"{path}: expected a 2D or 3D {what} map, got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.integer):
        if not np.issubdtype(data.dtype, np.floating) and data.dtype != np.bool_:
            raise DatasetError(f"{path}: {what} map has unsupported dtype {data.dtype}")
        finite = np.isfinite(data)
        if not finite.all():
            raise DatasetError(
                f"{path}: {what} map has {data.size - int(finite.sum())} non-finite value(s)")
        frac = data != np.round(data)
        if frac.any():
            examples = np.unique(data[frac])[:5].tolist()
            raise DatasetError(f"{path}: {what} map has non-integer values, e.g. {examples}; "
                               "labels must be whole numbers")
    values = np.unique(data)
    if allowed is None:
        unknown = [int(x) for x in values if x < 0]
        expect = "non-negative integers"
    else:
        unknown = [int(x) for x in values if int(x) not in allowed]
        expect = f"{allowed_from} {sorted(allowed)}"
    if unknown:
        raise DatasetError(f"{path}: {what} map has value(s) {unknown[:10]} not in {expect}")
    return NiftiVolume(np.asarray(data, dtype=np.int16), vol.spacing, vol.affine, path)

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
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["DatasetError", "NiftiVolume", "read_nifti"]


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
    ndim = data.ndim
    zooms = img.header.get_zooms()[: min(ndim, 3)]
    spacing = tuple(float(z) for z in zooms)
    if not all(np.isfinite(z) and z > 0 for z in spacing):
        raise DatasetError(f"{path}: {what} file has invalid voxel spacing {spacing} "
                           "(must be finite and > 0)")
    return NiftiVolume(data=data, spacing=spacing, affine=np.asarray(img.affine, np.float64),
                       path=path)

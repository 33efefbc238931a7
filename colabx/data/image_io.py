"""Reading and writing image files, turning every failure into a :class:`DatasetError`.

One reader and one writer serve every format colabx accepts (:data:`IMAGE_ENDINGS`):

* NIfTI (``.nii.gz``, ``.nii``) with nibabel;
* ``.nrrd`` and ``.mha`` (single-file NRRD and MetaImage, as many challenge datasets ship them)
  with SimpleITK, an optional dependency (``pip install colabx[sitk]``); without it these files
  are a :class:`DatasetError` that says what to install.

Axis order: arrays are kept in nibabel's order (the NIfTI ``i, j, k`` voxel axes, the order of the
affine's columns), and the spacing is reported in that same order, so ``spacing[a]`` is the voxel
size along ``array.shape[a]``. nnU-Net's default SimpleITK reader returns the reversed order
(``k, j, i``) with the reversed spacing; both are consistent pairs, and a colabx array equals an
nnU-Net/SimpleITK array transposed by ``(2, 1, 0)``. Files read through SimpleITK are turned into
the same convention: the array is transposed to ``i, j, k`` (vector pixels, i.e. channels, last)
and the affine is ITK's LPS geometry (origin, direction × spacing) converted to nibabel's RAS
world (x and y negated), so a NIfTI file and its ``.mha`` copy read identically. Nothing is
reoriented.
"""

from __future__ import annotations

import gzip
import tempfile
import zlib
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import nibabel as nib
import numpy as np

from colabx._io import atomic_write

__all__ = ["IMAGE_ENDINGS", "NIFTI_ENDINGS", "SITK_ENDINGS", "DatasetError", "Volume",
           "folder_ending", "image_ending", "read_geometry", "read_image", "read_label_map",
           "require_sitk", "write_image", "write_label_map"]

#: File endings read with nibabel.
NIFTI_ENDINGS = (".nii.gz", ".nii")
#: File endings read with SimpleITK (optional dependency).
SITK_ENDINGS = (".nrrd", ".mha")
#: Every file ending colabx reads and writes.
IMAGE_ENDINGS = NIFTI_ENDINGS + SITK_ENDINGS
#: nibabel's RAS world from ITK's LPS world: x and y change sign.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class DatasetError(ValueError):
    """A dataset or one of its files cannot be used; the message names the file and problem."""


@dataclass(frozen=True)
class Volume:
    """One image file's voxels and geometry.

    Attributes:
        data: the voxel array in nibabel's axis order (``[X, Y, Z]``, or ``[X, Y, Z, C]`` for a
            file holding channels; NIfTI scaling by ``scl_slope``/``scl_inter`` applied when the
            header asks for it, otherwise the on-disk dtype).
        spacing: voxel size in mm per spatial axis, in the array's axis order.
        affine: the 4×4 voxel-to-world (RAS) affine (float64).
        path: the file it was read from.
    """

    data: np.ndarray
    spacing: tuple[float, ...]
    affine: np.ndarray
    path: Path


def image_ending(path: str | Path) -> str | None:
    """The ending of :data:`IMAGE_ENDINGS` that ``path``'s name has, or None."""
    name = Path(path).name
    return next((e for e in IMAGE_ENDINGS if name.endswith(e)), None)


def folder_ending(folder: str | Path, what: str) -> str:
    """The one file ending of :data:`IMAGE_ENDINGS` that the image files of ``folder`` share
    (other files, hidden files and subfolders left out).

    Raises:
        DatasetError: the folder is missing, holds no image file, or mixes endings.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"{root}: {what} folder does not exist")
    endings: dict[str, Path] = {}
    for p in sorted(root.iterdir()):
        ending = image_ending(p)
        if ending is not None and not p.name.startswith(".") and p.is_file():
            endings.setdefault(ending, p)
    if not endings:
        raise DatasetError(f"{root}: {what} folder holds no image files "
                           f"({', '.join(IMAGE_ENDINGS)})")
    if len(endings) > 1:
        shown = ", ".join(p.name for p in endings.values())
        raise DatasetError(f"{root}: {what} folder mixes file endings ({shown}); keep one "
                           "format per folder")
    return next(iter(endings))


def _ending(path: Path, what: str) -> str:
    ending = image_ending(path)
    if ending is None:
        raise DatasetError(f"{path}: {what} file has an unsupported file ending (colabx reads "
                           f"{', '.join(IMAGE_ENDINGS)})")
    return ending


def require_sitk(path: str | Path) -> ModuleType:
    """SimpleITK, needed for ``path`` (a ``.nrrd``/``.mha`` file or a dataset using them).

    Raises:
        DatasetError: SimpleITK is not installed; the message says how to install it.
    """
    try:
        import SimpleITK as sitk
    except ImportError as e:
        raise DatasetError(f"{path}: .nrrd and .mha files are read with SimpleITK, which is not "
                           "installed: pip install 'colabx[sitk]' (or pip install SimpleITK)"
                           ) from e
    return sitk


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


def _check_spacing(path: Path, what: str, spacing: Any) -> tuple[float, ...]:
    values = [float(z) for z in spacing]
    if not all(np.isfinite(z) and z > 0 for z in values):
        raise DatasetError(f"{path}: {what} file has invalid voxel spacing ({values}; must be "
                           "finite and > 0)")
    return tuple(values)


def read_image(path: str | Path, what: str = "image") -> Volume:
    """Read an image file of any supported format (see the module docstring).

    Args:
        path: the file.
        what: a word for the file's role ("image", "label", ...) used in error messages.

    Returns:
        The voxels, spacing (mm, array axis order) and affine.

    Raises:
        DatasetError: the file is missing, has an unsupported ending, is unreadable, truncated,
            not of the format its ending says, has a non-positive or non-finite spacing, or needs
            SimpleITK, which is not installed.
    """
    path = Path(path)
    ending = _ending(path, what)
    if not path.is_file():
        raise DatasetError(f"{path}: {what} file is missing")
    if ending in NIFTI_ENDINGS:
        return _read_nifti(path, what)
    return _read_sitk(path, what)


def _read_nifti(path: Path, what: str) -> Volume:
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
    _check_spacing(path, what, _stored_pixdim(path, img)[1: 1 + ndim])
    spacing = tuple(float(z) for z in img.header.get_zooms()[:ndim])
    return Volume(data=data, spacing=spacing, affine=np.asarray(img.affine, np.float64),
                  path=path)


def _stored_pixdim(path: Path, img: nib.Nifti1Image | nib.Nifti2Image) -> np.ndarray:
    """The header's ``pixdim`` as written in the file (before nibabel's fix-ups)."""
    with nib.openers.ImageOpener(str(path)) as f:
        header = type(img.header).from_fileobj(f, check=False)
    return np.asarray(header["pixdim"], dtype=np.float64)


def _sitk_problem(e: Exception) -> str:
    """ITK's exception text without its C++ source locations: the lines that say what failed."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    useful = [s for s in lines if not s.startswith(("/", "itk::", "Exception thrown"))
              and ".cxx:" not in s and ".h:" not in s and ".hxx:" not in s]
    return " ".join(useful or lines[-1:]) or type(e).__name__


def _sitk_reader(path: Path, what: str) -> Any:
    """A SimpleITK reader of ``path`` with its header read (voxels not yet)."""
    sitk = require_sitk(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise DatasetError(f"{path}: cannot read {what} file: not a readable "
                           f"{image_ending(path)} file ({_sitk_problem(e)})") from e
    return reader


def _sitk_affine(spacing: tuple[float, ...], origin: Any, direction: Any) -> np.ndarray:
    """nibabel's RAS affine of an ITK geometry (first three axes at most)."""
    nd = min(len(spacing), 3)
    full = len(origin)
    d = np.asarray(direction, np.float64).reshape(full, full)[:nd, :nd]
    affine = np.eye(4)
    affine[:nd, :nd] = d * np.asarray(spacing[:nd])
    affine[:nd, 3] = np.asarray(origin, np.float64)[:nd]
    return _LPS_TO_RAS @ affine


def _read_sitk(path: Path, what: str) -> Volume:
    reader = _sitk_reader(path, what)
    sitk = require_sitk(path)
    try:
        img = reader.Execute()
    except RuntimeError as e:
        raise DatasetError(f"{path}: cannot read {what} file: {_sitk_problem(e)}") from e
    dim = img.GetDimension()
    arr = sitk.GetArrayFromImage(img)  # [*reversed spatial axes(, components)]
    order = tuple(reversed(range(dim))) + tuple(range(dim, arr.ndim))
    data = np.ascontiguousarray(arr.transpose(order))
    nd = min(dim, 3)
    spacing = _check_spacing(path, what, img.GetSpacing()[:nd])
    return Volume(data=data, spacing=spacing,
                  affine=_sitk_affine(img.GetSpacing(), img.GetOrigin(), img.GetDirection()),
                  path=path)


def read_geometry(path: str | Path, what: str = "image"
                  ) -> tuple[tuple[int, ...], tuple[float, ...], np.ndarray]:
    """The shape, spacing and affine of an image file from its header only (no voxels read);
    a file that cannot be read this way goes through :func:`read_image` for its error message.

    Returns:
        ``(shape, spacing, affine)``: the array shape :func:`read_image` would return, the
        spatial spacing (mm, at most three axes) and the 4×4 RAS affine.

    Raises:
        DatasetError: as :func:`read_image`.
    """
    path = Path(path)
    ending = _ending(path, what)
    try:
        if ending in NIFTI_ENDINGS:
            img = nib.load(str(path))
            shape = tuple(int(n) for n in img.shape)
            spacing = tuple(float(z) for z in img.header.get_zooms()[: min(len(shape), 3)])
            affine = np.asarray(img.affine, np.float64)
        else:
            reader = _sitk_reader(path, what)
            size = reader.GetSize()
            shape = tuple(int(n) for n in size) + (
                (reader.GetNumberOfComponents(),) if reader.GetNumberOfComponents() > 1 else ())
            spacing = tuple(float(z) for z in reader.GetSpacing()[: min(len(size), 3)])
            affine = _sitk_affine(reader.GetSpacing(), reader.GetOrigin(),
                                  reader.GetDirection())
    except DatasetError:
        raise
    except Exception:
        vol = read_image(path, what)  # raises DatasetError naming the file and problem
        return vol.data.shape, vol.spacing, vol.affine
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        vol = read_image(path, what)
        return vol.data.shape, vol.spacing, vol.affine
    return shape, spacing, affine


def read_label_map(path: str | Path, what: str = "label",
                   allowed: Collection[int] | None = None,
                   allowed_from: str = "the labels") -> Volume:
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
        DatasetError: unreadable file (see :func:`read_image`), not 2D/3D, non-finite or
            non-integer values, or values outside ``allowed``.
    """
    vol = read_image(path, what)
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
    return Volume(np.asarray(data, dtype=np.int16), vol.spacing, vol.affine, path)


# -- writing --------------------------------------------------------------------------------------


def write_image(data: np.ndarray, out_path: str | Path, *, affine: np.ndarray | None = None,
                reference: str | Path | None = None) -> Path:
    """Write a 2D/3D array as an image file of the format ``out_path``'s ending names,
    atomically (a failure leaves no file and keeps a previous version).

    Args:
        data: ``[X, Y(, Z)]`` in colabx's axis order; written with its own dtype.
        out_path: ``.nii.gz`` (gzip-compressed), ``.nii``, ``.nrrd`` or ``.mha`` (compressed).
        affine: the 4×4 RAS voxel-to-world affine, or None to take ``reference``'s.
        reference: an image file whose grid ``data`` is in (its first 2 or 3 axes; a 2D
            ``data`` in a 3D file with one axis of size 1 is written with that axis); NIfTI
            output then keeps the reference's header (codes, units, description) when the
            reference is NIfTI too.

    Returns:
        ``out_path`` as a Path.

    Raises:
        ValueError: unsupported ending, neither or both of ``affine`` and ``reference``, or a
            shape that differs from the reference's.
        DatasetError: the reference cannot be read, or SimpleITK is needed and missing.
    """
    out = Path(out_path)
    ending = image_ending(out)
    if ending is None:
        raise ValueError(f"{out}: out_path must end with one of {', '.join(IMAGE_ENDINGS)}")
    if (affine is None) == (reference is None):
        raise ValueError("write_image: give exactly one of affine and reference")
    arr = np.asarray(data)
    if arr.ndim not in (2, 3):
        raise ValueError(f"{out}: only 2D or 3D arrays are written, got shape {arr.shape}")
    header = None
    if reference is not None:
        shape, spacing, affine = read_geometry(reference, "reference")
        arr = _unsqueezed(arr, tuple(shape[:len(spacing)]))
        if arr.shape != tuple(shape[:arr.ndim]):
            raise ValueError(f"array shape {arr.shape} differs from the spatial shape "
                             f"{tuple(shape[:arr.ndim])} of {reference} (shape {shape})")
        if ending in NIFTI_ENDINGS and image_ending(reference) in NIFTI_ENDINGS:
            header = nib.load(str(reference)).header.copy()
    if ending in NIFTI_ENDINGS:
        if header is not None:
            header.set_data_dtype(arr.dtype)
        img = nib.Nifti1Image(arr, affine, header)
        img.header.set_slope_inter(1.0, 0.0)
        payload = img.to_bytes()
        if ending == ".nii.gz":
            payload = gzip.compress(payload, compresslevel=6, mtime=0)
    else:
        payload = _sitk_bytes(arr, np.asarray(affine, np.float64), out)
    atomic_write(out, lambda f: f.write(payload))
    return out


def _sitk_bytes(arr: np.ndarray, affine: np.ndarray, out: Path) -> bytes:
    """The bytes of ``arr`` written by SimpleITK in ``out``'s format (through a temporary file:
    SimpleITK writes to file names only)."""
    sitk = require_sitk(out)
    nd = arr.ndim
    lps = _LPS_TO_RAS @ affine  # the sign flip is its own inverse
    m = lps[:nd, :nd]
    spacing = np.linalg.norm(m, axis=0)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(tuple(reversed(range(nd))))))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in lps[:nd, 3]])
    img.SetDirection([float(v) for v in (m / spacing).flatten()])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"image{image_ending(out)}"
        sitk.WriteImage(img, str(path), useCompression=True)
        return path.read_bytes()


def _unsqueezed(arr: np.ndarray, spatial: tuple[int, ...]) -> np.ndarray:
    """A 2D ``arr`` in the grid of a 3D file that holds 2D data (one axis of size 1, which
    :class:`~colabx.data.datasets.Dataset` drops when reading) gets that axis back."""
    if arr.ndim == 2 and len(spatial) == 3:
        for a, n in enumerate(spatial):
            if n == 1 and spatial[:a] + spatial[a + 1:] == arr.shape:
                return np.expand_dims(arr, a)
    return arr


def write_label_map(label: np.ndarray, reference: str | Path, out_path: str | Path) -> Path:
    """Write an integer label map in ``reference``'s grid (see :func:`write_image`), as uint8
    when every value fits, else int16, without intensity scaling.

    Raises:
        ValueError: not an integer array, values outside ``[0, 32767]``, or as
            :func:`write_image`.
        DatasetError: as :func:`write_image`.
    """
    arr = np.asarray(label)
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise ValueError(f"label must be an integer array, got {arr.dtype}")
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    if lo < 0 or hi > np.iinfo(np.int16).max:
        raise ValueError(f"label values must be in [0, 32767] to be saved, got [{lo}, {hi}]")
    dtype = np.uint8 if hi <= np.iinfo(np.uint8).max else np.int16
    return write_image(arr.astype(dtype), out_path, reference=reference)

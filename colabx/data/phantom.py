"""The built-in synthetic CT-like phantom: a tumour segmentation task with look-alikes.

What it models (CoLab's premise): the background is heterogeneous, and some background
structures share the ROI's local appearance. Each case is a torso slab in HU:

* air (−1000) outside an elliptical body; subcutaneous fat, soft tissue with fatty patches;
* **liver** (context 1, the ROI organ): a large smoothly deformed ellipsoid holding 1–4
  hypodense **tumours** (label 1; random blobs fully inside it);
* **spleen** (context 2): a smaller organ on the other side with nearly the liver's mean
  intensity (a few HU darker, blotchier texture) holding 3–5 **look-alikes** (cysts/infarcts)
  drawn from exactly the tumours' distribution of size, shape, intensity and texture;
* **kidneys** (context 3) and the **spine** (context 4), clearly different.

A look-alike and a tumour are identical within a few millimetres; what tells them apart is the
organ around them, which the context map (``contextTr/``, the paper's "manual" context labels)
names. Intensities are piecewise smooth with Gaussian-filtered (CT-like correlated) textures
and noise, blurred by partial volume (more along the coarse slice axis, the last array axis),
rounded to whole HU so the int16 files hold exactly the generated values.

Geometry is defined in millimetres on a fixed 144 × 144 × 96 mm field of view; a preset only
chooses the grid (shape and spacing) and the number of cases, so ``"tiny"`` is a coarse sampling
of the same anatomy. Arrays follow :mod:`colabx.data.image_io` (nibabel axis order, spacing per
array axis). Everything is a deterministic function of ``(seed, index, preset)``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

__all__ = [
    "CONTEXT_NAMES",
    "GENERATOR_VERSION",
    "PHANTOM_PRESETS",
    "TEST_INDEX_OFFSET",
    "PhantomCase",
    "PhantomPreset",
    "generate_case",
    "phantom_dataset",
    "write_phantom",
]

#: Bumped whenever the generated content changes; part of the cache folder name.
GENERATOR_VERSION = 1
#: Names of context values 1..4 (0 = air, body wall, fat and soft tissue).
CONTEXT_NAMES = ("liver", "spleen", "kidney", "spine")
#: Test case ``j`` is ``generate_case(TEST_INDEX_OFFSET + j)``, so the test set does not depend
#: on the number of training cases.
TEST_INDEX_OFFSET = 100_000

FOV_MM = (144.0, 144.0, 96.0)

# HU means. Tumours/look-alikes are hypodense in liver-like parenchyma (liver metastases).
_HU_AIR, _HU_FAT, _HU_SOFT = -1000.0, -100.0, 50.0
_HU_LIVER, _HU_SPLEEN, _HU_KIDNEY, _HU_SPINE = 110.0, 104.0, 180.0, 400.0
_HU_LESION, _LESION_CORE_DROP = 65.0, 12.0
# Textures: (std HU, Gaussian sigma mm). The spleen's is coarser than the liver's: the organs
# differ in texture scale and shape, not in local mean intensity.
_TEX_LIVER, _TEX_SPLEEN, _TEX_LESION, _TEX_SPINE = (6.0, 1.5), (9.0, 5.0), (7.0, 1.2), (40.0, 2.0)
_NOISE = (14.0, 0.9)  # CT reconstruction noise over the whole image
_PV_SIGMA_MM = (0.7, 0.7, 1.3)  # partial-volume blur; largest across slices
_LESION_RADIUS_MM = (4.0, 9.0)


@dataclass(frozen=True)
class PhantomPreset:
    """A phantom grid and its default dataset size.

    Attributes:
        shape: voxels per array axis ``(X, Y, Z)``; Z is the slice axis.
        spacing: mm per array axis (the last one coarse).
        num_train, num_test: default case counts of :func:`write_phantom`.
        patch_size: suggested training patch (voxels per axis), divisible by the 3-pool U-Net's
            total pooling ``(8, 8, 4)`` under the reference anisotropic pooling rule.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    num_train: int
    num_test: int
    patch_size: tuple[int, int, int]


#: ``"default"``: 96 × 96 × 32 at 1.5 × 1.5 × 3 mm, which ``colabx train`` uses with no dataset.
#: Its 48 × 48 × 16 patch (72 × 72 × 48 mm) is half the slab along every axis: every structure is
#: within about one patch width of any other, a lesion is seen with much of its organ, but never
#: the whole body, and the ``phantom-cpu`` preset's CoLab epochs on it (60 iterations, batch 2,
#: 8 features, 3 pools) take 7–9 s on 2 CPU cores (README, measured 2026-12-04).
#: ``"tiny"``: the same anatomy sampled at 32 × 32 × 12 for tests
#: (milliseconds per case).
PHANTOM_PRESETS: dict[str, PhantomPreset] = {
    "default": PhantomPreset((96, 96, 32), (1.5, 1.5, 3.0), 16, 8, (48, 48, 16)),
    "tiny": PhantomPreset((32, 32, 12), (4.5, 4.5, 8.0), 4, 2, (16, 16, 8)),
}
#: The former name of :data:`PHANTOM_PRESETS` (deprecated).
PRESETS = PHANTOM_PRESETS


@dataclass(frozen=True, eq=False)
class PhantomCase:
    """One generated case (arrays in nibabel axis order ``[X, Y, Z]``).

    Attributes:
        image: float32 CT in whole HU (exactly representable as int16).
        label: uint8, 0 background, 1 tumour.
        context: uint8 organ map, 0 none (air/body), 1.. = :attr:`context_names`; 1 is the organ
            holding the tumours, and organs include their lesions.
        spacing: mm per array axis.
        context_names: names of context values ``1..n``.
        lookalike: bool, the look-alike lesions (background; not written to disk).
    """

    image: np.ndarray
    label: np.ndarray
    context: np.ndarray
    spacing: tuple[float, float, float]
    context_names: tuple[str, ...]
    lookalike: np.ndarray


def _preset(preset: str) -> PhantomPreset:
    if preset not in PHANTOM_PRESETS:
        raise ValueError(f"preset must be one of {sorted(PHANTOM_PRESETS)}, got {preset!r}")
    return PHANTOM_PRESETS[preset]


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


# -- geometry -------------------------------------------------------------------------------------


class _Grid:
    """Voxel-centre coordinates in mm, centred on the field of view."""

    def __init__(self, shape: tuple[int, ...], spacing: tuple[float, ...]) -> None:
        self.shape = shape
        self.spacing = np.asarray(spacing, np.float64)
        self.axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]

    def box(self, center: np.ndarray, extent: np.ndarray) -> tuple[slice, ...]:
        """Voxel slices covering ``center ± extent`` (mm), clipped to the grid."""
        out = []
        for ax, c, e in zip(self.axes, center, extent, strict=True):
            lo = int(np.searchsorted(ax, c - e, side="left"))
            hi = int(np.searchsorted(ax, c + e, side="right"))
            out.append(slice(lo, max(hi, lo)))
        return tuple(out)

    def voxel_mm(self, idx: np.ndarray) -> np.ndarray:
        return np.array([ax[i] for ax, i in zip(self.axes, idx, strict=True)])


def _ellipsoid(grid: _Grid, rng: np.random.Generator, center: np.ndarray, semi: np.ndarray,
               wobble: float, angle: float = 0.0) -> tuple[tuple[slice, ...], np.ndarray]:
    """A smoothly deformed, z-rotated ellipsoid as a normalised radius field ``rho`` (< 1 inside)
    on its bounding box: ``rho = |q| / (1 + δ(q/|q|))``, δ a sum of three random sinusoids of
    the direction with total amplitude at most ``wobble``."""
    sl = grid.box(center, semi * (1 + wobble) + grid.spacing)
    x, y, z = (ax[s] - c for ax, s, c in zip(grid.axes, sl, center, strict=True))
    ca, sa = np.cos(angle), np.sin(angle)
    q = [(ca * x[:, None, None] + sa * y[None, :, None]) / semi[0],
         (-sa * x[:, None, None] + ca * y[None, :, None]) / semi[1],
         np.broadcast_to(z[None, None, :] / semi[2], (len(x), len(y), len(z)))]
    r = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)
    u = [qi / np.maximum(r, 1e-9) for qi in q]
    amps = rng.uniform(0.3, 1.0, 3)
    amps *= wobble / amps.sum()
    delta = np.zeros_like(r)
    for a in amps:
        w = rng.normal(0.0, 2.0, 3)
        delta += a * np.sin(w[0] * u[0] + w[1] * u[1] + w[2] * u[2] + rng.uniform(0, 2 * np.pi))
    return sl, (r / (1.0 + delta)).astype(np.float32)


def _mask(grid: _Grid, sl: tuple[slice, ...], rho: np.ndarray) -> np.ndarray:
    m = np.zeros(grid.shape, bool)
    m[sl] = rho < 1.0
    return m


def _texture(grid: _Grid, rng: np.random.Generator, std: float, sigma_mm: float) -> np.ndarray:
    """Zero-mean Gaussian-filtered noise with the given std (HU) and correlation length (mm)."""
    f = ndimage.gaussian_filter(rng.standard_normal(grid.shape, dtype=np.float32),
                                sigma_mm / grid.spacing, mode="wrap")
    return f * (std / max(float(f.std()), 1e-6))


def _lesions(grid: _Grid, rng: np.random.Generator, organ: np.ndarray, count: int,
             ) -> tuple[np.ndarray, np.ndarray]:
    """``count`` blobs fully inside ``organ``: a bool mask and the core weight ``1 - rho²``."""
    depth = ndimage.distance_transform_edt(organ, sampling=grid.spacing)
    mask = np.zeros(grid.shape, bool)
    core = np.zeros(grid.shape, np.float32)
    for _ in range(count):
        radius = rng.uniform(*_LESION_RADIUS_MM)
        semi = radius * np.array([1.0, rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.2)])
        wobble = 0.15
        room = depth > semi.max() * (1 + wobble) + 1.0
        if not room.any():  # shrink to the deepest point so every lesion has voxels
            room = depth >= depth.max()
            semi *= max(float(depth.max()) - 1.0, 0.5) / (semi.max() * (1 + wobble))
        cand = np.flatnonzero(room)
        idx = np.unravel_index(cand[rng.integers(len(cand))], grid.shape)
        sl, rho = _ellipsoid(grid, rng, grid.voxel_mm(np.array(idx)), semi, wobble,
                             rng.uniform(0, np.pi))
        inside = (rho < 1.0) & organ[sl]
        inside[tuple(i - s.start for i, s in zip(idx, sl, strict=True))] = True
        mask[sl] |= inside
        core[sl] = np.maximum(core[sl], np.where(inside, 1.0 - rho**2, 0.0))
    return mask, core


def _jitter(rng: np.random.Generator, v: tuple[float, ...], frac: float) -> np.ndarray:
    return np.asarray(v) * rng.uniform(1 - frac, 1 + frac, len(v))


def generate_case(index: int, *, seed: int = 0, preset: str = "default") -> PhantomCase:
    """Generate phantom case ``index`` (deterministic in ``(seed, index, preset)``).

    Returns:
        A :class:`PhantomCase` with arrays of shape ``PHANTOM_PRESETS[preset].shape``.

    Raises:
        ValueError: unknown ``preset``, negative or non-integer ``index`` / ``seed``.
    """
    p = _preset(preset)
    index = _check_int(index, "index", 0)
    seed = _check_int(seed, "seed", 0)
    rng = np.random.default_rng([seed, index])
    g = _Grid(p.shape, p.spacing)

    def organ(center, semi, jitter, wobble, max_angle):
        c = np.asarray(center) + rng.uniform(-jitter, jitter, 3)
        return _mask(g, *_ellipsoid(g, rng, c, _jitter(rng, semi, 0.1), wobble,
                                    rng.uniform(-max_angle, max_angle)))

    # Body: an elliptic cylinder along the slice axis; fat wall, soft tissue inside.
    body_semi = np.array([rng.uniform(62, 68), rng.uniform(48, 54), 1e6])
    body_c = np.array([rng.uniform(-3, 3), rng.uniform(-3, 3), 0.0])
    body = _mask(g, *_ellipsoid(g, rng, body_c, body_semi, 0.04))
    wall = rng.uniform(5, 9)
    inner = _mask(g, *_ellipsoid(g, rng, body_c, body_semi - [wall, wall, 0], 0.04))
    fatty = ndimage.gaussian_filter(rng.standard_normal(g.shape, dtype=np.float32),
                                    6.0 / g.spacing, mode="wrap")
    fatty = inner & (fatty > 1.6 * fatty.std())

    # Organs, painted in this order (later ones win), all kept inside the body wall.
    by = body_c[1]
    kidneys = (organ((-36, by + 30, 0), (12, 14, 28), 4, 0.12, 0.4)
               | organ((36, by + 30, 0), (12, 14, 28), 4, 0.12, 0.4))
    spine = organ((0, by + body_semi[1] - 20, 0), (13, 12, 1e6), 2, 0.05, 0.2)
    spleen = organ((34, by + 2, 0), (22, 24, 36), 5, 0.15, 0.5) & inner
    liver = organ((-26, by - 6, 0), (32, 30, 40), 5, 0.15, 0.4) & inner
    context = np.zeros(g.shape, np.uint8)
    for value, m in ((3, kidneys & inner), (4, spine & inner), (2, spleen), (1, liver)):
        context[m] = value
    liver, spleen = context == 1, context == 2

    tumour, t_core = _lesions(g, rng, liver, int(rng.integers(1, 5)))
    lookalike, l_core = _lesions(g, rng, spleen, int(rng.integers(3, 6)))

    img = np.full(g.shape, _HU_AIR, np.float32)
    img[body] = _HU_FAT
    img[inner & ~fatty] = _HU_SOFT
    img[context == 3] = _HU_KIDNEY
    img[context == 4] = _HU_SPINE + _texture(g, rng, *_TEX_SPINE)[context == 4]
    img[liver] = _HU_LIVER + _texture(g, rng, *_TEX_LIVER)[liver]
    img[spleen] = _HU_SPLEEN + _texture(g, rng, *_TEX_SPLEEN)[spleen]
    lesion = tumour | lookalike
    img[lesion] = (_HU_LESION + _texture(g, rng, *_TEX_LESION)
                   - _LESION_CORE_DROP * (t_core + l_core))[lesion]

    img = ndimage.gaussian_filter(img, np.asarray(_PV_SIGMA_MM) / g.spacing, mode="nearest")
    img[body] += _texture(g, rng, *_NOISE)[body]
    img = np.clip(np.rint(img), -1024, 3071).astype(np.float32)
    return PhantomCase(image=img, label=tumour.astype(np.uint8), context=context,
                       spacing=p.spacing, context_names=CONTEXT_NAMES, lookalike=lookalike)


# -- files ----------------------------------------------------------------------------------------


def _save_nifti(path: Path, arr: np.ndarray, affine: np.ndarray, dtype: type) -> None:
    img = nib.Nifti1Image(arr.astype(dtype), affine)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def _dataset_json(p: PhantomPreset, preset: str, seed: int, num_cases: int, num_test: int) -> dict:
    return {
        "name": f"ColabxPhantom_{preset}",
        "description": "colabx synthetic CT phantom: hypodense liver tumours (label 1) and "
                       "identical-looking spleen lesions (background)",
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "tumour": 1},
        "numTraining": num_cases,
        "file_ending": ".nii.gz",
        "colabx": {
            "generator": "colabx.data.phantom",
            "generator_version": GENERATOR_VERSION,
            "preset": preset,
            "seed": seed,
            "shape": list(p.shape),
            "spacing": list(p.spacing),
            "patch_size": list(p.patch_size),
            "num_test": num_test,
            "test_index_offset": TEST_INDEX_OFFSET,
            "context_labels": {"0": "none", **{str(i + 1): n for i, n in enumerate(CONTEXT_NAMES)}},
        },
    }


def _build(folder: Path, p: PhantomPreset, preset: str, seed: int, num_cases: int,
           num_test: int, progress: bool) -> None:
    """Write the whole dataset into the new folder ``folder``."""
    affine = np.diag([*p.spacing, 1.0])
    affine[:3, 3] = [-(n - 1) / 2 * s for n, s in zip(p.shape, p.spacing, strict=True)]
    jobs = [("Tr", f"phantom_{i:03d}", i) for i in range(num_cases)]
    jobs += [("Ts", f"phantom_test_{j:03d}", TEST_INDEX_OFFSET + j) for j in range(num_test)]
    for split in ("Tr", "Ts") if num_test else ("Tr",):
        for kind in ("images", "labels", "context"):
            (folder / f"{kind}{split}").mkdir(parents=True)
    bar = tqdm(total=len(jobs), desc=f"phantom {preset}", unit="case", disable=not progress)
    for split, cid, index in jobs:
        case = generate_case(index, seed=seed, preset=preset)
        _save_nifti(folder / f"images{split}" / f"{cid}_0000.nii.gz", case.image, affine, np.int16)
        _save_nifti(folder / f"labels{split}" / f"{cid}.nii.gz", case.label, affine, np.uint8)
        _save_nifti(folder / f"context{split}" / f"{cid}.nii.gz", case.context, affine, np.uint8)
        bar.update(1)
    bar.close()
    js = _dataset_json(p, preset, seed, num_cases, num_test)
    (folder / "dataset.json").write_text(json.dumps(js, indent=2) + "\n", encoding="utf-8")


def _sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}.{os.getpid()}.{uuid.uuid4().hex[:8]}")


def write_phantom(out_dir: str | os.PathLike[str], *, num_cases: int | None = None,
                  num_test: int | None = None, seed: int = 0, preset: str = "default",
                  overwrite: bool = False, progress: bool = False) -> Path:
    """Write a phantom dataset in the nnU-Net v2 raw layout.

    Layout: ``dataset.json`` (``channel_names {"0": "CT"}``, ``labels {"background": 0,
    "tumour": 1}``, ``numTraining``, ``file_ending ".nii.gz"`` and a ``"colabx"`` entry with the
    generator version, preset, seed and context label names); ``imagesTr/phantom_XXX_0000.nii.gz``
    (int16 HU), ``labelsTr/`` and ``contextTr/`` (uint8), and the same for ``*Ts`` with ids
    ``phantom_test_XXX``. Training case ``i`` is ``generate_case(i)``, test case ``j`` is
    ``generate_case(TEST_INDEX_OFFSET + j)``. Affine ``diag(spacing)`` with the field of view
    centred on the origin.

    The dataset is built in a temporary sibling folder and renamed into place, so ``out_dir``
    never holds a partial dataset.

    Args:
        out_dir: the dataset folder; must not exist or be empty unless ``overwrite``.
        num_cases, num_test: training / test case counts (default: the preset's).
        overwrite: replace an existing non-empty ``out_dir``.
        progress: show a progress bar.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ValueError: unknown ``preset``, bad counts or seed, or a non-empty ``out_dir`` without
            ``overwrite``.
    """
    p = _preset(preset)
    seed = _check_int(seed, "seed", 0)
    num_cases = _check_int(p.num_train if num_cases is None else num_cases, "num_cases", 1)
    num_test = _check_int(p.num_test if num_test is None else num_test, "num_test", 0)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"out_dir {out} is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "tmp")
    try:
        _build(tmp, p, preset, seed, num_cases, num_test, progress)
        if out.is_dir() and any(out.iterdir()):
            old = _sibling(out, "old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)  # also replaces an empty folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("COLABX_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "colabx"


def phantom_dataset(preset: str = "default", *, seed: int = 0,
                    cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The phantom dataset folder for ``(preset, seed)``, generated on first use.

    Lives in ``cache_dir`` (default ``$COLABX_CACHE``, else ``~/.cache/colabx``) under
    ``phantom-<preset>-seed<seed>-v<GENERATOR_VERSION>`` with the preset's case counts. A folder
    with a ``dataset.json`` is reused as is. Safe when several processes race: each builds in its
    own temporary folder and renames it into place; a loser discards its copy and uses the
    winner's.

    Raises:
        ValueError: unknown ``preset`` or bad ``seed``.
    """
    p = _preset(preset)
    seed = _check_int(seed, "seed", 0)
    out = _cache_root(cache_dir) / f"phantom-{preset}-seed{seed}-v{GENERATOR_VERSION}"
    if (out / "dataset.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "tmp")
    try:
        _build(tmp, p, preset, seed, p.num_train, p.num_test, progress=False)
        try:
            os.replace(tmp, out)
        except OSError as e:  # another process renamed its copy first (out is not empty)
            if not (out / "dataset.json").is_file():
                raise OSError(f"{out}: cache folder exists without a dataset.json; remove it "
                              f"to regenerate the phantom ({e})") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

"""Data augmentation of training patches (nnU-Net v2's default pipeline), on torch tensors.

``augment(sample, config, generator, patch_size=P)`` takes a sample cut by
:func:`colabx.data.sampling.sample_patch` (``image [C, *S]``, ``label``, ``distance`` and
optionally ``context [*S]``, with ``S`` ≥ ``P``) and returns the augmented ``P``-sized patch:

**Spatial** (one transform for every array): rotation (p = 0.2, ±30° about each axis in 3D; in-plane
only for anisotropic data), scaling (p = 0.2, one factor in [0.7, 1.4]), mirroring (p = 0.5 per
axis). Rotation and scaling resample with ONE ``affine_grid`` and two ``grid_sample`` calls
(linear for the image and distance channels together, nearest for label and context), so they run
on CUDA tensors as well; the output patch is cut from the larger input region (``S`` > ``P``), so
it has no artificial border where the volume has data. Without rotation or scaling the patch is a
plain centre crop; mirroring is an exact flip either way.

* Rotation is a rigid rotation in **physical** space when ``spacing`` is given (the voxel-space
  matrix is ``diag(1/spacing) R diag(spacing)``), so shapes are not sheared on anisotropic voxels.
  Data is anisotropic when ``max(spacing) / min(spacing) > 3`` (or ``config.anisotropic``): then
  rotation is about the coarsest axis only and scaling is in-plane only (nnU-Net's "dummy 2D"
  augmentation, which never interpolates across thick slices).
* ``scale`` is a magnification: content appears ``scale`` times larger (< 1 shows more context).
* **Distance maps are transformed like images, not recomputed**: linear interpolation, then
  multiplied by ``scale``. A rigid rotation preserves distances and an isotropic magnification by
  ``s`` multiplies them by ``s``, so the result is the physical distance to the *transformed*
  ROI at the output spacing, up to interpolation error (sub-voxel). Recomputing would also be
  wrong: the patch does not see ROI outside it. With in-plane-only scaling of anisotropic data
  the through-plane part of a distance is not rescaled (an approximation, error below a factor
  ``max(s, 1/s)``). A case without ROI keeps +inf (a distance map is expected to be finite
  everywhere or +inf everywhere, as preprocessing writes it).

**Intensity** (image only, after the spatial transform, nnU-Net v2's order): Gaussian noise
(p = 0.1, standard deviation U(0, 0.1): batchgenerators calls the range a variance but draws
the standard deviation from it; same field scale for all channels), Gaussian blur (p = 0.2, per
channel p = 0.5, σ ∈ U(0.5, 1) per axis), multiplicative brightness (p = 0.15, factor per channel),
contrast (p = 0.15, per channel, around the channel mean, clipped to the channel's previous
range), inverted gamma (p = 0.1) and gamma (p = 0.3): γ per channel, range normalised to [0, 1],
``x ** γ``, then mean and standard deviation restored ("retain stats"). Factors in
``(lo, hi)`` ranges that straddle 1 are drawn as nnU-Net's ``BGContrast``: half the time in
``(lo, 1)``, half in ``(1, hi)``; a range on one side of 1 is drawn uniformly.

Where it departs from nnU-Net v2's defaults: no low-resolution simulation (nnU-Net's
``SimulateLowResolutionTransform``, p = 0.25); rotation is ±30° for 2D and anisotropic data too
(nnU-Net: ±180° for dummy-2D data and 2D patches, ±15° for 2D patches whose sides differ by more
than 1.5×); the scale factor is drawn as ``BGContrast`` (half below 1, half above)
where nnU-Net draws it uniformly in (0.7, 1.4); anisotropy is decided from the spacing, not
from the patch shape. These have not been studied here; they are listed so that a comparison
with nnU-Net knows them.

All randomness comes from the ``generator`` argument, drawn in a fixed order, so a generator
state fixes the result; a CPU generator gives the same draws for CPU and CUDA samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from colabx.data.sampling import as_patch_size

__all__ = ["AugmentConfig", "SpatialParams", "augment", "sample_spatial"]

_PROBABILITIES = ("rotation_p", "scale_p", "mirror_p", "noise_p", "blur_p", "brightness_p",
                  "contrast_p", "gamma_p", "inverted_gamma_p")
_POSITIVE_RANGES = ("scale_range", "blur_sigma", "brightness_range", "contrast_range",
                    "gamma_range")


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation settings; defaults are nnU-Net v2's (module docstring). Probabilities are per
    patch unless noted. ``enabled=False`` turns everything off (centre crop only)."""

    enabled: bool = True
    rotation_p: float = 0.2
    rotation_deg: float = 30.0
    scale_p: float = 0.2
    scale_range: tuple[float, float] = (0.7, 1.4)
    mirror_p: float = 0.5  # per axis
    mirror_axes: tuple[int, ...] | None = None  # None: every spatial axis
    anisotropic: bool | None = None  # None: decided from the spacing
    anisotropy_ratio: float = 3.0
    noise_p: float = 0.1
    noise_variance: tuple[float, float] = (0.0, 0.1)  # batchgenerators' name: a std range
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    brightness_p: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    contrast_p: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    gamma_p: float = 0.3
    inverted_gamma_p: float = 0.1
    gamma_range: tuple[float, float] = (0.7, 1.5)

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise TypeError(f"AugmentConfig.enabled must be a bool, got {self.enabled!r}")
        for name in _PROBABILITIES:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"AugmentConfig.{name} must be a probability in [0, 1], "
                                 f"got {v!r}")
        ranges = {f.name for f in fields(self) if f.name.endswith(("_range", "_sigma",
                                                                   "_variance"))}
        for name in sorted(ranges):
            v = getattr(self, name)
            ok = (isinstance(v, (tuple, list)) and len(v) == 2
                  and all(isinstance(x, (int, float)) and math.isfinite(x) for x in v)
                  and v[0] <= v[1] and v[0] >= 0 and (v[0] > 0 or name not in _POSITIVE_RANGES))
            if not ok:
                lower = "> 0" if name in _POSITIVE_RANGES else ">= 0"
                raise ValueError(f"AugmentConfig.{name} must be a (low, high) pair with "
                                 f"{lower} <= low <= high, got {v!r}")
            object.__setattr__(self, name, (float(v[0]), float(v[1])))
        if not isinstance(self.rotation_deg, (int, float)) or not 0 <= self.rotation_deg <= 180:
            raise ValueError(f"AugmentConfig.rotation_deg must be in [0, 180], "
                             f"got {self.rotation_deg!r}")
        if not isinstance(self.anisotropy_ratio, (int, float)) or not self.anisotropy_ratio >= 1:
            raise ValueError(f"AugmentConfig.anisotropy_ratio must be >= 1, "
                             f"got {self.anisotropy_ratio!r}")
        if self.anisotropic is not None and not isinstance(self.anisotropic, bool):
            raise TypeError(f"AugmentConfig.anisotropic must be None or a bool, "
                            f"got {self.anisotropic!r}")
        if self.mirror_axes is not None:
            axes = tuple(self.mirror_axes)
            if not all(isinstance(a, int) and 0 <= a <= 2 for a in axes) or len(set(axes)) != len(
                    axes):
                raise ValueError(f"AugmentConfig.mirror_axes must be None or distinct spatial "
                                 f"axis indices (0, 1, 2), got {self.mirror_axes!r}")
            object.__setattr__(self, "mirror_axes", axes)

    @property
    def spatial(self) -> bool:
        """True when rotation or scaling can be sampled (the patch then needs a larger source)."""
        return self.enabled and (
            (self.rotation_p > 0 and self.rotation_deg > 0)
            or (self.scale_p > 0 and self.scale_range != (1.0, 1.0)))

    def low_res_axis(self, ndim: int, spacing: Sequence[float] | None = None) -> int | None:
        """The through-plane axis of anisotropic 3D data (the coarsest; axis 0 when forced by
        ``anisotropic=True`` without a spacing), or None (isotropic enough, or 2D)."""
        if ndim != 3 or self.anisotropic is False:
            return None
        if spacing is None:
            return 0 if self.anisotropic else None
        sp = _spacing(spacing, ndim)
        if self.anisotropic or max(sp) / min(sp) > self.anisotropy_ratio:
            return int(np.argmax(sp))
        return None

    def source_size(self, patch_size: Sequence[int],
                    spacing: Sequence[float] | None = None) -> tuple[int, ...]:
        """Worst-case input region for ``patch_size``: large enough for any rotation and scaling
        this config can sample (a bound: rows of a rotation are unit vectors), odd sizes, the
        patch itself when no rotation or scaling can occur. For one sampled transform,
        :meth:`SpatialParams.source_size` is tight."""
        ndim = len(patch_size)
        p = as_patch_size(patch_size, ndim)
        if not self.spatial:
            return p
        sp = np.ones(ndim) if spacing is None else np.asarray(_spacing(spacing, ndim))
        low = self.low_res_axis(ndim, spacing)
        half = np.array([max(n // 2, n - 1 - n // 2) for n in p], float)
        rotated = ([a for a in range(ndim) if a != low]
                   if self.rotation_p > 0 and self.rotation_deg > 0 else [])
        zmin = min(self.scale_range[0], 1.0) if self.scale_p > 0 else 1.0
        out = []
        for i in range(ndim):
            z = 1.0 if i == low else zmin
            if i in rotated:
                ext = float(np.linalg.norm(sp[rotated] * half[rotated])) / sp[i]
            else:
                ext = half[i]
            out.append(2 * (math.ceil(ext / z - 1e-9) + 1) + 1)
        return tuple(out)


def _spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    try:
        sp = tuple(float(s) for s in spacing)
    except TypeError as e:
        raise ValueError(f"spacing must be {ndim} positive numbers, got {spacing!r}") from e
    if len(sp) != ndim or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be {ndim} finite numbers > 0, got {spacing!r}")
    return sp


@dataclass(frozen=True)
class SpatialParams:
    """One sampled spatial transform.

    Attributes:
        matrix: ``[d, d]`` float64, maps an output voxel offset (from the output anchor
            ``P // 2``) to a source voxel offset (from the source anchor ``S // 2``); the
            identity when ``resample`` is False.
        scale: the magnification; distances are multiplied by it.
        mirror: per spatial axis, whether the output is flipped.
        resample: rotation or scaling was sampled (else a centre crop suffices).
    """

    matrix: np.ndarray
    scale: float
    mirror: tuple[bool, ...]
    resample: bool

    def source_size(self, patch_size: int | Sequence[int]) -> tuple[int, ...]:
        """Smallest odd region, centred on the source anchor, holding every source position the
        output patch reads (one voxel of margin for linear interpolation); ``patch_size`` itself
        when no resampling is needed."""
        p = as_patch_size(patch_size, len(self.mirror))
        if not self.resample:
            return p
        half = np.array([max(n // 2, n - 1 - n // 2) for n in p], float)
        ext = np.abs(self.matrix) @ half
        return tuple(2 * (math.ceil(e - 1e-9) + 1) + 1 for e in ext)

    def source_offset(self, output_offset: Sequence[int]) -> tuple[int, ...]:
        """Where a source voxel must lie (offset from the source anchor, rounded) to land at
        ``output_offset`` from the output anchor."""
        return tuple(int(round(v)) for v in self.matrix @ np.asarray(output_offset, float))


def _uniforms(generator: torch.Generator, n: int) -> list[float]:
    return torch.rand(n, generator=generator, device=generator.device,
                      dtype=torch.float64).tolist()


def _two_sided(lo: float, hi: float, side: float, u: float) -> float:
    """nnU-Net's ``BGContrast`` draw for a range that straddles 1: half the time from (lo, 1),
    else from (1, hi); a range on one side of 1 is drawn uniformly."""
    if hi <= 1.0 or lo >= 1.0:
        return lo + u * (hi - lo)
    if side < 0.5:
        return lo + u * (1.0 - lo)
    return 1.0 + u * (hi - 1.0)


def _rotation(angles: Sequence[float], ndim: int, low: int | None) -> np.ndarray:
    if ndim == 2:
        c, s = math.cos(angles[0]), math.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    r = np.eye(3)
    for axis, a in enumerate(angles):
        if low is not None and axis != low:
            continue
        i, j = (k for k in range(3) if k != axis)
        m = np.eye(3)
        m[i, i] = m[j, j] = math.cos(a)
        m[i, j], m[j, i] = -math.sin(a), math.sin(a)
        r = r @ m
    return r


def sample_spatial(config: AugmentConfig, ndim: int, generator: torch.Generator,
                   spacing: Sequence[float] | None = None) -> SpatialParams:
    """Draw one spatial transform (rotation, scaling, mirroring) for ``ndim`` (2 or 3) spatial
    axes. Always consumes the same number of random values from ``generator``."""
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim!r}")
    u = _uniforms(generator, 7 + ndim)
    low = config.low_res_axis(ndim, spacing)
    rotate = config.enabled and u[0] < config.rotation_p and config.rotation_deg > 0
    scaled = config.enabled and u[4] < config.scale_p and config.scale_range != (1.0, 1.0)
    theta = math.radians(config.rotation_deg)
    r = _rotation([(2 * x - 1) * theta for x in u[1:4]], ndim, low) if rotate else np.eye(ndim)
    z = _two_sided(*config.scale_range, u[5], u[6]) if scaled else 1.0
    inv_zoom = np.array([1.0 if i == low else 1.0 / z for i in range(ndim)])
    sp = np.ones(ndim) if spacing is None else np.asarray(_spacing(spacing, ndim))
    matrix = (r * sp[None, :] / sp[:, None]) * inv_zoom[None, :]  # S^-1 R S Z^-1
    axes = range(ndim) if config.mirror_axes is None else [a for a in config.mirror_axes
                                                          if a < ndim]
    mirror = tuple(config.enabled and a in axes and u[7 + a] < config.mirror_p
                   for a in range(ndim))
    return SpatialParams(matrix, z, mirror, bool(rotate or scaled))


def _source_coords(params: SpatialParams, src: Sequence[int], out: Sequence[int],
                   device: torch.device) -> torch.Tensor:
    """Source index ``S//2 + M (x - P//2)`` of every output voxel, float32 ``[*P, d]``, source
    axes in REVERSED order (grid_sample's x = last axis). Built as a broadcast sum of one term
    per output axis: cheaper than ``affine_grid``'s per-voxel matrix product."""
    d = len(out)
    m = torch.as_tensor(params.matrix[::-1].copy(), dtype=torch.float32, device=device)
    coords = torch.as_tensor([n // 2 for n in src][::-1], dtype=torch.float32, device=device)
    for j, p in enumerate(out):
        x = torch.arange(p, dtype=torch.float32, device=device) - p // 2
        shape = [1] * d + [d]
        shape[j] = p
        coords = coords + (x[:, None] * m[:, j]).view(shape)
    return coords


def _spatial(sample: dict[str, torch.Tensor], params: SpatialParams,
             size: tuple[int, ...]) -> dict[str, torch.Tensor]:
    image, label, distance = sample["image"], sample["label"], sample["distance"]
    context = sample.get("context")
    src = tuple(label.shape)
    out = dict(sample)
    if params.resample:
        dev = image.device
        coords = _source_coords(params, src, size, dev)
        s_rev = torch.as_tensor(src[::-1], dtype=torch.float32, device=dev)
        grid = ((2 * coords + 1) / s_rev - 1)[None]  # align_corners=False normalisation
        # linear: image channels and distance in one call (+inf of a case without ROI -> 0 here,
        # restored below from the nearest sample)
        lin = torch.empty((image.shape[0] + 1, *src), dtype=torch.float32, device=dev)
        lin[:-1].copy_(image)
        lin[-1].copy_(distance).nan_to_num_(posinf=0.0)
        lin = F.grid_sample(lin[None], grid, mode="bilinear", padding_mode="border",
                            align_corners=False)[0]
        # nearest: one flat index per output voxel, gathered from the integer maps directly
        idx = torch.minimum(torch.round(coords).clamp_min_(0), s_rev - 1).long()
        flat = idx[..., 0]
        stride = 1
        for k in range(1, len(src)):
            stride *= src[len(src) - k]
            flat = flat + idx[..., k] * stride

        def nearest(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(-1)[flat]

        out["image"] = lin[:-1].to(image.dtype)
        inf = torch.full((), math.inf, dtype=distance.dtype, device=dev)
        out["distance"] = torch.where(torch.isinf(nearest(distance)), inf,
                                      lin[-1].to(distance.dtype) * params.scale)
        out["label"] = nearest(label)
        if context is not None:
            out["context"] = nearest(context)
    else:
        if any(s < p for s, p in zip(src, size, strict=True)):
            raise ValueError(f"sample is {src}, smaller than patch_size {size}")
        crop = tuple(slice(s // 2 - p // 2, s // 2 - p // 2 + p)
                     for s, p in zip(src, size, strict=True))
        for k in ("label", "distance", "context"):
            if out.get(k) is not None:
                out[k] = out[k][crop]
        out["image"] = image[(slice(None), *crop)]
    dims = [a for a, f in enumerate(params.mirror) if f]
    if dims:
        for k in ("label", "distance", "context"):
            if out.get(k) is not None:
                out[k] = torch.flip(out[k], dims)
        out["image"] = torch.flip(out["image"], [d + 1 for d in dims])
    return out


def _blur_axis(x: torch.Tensor, axis: int, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(4.0 * sigma))  # scipy.ndimage's default truncation
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, -1)
    moved = x.movedim(axis, -1)
    flat = moved.reshape(-1, 1, moved.shape[-1])
    flat = F.conv1d(F.pad(flat, (radius, radius), mode="replicate"), k)
    return flat.view(moved.shape).movedim(-1, axis)


def _gamma(x: torch.Tensor, gammas: torch.Tensor, invert: bool) -> torch.Tensor:
    dims = tuple(range(1, x.dim()))
    if invert:
        x = -x
    mean, sd = x.mean(dims, keepdim=True), x.std(dims, keepdim=True)
    lo, hi = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
    rng = hi - lo
    x = ((x - lo) / (rng + 1e-7)).clamp_min(0) ** gammas * rng + lo
    x = (x - x.mean(dims, keepdim=True)) / (x.std(dims, keepdim=True) + 1e-8) * sd + mean
    return -x if invert else x


def _intensity(image: torch.Tensor, config: AugmentConfig,
               generator: torch.Generator) -> torch.Tensor:
    c, nsp = image.shape[0], image.dim() - 1
    dims = tuple(range(1, image.dim()))
    shape = (c,) + (1,) * nsp

    def per_channel(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=image.dtype, device=image.device).view(shape)

    u = _uniforms(generator, 2)
    if u[0] < config.noise_p:
        lo, hi = config.noise_variance
        noise = torch.randn(image.shape, generator=generator, device=generator.device,
                            dtype=image.dtype).to(image.device)
        image = image + noise * (lo + u[1] * (hi - lo))
    u = _uniforms(generator, 1 + c * (1 + nsp))
    if u[0] < config.blur_p:
        lo, hi = config.blur_sigma
        chans = []
        for ch in range(c):
            v = u[1 + ch * (1 + nsp): 1 + (ch + 1) * (1 + nsp)]
            x = image[ch]
            if v[0] < 0.5:
                for axis in range(nsp):
                    x = _blur_axis(x, axis, lo + v[1 + axis] * (hi - lo))
            chans.append(x)
        image = torch.stack(chans)
    u = _uniforms(generator, 1 + 2 * c)
    if u[0] < config.brightness_p:
        image = image * per_channel([_two_sided(*config.brightness_range, u[1 + 2 * i],
                                                u[2 + 2 * i]) for i in range(c)])
    u = _uniforms(generator, 1 + 2 * c)
    if u[0] < config.contrast_p:
        f = per_channel([_two_sided(*config.contrast_range, u[1 + 2 * i], u[2 + 2 * i])
                         for i in range(c)])
        mean = image.mean(dims, keepdim=True)
        lo, hi = image.amin(dims, keepdim=True), image.amax(dims, keepdim=True)
        image = torch.clamp((image - mean) * f + mean, min=lo, max=hi)
    for p, invert in ((config.inverted_gamma_p, True), (config.gamma_p, False)):
        u = _uniforms(generator, 1 + 2 * c)
        if u[0] < p:
            g = per_channel([_two_sided(*config.gamma_range, u[1 + 2 * i], u[2 + 2 * i])
                             for i in range(c)])
            image = _gamma(image, g, invert)
    return image


def augment(
    sample: dict[str, torch.Tensor],
    config: AugmentConfig,
    generator: torch.Generator,
    *,
    patch_size: int | Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    spatial: SpatialParams | None = None,
) -> dict[str, torch.Tensor]:
    """Augment one sample (module docstring) and cut it to ``patch_size``.

    Args:
        sample: ``image`` float ``[C, *S]``, ``label`` integer ``[*S]``, ``distance`` float
            ``[*S]``, optionally ``context`` integer ``[*S]``, all on one device (2D or 3D);
            other keys are passed through. ``S`` should be ``config.source_size(P, spacing)``
            (or ``spatial.source_size(P)``), centred where the patch should be; a smaller ``S``
            is edge-extended by the resampling.
        config: the settings; ``enabled=False`` returns the centre crop.
        generator: all randomness (a CPU generator also serves CUDA samples).
        patch_size: output size ``P`` (default ``S``).
        spacing: voxel size (rotation in physical space; anisotropy); None = isotropic.
        spatial: a transform drawn beforehand by :func:`sample_spatial` with the same generator
            (what :class:`~colabx.data.loader.PatchBatches` does to size ``S`` per patch); None
            draws it here.

    Returns:
        A new dict with the same keys: ``image [C, *P]``, ``label``/``distance``/``context``
        ``[*P]``, dtypes unchanged, on the sample's device.

    Raises:
        ValueError: missing keys, inconsistent shapes, or ``S < P`` without resampling.
    """
    if not isinstance(config, AugmentConfig):
        raise TypeError(f"config must be an AugmentConfig, got {type(config).__name__}")
    for k in ("image", "label", "distance"):
        if not isinstance(sample.get(k), torch.Tensor):
            raise ValueError(f"sample[{k!r}] must be a torch.Tensor")
    src = tuple(sample["label"].shape)
    if len(src) not in (2, 3):
        raise ValueError(f"sample['label'] must be 2D or 3D, got shape {src}")
    image = sample["image"]
    if image.dim() != len(src) + 1 or tuple(image.shape[1:]) != src:
        raise ValueError(f"sample['image'] must be [C, *{src}], got {tuple(image.shape)}")
    for k in ("distance", "context"):
        x = sample.get(k)
        if x is not None and tuple(x.shape) != src:
            raise ValueError(f"sample[{k!r}] must have shape {src}, got {tuple(x.shape)}")
    size = src if patch_size is None else as_patch_size(patch_size, len(src))
    if spatial is None:
        spatial = sample_spatial(config, len(src), generator, spacing)
    elif len(spatial.mirror) != len(src):
        raise ValueError(f"spatial was drawn for {len(spatial.mirror)} axes, sample has "
                         f"{len(src)}")
    out = _spatial(sample, spatial, size)
    if config.enabled:
        out["image"] = _intensity(out["image"], config, generator)
    return out

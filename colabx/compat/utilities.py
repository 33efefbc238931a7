"""Drop-in ``one_hot2dist`` and ``hessian_vector_product_Unet`` of the reference's
``utilities.py``."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from colabx._io import atomic_write
from colabx.compat.common import calculate_loss, fork_safe
from colabx.compat.twins import add_scaled_, one_hot2dist_reference
from colabx.ops.distance_transform import distance_transform

__all__ = ["cache_distance_maps", "hessian_vector_product_Unet", "one_hot2dist"]

#: Below this distance (voxel units) d² = round(d_f32²) recovers scipy's integer sum exactly.
_EXACT_RECOVERY_MAX = 2048.0


_cache_dir: Path | None = None


def cache_distance_maps(directory: str | os.PathLike[str] | None) -> None:
    """Keep :func:`one_hot2dist`'s results in ``directory`` (None, the default: no cache).

    The reference's sampler recomputes the distance map of every sampled case each epoch, in
    fresh ``fork`` workers; with the cache each case's map is computed once per run and read
    back afterwards. Entries are keyed by a BLAKE2b digest of the mask's bytes, shape and dtype
    and the resolution (a changed case gets a new entry) and written atomically, so concurrent
    workers are safe. Call it in ``train.py`` before the sampler starts its workers (forked
    workers inherit the setting). The folder is never pruned.
    """
    global _cache_dir
    _cache_dir = None if directory is None else Path(directory)
    if _cache_dir is not None:
        _cache_dir.mkdir(parents=True, exist_ok=True)


def _cache_path(seg: np.ndarray, resolution) -> Path | None:
    if _cache_dir is None:
        return None
    h = hashlib.blake2b(digest_size=20)
    res = None if resolution is None else tuple(float(r) for r in resolution)
    h.update(repr((seg.shape, seg.dtype.str, res)).encode())
    h.update(np.ascontiguousarray(seg).data)
    return _cache_dir / f"one_hot2dist-{h.hexdigest()}.npy"


def one_hot2dist(seg: np.ndarray, resolution: Sequence[float] | None = None) -> np.ndarray:
    """Signed distance map per channel, as the reference's ``utilities.one_hot2dist``.

    Parameters
    ----------
    seg : ndarray ``[K, *S]`` (S 2D or 3D)
        Channel masks (nonzero = inside), any dtype.
    resolution : sequence of float, optional
        Voxel spacing per spatial axis (scipy's ``sampling``); None: 1.

    Returns
    -------
    ndarray
        ``seg``'s shape and dtype (an integer ``seg`` truncates the distances, as in the
        reference). Per channel with any voxel inside: outside, the Euclidean distance to the
        nearest inside voxel; inside, −(distance to the nearest outside voxel − 1). Channels
        without voxels are 0. With unit spacing the values are scipy's bit for bit (distances
        below 2048 voxels); with a spacing they agree to float32 rounding, and an integer
        ``seg`` is the reference's exactly (a channel where float32 cannot decide a truncation
        is computed by scipy).

    Safe in forked workers whose parent used torch's threads (no torch op runs here). With
    :func:`cache_distance_maps` set, a mask seen before is read back instead of recomputed.
    """
    seg = np.asarray(seg)
    if seg.ndim not in (3, 4):
        raise ValueError(f"one_hot2dist: seg must be [K, H, W] or [K, D, H, W], got shape "
                         f"{seg.shape}")
    if seg.size == 0:
        return np.zeros_like(seg)
    cached = _cache_path(seg, resolution)
    if cached is not None and cached.exists():
        res = np.load(cached)
        if res.shape == seg.shape and res.dtype == seg.dtype:
            return res
    res = _one_hot2dist(seg, resolution)
    if cached is not None:
        atomic_write(cached, lambda f: np.save(f, res))
    return res


def _one_hot2dist(seg: np.ndarray, resolution: Sequence[float] | None) -> np.ndarray:
    # NumPy around the C++ EDT, no torch computation: safe in a forked worker (the reference's
    # sampler runs this in a fork pool) whose parent had used torch's OpenMP pool
    inside = np.ascontiguousarray(seg, dtype=bool)
    full = inside.reshape(len(seg), -1).all(axis=1)
    d = distance_transform(torch.from_numpy(inside), spacing=resolution, signed=True).numpy()
    unit = resolution is None or bool(np.all(np.asarray(resolution, dtype=float) == 1.0))
    if unit:
        if float(np.abs(d).max()) < _EXACT_RECOVERY_MAX:
            # scipy's float64 sqrt of the integer squared distance, recovered from float32:
            # inside, 1 - d is the float32 distance to the background exactly
            e = np.sqrt(np.rint(np.square(np.where(inside, 1 - d, d), dtype=np.float64)))
            d = np.where(inside, 1 - e, e)
    scipy_channels = full  # no background: scipy measures to a voxel outside the array
    if not unit and np.issubdtype(seg.dtype, np.integer):
        # truncation: where float32 cannot tell on which side of an integer the distance lies
        # (0.7 * 90 is 63 in float32 and just below it in float64), defer to scipy's float64
        a = np.abs(d.astype(np.float64))
        slack = 4 * np.finfo(np.float32).eps * (a + 1)
        undecided = np.floor(np.maximum(a - slack, 0)) != np.floor(a + slack)
        scipy_channels = scipy_channels | undecided.reshape(len(seg), -1).any(axis=1)
    res = np.zeros_like(seg)
    res[...] = d
    for k in np.flatnonzero(scipy_channels):
        res[k] = one_hot2dist_reference(seg[k:k + 1], resolution)[0]
    return res


@fork_safe
def hessian_vector_product_Unet(model, samplemodel, vector, inputnor_var, target_var,
                                taskGenerated, criterion, args, loss_mask, BGclsindex, r=1e-2):
    """The reference's finite-difference meta gradient (``utilities.hessian_vector_product_Unet``).

    Returns ``[(∂L(θ+)/∂ω − ∂L(θ−)/∂ω) / (2R)]`` per parameter ω of ``samplemodel``, with
    θ± = θ ± R·v, R = r/‖v‖, ``vector`` = v (one tensor per parameter of ``model``) and L the
    drop-in :func:`~colabx.compat.calculate_loss`. ``model``'s parameters are perturbed in place
    and restored by the same arithmetic as the reference (+R·v, −2R·v, +R·v with R as the
    scalar alpha of ``add_``/``sub_``), so they end bit-identical to the reference's. Faster:
    the two forwards of ``model`` keep no autograd graph, and one backward of L(θ+) − L(θ−)
    through the generator replaces two.
    """
    R = r / torch.cat([v.reshape(-1) for v in vector]).norm()
    step = float(R)  # one host read; the reference passes R as add_'s scalar alpha
    params = list(model.parameters())
    if len(params) != len(vector):
        raise ValueError(f"hessian_vector_product_Unet: vector has {len(vector)} tensors but "
                         f"model has {len(params)} parameters")
    add_scaled_(params, vector, step)
    with torch.no_grad():
        out_plus = model(inputnor_var)
    add_scaled_(params, vector, -2 * step)
    with torch.no_grad():
        out_minus = model(inputnor_var)
    add_scaled_(params, vector, step)
    loss = (calculate_loss(args, target_var, out_plus, taskGenerated, loss_masks=loss_mask,
                           BGcls=BGclsindex)
            - calculate_loss(args, target_var, out_minus, taskGenerated, loss_masks=loss_mask,
                             BGcls=BGclsindex))
    grads = torch.autograd.grad(loss, list(samplemodel.parameters()))
    return [g.div_(2 * R) for g in grads]

"""Exact Euclidean distance transform (docs/design.md, "Op 2"): batched, 2D/3D, anisotropic,
optional signed.

The kernels (``colabx._C``) run the separable lower-envelope-of-parabolas algorithm
(Felzenszwalb–Huttenlocher); on CUDA tensors without colabx's CUDA kernels for their device, or
with an axis past their limits (``_C.distance_transform_cuda_supported``), the pure-PyTorch twin
(:mod:`colabx.twins.distance_transform`) runs instead. The op is not differentiable.
"""

import contextlib
import numbers
import os
from collections.abc import Iterator, Sequence
from typing import List

import numpy as np
import torch

from colabx import _backend
from colabx._threads import one_torch_thread
from colabx.ops import _checks
from colabx.twins import distance_transform as _ref

_DIRECT_DTYPES = (torch.bool, torch.uint8)
_REJECTED_DTYPES = (torch.complex32, torch.complex64, torch.complex128)

_forked = False


def _mark_forked() -> None:
    global _forked
    _forked = True


os.register_at_fork(after_in_child=_mark_forked)


def in_forked_child() -> bool:
    """True in a process started by ``fork`` after colabx was imported (multiprocessing's
    ``fork`` pools, DataLoader workers on Linux)."""
    return _forked


@contextlib.contextmanager
def fork_safe_intraop() -> Iterator[None]:
    """Run torch's CPU ops in the block without its intra-op (OpenMP) pool when in a forked child.

    GNU OpenMP does not survive ``fork``: a child whose parent had used the pool blocks forever
    in the first parallel region. With one intra-op thread ATen runs its loops inline. Outside a
    forked child, or already single-threaded, the block runs unchanged; the setting is restored.
    The C++ kernels of colabx start their own ``std::thread`` workers per call, which is safe
    after ``fork``.
    """
    if not _forked:
        yield
        return
    with one_torch_thread():
        yield


def _as_feature_bytes(mask: torch.Tensor) -> torch.Tensor:
    """Contiguous bool/uint8 view of ``mask`` (nonzero = feature), copying only when needed."""
    if mask.dtype not in _DIRECT_DTYPES:
        mask = mask != 0
    return mask.contiguous()


def compute_distance_transform(
    mask: torch.Tensor, spacing: Sequence[float] | None = None, signed: bool = False
) -> torch.Tensor:
    """Unchecked, autograd-free EDT for internal callers (e.g. the HD95 metric).

    ``mask`` [B, *S] with S of 2 or 3 sizes, any real dtype (nonzero = True) on CPU or CUDA;
    ``spacing`` one positive value per spatial axis (trusted). Returns float32 [B, *S].
    """
    with fork_safe_intraop():
        m = _as_feature_bytes(mask.detach())
    nsp = m.dim() - 1
    sp = [1.0] * nsp if spacing is None else [float(s) for s in spacing]
    out = torch.empty(m.shape, dtype=torch.float32, device=m.device)
    if out.numel() == 0:
        return out
    scratch = torch.empty_like(out) if signed else None
    batch, spatial = m.shape[0], list(m.shape[1:])
    if m.device.type == "cpu":
        _backend.ext().distance_transform_forward_cpu(
            m.data_ptr(), out.data_ptr(), _backend.addr(scratch), batch, spatial, sp,
            bool(signed), _backend.num_threads(),
        )
        return out
    if _cuda_kernels_for(m):
        _C = _backend.ext()
        strided = spatial[:-1]
        workspace = None
        if max(strided) > _C.distance_transform_cuda_smem_max_n(m.device.index):
            workspace = torch.empty(out.numel() * 2, dtype=torch.float32, device=m.device)
        _C.distance_transform_forward_cuda(
            m.data_ptr(), out.data_ptr(), _backend.addr(scratch), _backend.addr(workspace),
            batch, spatial, sp, bool(signed), m.device.index, _backend.stream_of(m),
        )
        return out
    return _ref.distance_transform(m, sp, signed)


def _cuda_kernels_for(m: torch.Tensor) -> bool:
    """Whether the CUDA kernels take this mask (CUDA tensor, kernels built for its device, axes
    within their limits); else the twin runs."""
    return (m.device.type == "cuda" and _backend.use_cuda_kernels(m, "distance_transform")
            and bool(_backend.ext().distance_transform_cuda_supported(list(m.shape[1:]))))


@torch.library.custom_op("colabx::distance_transform", mutates_args=())
def _distance_transform_op(mask: torch.Tensor, spacing: List[float], signed: bool) -> torch.Tensor:
    return compute_distance_transform(mask, spacing, signed)


@_distance_transform_op.register_fake
def _(mask: torch.Tensor, spacing: List[float], signed: bool) -> torch.Tensor:
    return torch.empty(mask.shape, dtype=torch.float32, device=mask.device)


def distance_transform(
    mask: torch.Tensor,
    spacing: Sequence[float] | float | None = None,
    signed: bool = False,
) -> torch.Tensor:
    """Exact Euclidean distance transform of a batch of 2D or 3D masks.

    Parameters
    ----------
    mask : Tensor, shape ``[B, H, W]`` or ``[B, D, H, W]``
        bool or uint8 (other integer and floating dtypes are accepted as "nonzero = True"),
        on CPU or CUDA. Every batch item is transformed independently.
    spacing : sequence of float, float or None
        Physical size of a voxel along each spatial axis (``(sh, sw)`` or ``(sd, sh, sw)``),
        between 1e-12 and 1e12 (the kernels square them in float32); a single number applies to
        every axis; None means 1 (voxel units). NumPy arrays and scalars are numbers too
        (nibabel's ``header.get_zooms()`` gives ``np.float32`` values).
    signed : bool
        False (default): ``out[b, x]`` is the distance from x to the nearest nonzero voxel of
        item b: 0 on nonzero voxels, ``+inf`` everywhere in an item without any. This equals
        ``scipy.ndimage.distance_transform_edt(~mask[b], sampling=spacing)`` to float32
        rounding.
        True: the boundary-loss signed distance of the CoLab reference code (``one_hot2dist``):
        outside the mask ``edt(~mask)`` (positive), inside ``-(edt(mask) - 1)``, where
        ``edt(mask)`` is the distance to the nearest zero voxel; the ``- 1`` is in the same
        units as the distances (literally 1, as the reference code does, whatever the spacing),
        so an inside voxel whose nearest background voxel is its neighbour along an axis of
        spacing s gets ``1 - s`` (0 in voxel units). Items
        with no boundary (no nonzero voxel, or no zero voxel) are 0 everywhere: the reference
        leaves an empty item blank, and a full item has no distance to the background (scipy
        would return distances to a phantom voxel outside the array there).

    Returns
    -------
    Tensor
        float32, same shape and device as ``mask``; carries no gradient.

    Safe on the CPU in forked workers (``fork`` pools, DataLoader workers) whose parent had used
    torch's intra-op threads: see :func:`fork_safe_intraop`.

    Raises
    ------
    TypeError
        ``mask`` is not a tensor or has a complex dtype; ``signed`` is not a bool.
    ValueError
        ``mask`` is not 3- or 4-dimensional, or ``spacing`` has the wrong length or a
        non-finite / non-positive value.
    """
    _checks.check_tensor(mask, "mask")
    _checks.check_ndim(mask, "mask", (3, 4), "[B, H, W] or [B, D, H, W]")
    if mask.dtype in _REJECTED_DTYPES or mask.is_complex():
        raise TypeError(f"mask must be a bool, integer or real floating tensor, got {mask.dtype}")
    if not isinstance(signed, bool):
        raise TypeError(f"signed must be a bool, got {type(signed).__name__}")
    nsp = mask.dim() - 1
    if isinstance(spacing, (str, bytes, bool)) or (spacing is not None and not isinstance(
            spacing, (numbers.Real, Sequence, torch.Tensor, np.ndarray))):
        raise TypeError(f"spacing must be a sequence of floats, a float or None, got {spacing!r}")
    if isinstance(spacing, torch.Tensor):
        spacing = spacing.tolist()
    sp = _checks.check_spacing(spacing, nsp)
    sp_list = [1.0] * nsp if sp is None else list(sp)
    if torch.compiler.is_compiling():
        return _distance_transform_op(_as_feature_bytes(mask.detach()), sp_list, signed)
    # eager: skip the custom-op dispatch; the mask is converted fork-safely there
    return compute_distance_transform(mask, sp_list, signed)

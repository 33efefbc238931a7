"""Argument validation shared by the ops. Every error names the argument and the problem."""

from __future__ import annotations

import numbers
import operator
from collections.abc import Sequence

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LABEL_DTYPES = (torch.uint8, torch.int32, torch.int64, torch.bool)


def check_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_ndim(x: torch.Tensor, name: str, allowed: Sequence[int], layout: str) -> None:
    if x.dim() not in allowed:
        want = " or ".join(str(n) for n in allowed)
        raise ValueError(
            f"{name} must have {want} dimensions ({layout}), got shape {tuple(x.shape)}"
        )


def check_floating(x: torch.Tensor, name: str) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")


def check_labels(x: torch.Tensor, name: str) -> None:
    if x.dtype not in LABEL_DTYPES:
        raise TypeError(
            f"{name} must be an integer label tensor (uint8/int32/int64/bool), got {x.dtype}"
        )


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors on one device; returns it."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return first


def check_shape(x: torch.Tensor, name: str, expected: Sequence[int], expected_desc: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(
            f"{name} has shape {tuple(x.shape)} but {expected_desc} requires {tuple(expected)}"
        )


#: Voxel spacings the float32 kernels square without overflow or underflow (any unit).
SPACING_RANGE = (1e-12, 1e12)


def check_spacing(
    spacing: Sequence[float] | None, ndim: int, name: str = "spacing"
) -> tuple[float, ...] | None:
    """Per-axis voxel spacing: ``ndim`` finite positive numbers, or None for unit spacing. A
    single number (Python, NumPy or a 0-dim array/tensor) applies to every axis."""
    if spacing is None:
        return None
    if isinstance(spacing, numbers.Real) or getattr(spacing, "ndim", None) == 0:
        spacing = [float(spacing)] * ndim
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numbers, got {spacing!r}") from None
    if len(values) != ndim:
        raise ValueError(f"{name} must have one value per spatial axis ({ndim}), got {len(values)}")
    for s in values:
        if not (s > 0 and s != float("inf")):
            raise ValueError(f"{name} values must be finite and > 0, got {values}")
        if not SPACING_RANGE[0] <= s <= SPACING_RANGE[1]:
            raise ValueError(f"{name} values must be between {SPACING_RANGE[0]:g} and "
                             f"{SPACING_RANGE[1]:g} (the kernels square them in float32), got "
                             f"{values}")
    return values


def check_channels(channels: object, k: int, name: str) -> list[int]:
    if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence):
        if isinstance(channels, (torch.Tensor, np.ndarray)) and channels.ndim == 1:
            channels = channels.tolist()
        else:
            raise TypeError(f"{name} must be a sequence of ints, got {type(channels).__name__}")
    out = []
    for c in channels:
        if isinstance(c, bool) or isinstance(c, float):
            raise TypeError(f"{name} must contain ints, got {c!r}")
        try:
            out.append(operator.index(c))
        except TypeError:
            raise TypeError(f"{name} must contain ints, got {type(c).__name__}") from None
    if not out:
        raise ValueError(f"{name} must name at least one channel")
    for c in out:
        if not 0 <= c < k:
            raise ValueError(f"{name} entry {c} is out of range for K = {k} channels (0..{k - 1})")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} contains duplicate channels: {out}")
    return out


def check_label_range(lab: torch.Tensor, k: int, name: str) -> None:
    if lab.numel() == 0 or lab.dtype == torch.bool:
        return
    lo, hi = torch.aminmax(lab)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= k:
        raise ValueError(f"{name} values must be in 0..{k - 1} (K = {k} channels), found range "
                         f"{lo}..{hi}")


def prepare_labels(lab: torch.Tensor, z: torch.Tensor, name: str, zname: str) -> torch.Tensor:
    """Hard labels [B, *S] or [B, 1, *S] → [B, *S] (bool viewed as uint8)."""
    check_labels(lab, name)
    b, spatial = z.shape[0], tuple(z.shape[2:])
    if lab.dim() == z.dim() and lab.shape[1] == 1:
        lab = lab[:, 0]
    if tuple(lab.shape) != (b, *spatial):
        raise ValueError(f"{name} has shape {tuple(lab.shape)} but {zname} of shape "
                         f"{tuple(z.shape)} requires integer labels of shape {(b, *spatial)} "
                         f"(or {(b, 1, *spatial)})")
    if lab.dtype == torch.bool:
        lab = lab.view(torch.uint8)
    return lab

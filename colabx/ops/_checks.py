"""Argument validation shared by the ops. Every error names the argument and the problem."""

from __future__ import annotations

from collections.abc import Sequence

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


def check_spacing(
    spacing: Sequence[float] | None, ndim: int, name: str = "spacing"
) -> tuple[float, ...] | None:
    """Per-axis voxel spacing: ``ndim`` finite positive numbers, or None for unit spacing."""
    if spacing is None:
        return None
    if isinstance(spacing, (int, float)):
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
    return values

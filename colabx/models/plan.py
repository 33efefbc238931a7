"""Network plan from the data: patch size, pooling per stage, and building the networks.

nnU-Net's rule for the pooling kernels: at each stage an axis is halved when its current spacing
is less than twice the finest current spacing (so anisotropic data first pools in-plane, which is
the reference's ``[2, 2, 1]`` first pooling) and at least 4 voxels remain; at most ``max_pool``
stages (default 5), fewer when ``num_pool`` says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from colabx.models.unet import UNet, task_generator

__all__ = ["NetworkPlan", "auto_patch_size", "build_networks", "pool_kernel_sizes"]


def pool_kernel_sizes(patch_size: Sequence[int], spacing: Sequence[float],
                      num_pool: int | None = None, max_pool: int = 5) -> list[list[int]]:
    """Per-stage pooling kernels (tensor axis order) for a patch at ``spacing``.

    Raises:
        ValueError: the patch cannot be pooled ``num_pool`` times.
    """
    size, sp = list(patch_size), [float(s) for s in spacing]
    kernels: list[list[int]] = []
    limit = max_pool if num_pool is None else num_pool
    while len(kernels) < limit:
        finest = min(s for s, n in zip(sp, size, strict=True) if n // 2 >= 4) \
            if any(n // 2 >= 4 for n in size) else None
        if finest is None:
            break
        k = [2 if (n % 2 == 0 and n // 2 >= 4 and s < 2 * finest) else 1
             for n, s in zip(size, sp, strict=True)]
        if all(v == 1 for v in k):
            break
        kernels.append(k)
        size = [n // v for n, v in zip(size, k, strict=True)]
        sp = [s * v for s, v in zip(sp, k, strict=True)]
    if num_pool is not None and len(kernels) < num_pool:
        raise ValueError(f"num_pool: patch {list(patch_size)} can be pooled only {len(kernels)} "
                         f"times (each pooled axis must stay even and >= 4 voxels), not "
                         f"{num_pool}")
    if not kernels:
        raise ValueError(f"patch_size: {list(patch_size)} is too small to pool once")
    return kernels


def auto_patch_size(median_shape: Sequence[int], spacing: Sequence[float],
                    max_voxels: int) -> list[int]:
    """A patch covering the median image where it fits in ``max_voxels``, else shrunk along the
    physically largest axis first; every size a multiple of 8 (at least 8)."""
    patch = [max(8, -(-int(n) // 8) * 8) for n in median_shape]
    while _prod(patch) > max_voxels:
        extent = [p * s for p, s in zip(patch, spacing, strict=True)]
        a = max(range(len(patch)), key=lambda i: (extent[i] if patch[i] > 8 else -1.0))
        if patch[a] <= 8:
            break
        patch[a] -= 8
    return patch


def _prod(v: Sequence[int]) -> int:
    out = 1
    for x in v:
        out *= int(x)
    return out


@dataclass
class NetworkPlan:
    """Everything needed to rebuild the networks (stored in checkpoints)."""

    in_channels: int
    num_classes: int
    t: int
    spatial_dims: int
    patch_size: list[int]
    pool_kernel_sizes: list[list[int]]
    base_features: int
    max_features: int | None
    deep_supervision: bool
    with_generator: bool
    #: decoder upsampling of the generator; runs saved before the option existed used
    #: transposed convolutions
    generator_upsampling: str = "transposed"

    @property
    def out_channels(self) -> int:
        return self.num_classes + self.t - 1

    def to_dict(self) -> dict:
        return asdict(self)


def build_networks(plan: NetworkPlan, device: torch.device) -> tuple[UNet, UNet | None]:
    """The segmentation U-Net (``c + t − 1`` outputs) and, for CoLab, the task generator."""
    kw = dict(base_features=plan.base_features, max_features=plan.max_features,
              pool_kernel_sizes=[tuple(k) for k in plan.pool_kernel_sizes])
    f = UNet(plan.in_channels, plan.out_channels, plan.spatial_dims,
             deep_supervision=plan.deep_supervision, **kw).to(device)
    g = task_generator(plan.in_channels, plan.t, plan.spatial_dims,
                       upsampling=plan.generator_upsampling, **kw).to(device) \
        if plan.with_generator else None
    return f, g

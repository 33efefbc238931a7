"""Pure-PyTorch twin of :func:`colabx.distance_transform` (docs/design.md, "Op 2"): the test
oracle and the benchmark baseline. Plain and exact, O(V·n) per axis, works on CPU and CUDA tensors.

Separable exact EDT: start from g = 0 on feature voxels and +inf elsewhere; along each spatial
axis k replace g by  g'(x) = min_i g(x with x_k := i) + (s_k·(x_k − i))²  (brute-force min over
all i, by broadcasting in chunks); the distance is sqrt(g) after the last axis.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_CHUNK_ELEMS = 1 << 24  # elements of the broadcast [..., chunk, n] temporary (soft cap)
_MAX_CHUNKS = 16  # at most this many chunks per axis (keeps torch.compile graphs small)


def _min_plus_axis(g: torch.Tensor, axis: int, s: float) -> torch.Tensor:
    """min over i of g[..., i, ...] + (s·(x − i))² along ``axis``, for every x."""
    g = g.movedim(axis, -1)
    n = g.shape[-1]
    pos = torch.arange(n, device=g.device, dtype=g.dtype)
    out = torch.empty_like(g)
    lines = max(1, g.numel() // n)
    chunk = min(n, max(-(-n // _MAX_CHUNKS), _CHUNK_ELEMS // max(1, lines * n)))
    for x0 in range(0, n, chunk):
        x = pos[x0 : x0 + chunk]
        w = ((x[:, None] - pos[None, :]) * s) ** 2  # [chunk, n]
        out[..., x0 : x0 + chunk] = (g[..., None, :] + w).amin(dim=-1)
    return out.movedim(-1, axis)


def _edt(feature: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """Distance from every voxel of ``feature`` [B, *S] (bool) to the nearest True voxel of its
    own item; +inf for items without one."""
    g = torch.where(feature, 0.0, float("inf")).to(torch.float32)
    nsp = feature.dim() - 1
    for k in reversed(range(nsp)):
        g = _min_plus_axis(g, k + 1, float(spacing[k]))
    return g.sqrt()


def distance_transform(
    mask: torch.Tensor, spacing: Sequence[float] | None = None, signed: bool = False
) -> torch.Tensor:
    """Reference EDT: ``mask`` [B, H, W] or [B, D, H, W] (nonzero = inside); float32 output.

    Unsigned: distance to the nearest nonzero voxel of the same item (0 on it, +inf for an empty
    item). Signed (CoLab's ``one_hot2dist``): outside the distance to the mask, inside
    −(distance to the background − 1); 0 everywhere in an item that is empty or full.
    """
    m = mask != 0
    nsp = m.dim() - 1
    sp = [1.0] * nsp if spacing is None else [float(s) for s in spacing]
    dout = _edt(m, sp)
    if not signed:
        return dout
    din = _edt(~m, sp)
    inside = torch.where(torch.isinf(din), 0.0, 1.0 - din)
    outside = torch.where(torch.isinf(dout), 0.0, dout)
    return torch.where(m, inside, outside)

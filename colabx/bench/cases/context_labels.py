"""Benchmark cases for colabx.context_labels: forward + backward (all levels) vs the PyTorch twin
(eager and torch.compile)."""

from __future__ import annotations

import torch

from colabx import context_labels
from colabx.bench.harness import Case
from colabx.twins.context_labels import context_labels_twin


def _inputs(B, t, c, n, device):
    g = torch.Generator().manual_seed(0)
    o = torch.randn(B, t, n, n, n, generator=g).to(device).requires_grad_(True)
    # a blob ROI per item, distance = Euclidean distance to its centre minus the radius
    ax = torch.arange(n, dtype=torch.float32) - n / 2
    r = torch.sqrt(ax.view(-1, 1, 1) ** 2 + ax.view(1, -1, 1) ** 2 + ax.view(1, 1, -1) ** 2)
    rad = n / 6
    y = (r < rad).long().expand(B, n, n, n).contiguous()
    if c > 2:
        y = y * torch.randint(1, c, (B, n, n, n), generator=g)
    d = (r - rad).clamp_min(0).expand(B, n, n, n).contiguous()
    return o, y.to(device), d.to(device)


def _fwd_bwd(fn, o, y, d, c, levels, grads_cache):
    def run():
        outs = fn(o, y, d, c, levels=levels)
        outs = outs if isinstance(outs, list) else [outs]
        if not grads_cache:
            grads_cache.extend(torch.ones_like(x) for x in outs)
        return torch.autograd.grad(outs, [o], grads_cache)

    return run


def _bytes(B, t, c, n, levels, o, y) -> int:
    K = c + t - 1
    V = n**3
    lv = sum((n // 2**k) ** 3 for k in range(levels))
    eo, ey = o.element_size(), y.element_size()
    fwd = B * (t * V * eo + V * ey + V * 4 + K * lv * 4)
    bwd = B * (K * lv * 4 + t * V * eo + V * ey + V * 4 + t * V * eo)
    return fwd + bwd


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    if device.type == "cuda":
        B, t, c = 2, 2, 2
        sizes = [16] if quick else [80, 160]
    else:
        B, t, c = 2, 3, 2
        sizes = [16] if quick else [64, 128]
    out = []
    for n in sizes:
        o, y, d = _inputs(B, t, c, n, device)

        def ours(o_, y_, d_, c_, levels):
            return context_labels(o_, y_, d_, c_, levels=levels, validate=False)

        compiled = torch.compile(context_labels_twin, dynamic=False)
        for levels in (1, 4):
            impls = {
                "colabx": _fwd_bwd(ours, o, y, d, c, levels, []),
                "eager": _fwd_bwd(context_labels_twin, o, y, d, c, levels, []),
                "compile": _fwd_bwd(compiled, o, y, d, c, levels, []),
            }
            out.append(
                Case(
                    op="context_labels",
                    size=f"{B}x{t}x{n}^3 c={c} levels={levels} fwd+bwd",
                    impls=impls,
                    bytes_moved=_bytes(B, t, c, n, levels, o, y),
                    notes={"labels": str(y.dtype), "logits": str(o.dtype)},
                )
            )
    return out

"""Benchmark cases for colabx.distance_transform (exact EDT) vs scipy, the edt package, cuCIM and
the pure-PyTorch twin (eager and torch.compile)."""

from __future__ import annotations

import numpy as np
import torch

import colabx
from colabx.bench.harness import Case
from colabx.twins.distance_transform import distance_transform as twin

SPACING = (0.8, 0.8, 2.5)


def _blobs(batch: int, n: int, seed: int, device: torch.device) -> torch.Tensor:
    """[batch, n, n, n] bool: a few random spheres per item (a sparse, realistic ROI)."""
    g = torch.Generator().manual_seed(seed)
    ax = torch.arange(n, dtype=torch.float32)
    zz, yy, xx = ax[:, None, None], ax[None, :, None], ax[None, None, :]
    out = torch.zeros(batch, n, n, n, dtype=torch.bool)
    for b in range(batch):
        for _ in range(4):
            c = torch.rand(3, generator=g) * n
            r = float(2 + torch.rand(1, generator=g) * n / 10)
            out[b] |= (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r
    return out.to(device)


def _with_threads(n: int, fn):
    def run():
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(old)

    return run


def _scipy_fn(inv: np.ndarray):
    from scipy import ndimage

    return lambda: [ndimage.distance_transform_edt(inv[b], sampling=SPACING)
                    for b in range(inv.shape[0])]


def _edt_fn(inv: np.ndarray, threads: int):
    try:
        import edt
    except ImportError:
        return None
    return lambda: [edt.edt(inv[b], anisotropy=SPACING, parallel=threads)
                    for b in range(inv.shape[0])]


def _max_err_vs_scipy(mask: torch.Tensor) -> float:
    from scipy import ndimage

    got = colabx.distance_transform(mask, SPACING).cpu().numpy()
    inv = ~mask.cpu().numpy()
    err = 0.0
    for b in range(inv.shape[0]):
        ref = ndimage.distance_transform_edt(inv[b], sampling=SPACING)
        err = max(err, float(np.abs(got[b] - ref).max()))
    return err


def _cpu_cases(quick: bool) -> list[Case]:
    sizes = [24] if quick else [128, 256]
    cases = []
    all_threads = torch.get_num_threads()
    compiled = torch.compile(twin)
    for n in sizes:
        mask = _blobs(1, n, seed=n, device=torch.device("cpu"))
        inv = ~mask.numpy()
        size = f"1x{n}^3 sp={SPACING}"
        one = {
            "colabx": _with_threads(1, lambda m=mask: colabx.distance_transform(m, SPACING)),
            "scipy": _scipy_fn(inv),
        }
        if (e := _edt_fn(inv, 1)) is not None:
            one["edt_1t"] = e
        cases.append(Case("distance_transform", f"{size} 1 thread", one, bytes_moved=5 * n**3))
        full = {
            "colabx": lambda m=mask: colabx.distance_transform(m, SPACING),
            "scipy": _scipy_fn(inv),
        }
        if (e := _edt_fn(inv, all_threads)) is not None:
            full["edt_all"] = e
        notes: dict[str, object] = {"threads": all_threads}
        if n <= 128:
            full["eager"] = lambda m=mask: twin(m, SPACING)
            full["compile"] = lambda m=mask: compiled(m, SPACING)
        else:
            notes["skipped"] = "eager/compile twin: one call takes > 20 s at 256^3 on CPU"
        cases.append(Case("distance_transform", f"{size} {all_threads} threads", full,
                          bytes_moved=5 * n**3, notes=notes))
    return cases


def _cucim_fn(mask: torch.Tensor):
    try:
        import cupy
        from cucim.core.operations.morphology import distance_transform_edt
    except Exception:  # noqa: BLE001 - optional baseline
        return None
    inv = cupy.from_dlpack(torch.logical_not(mask).contiguous())
    return lambda: [distance_transform_edt(inv[b], sampling=SPACING)
                    for b in range(inv.shape[0])]


def _cuda_cases(device: torch.device, quick: bool) -> list[Case]:
    shapes = [(1, 24), (2, 16)] if quick else [(1, 80), (1, 256), (8, 80)]
    cases = []
    compiled = torch.compile(twin)
    for batch, n in shapes:
        mask = _blobs(batch, n, seed=batch * 1000 + n, device=device)
        impls = {
            "colabx": lambda m=mask: colabx.distance_transform(m, SPACING),
            "eager": lambda m=mask: twin(m, SPACING),
            "compile": lambda m=mask: compiled(m, SPACING),
        }
        if (c := _cucim_fn(mask)) is not None:
            impls["cucim"] = c
        notes = {"max_abs_err_vs_scipy": _max_err_vs_scipy(mask),
                 "max_dist": float(colabx.distance_transform(mask, SPACING).max())}
        if batch > 1:
            notes["cucim"] = "one call per item"
        cases.append(Case("distance_transform", f"{batch}x{n}^3 sp={SPACING}", impls,
                          bytes_moved=5 * batch * n**3, notes=notes))
    return cases


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    """CPU: 128^3 / 256^3 at 1 thread and at all threads; CUDA: 80^3, 256^3, 8x80^3."""
    if device.type == "cuda":
        return _cuda_cases(device, quick)
    return _cpu_cases(quick)


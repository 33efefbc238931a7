"""The CUDA kernels' device code on host threads (tests/cuda_emulation), against colabx's CPU
kernels: the tile geometry, index math, barriers and warp shuffles of the GPU-only code paths are
tested on machines without a GPU. Timing is not: that needs the device script."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from colabx import _backend, context_labels
from colabx.ops.context_labels import _level_shapes
from colabx.reference.context_labels import normalize_levels

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emulation"
CSRC = ROOT / "csrc"
SOURCES = [EMU / "cuda_emulation.h", EMU / "context_labels_emu.cpp",
           CSRC / "cuda" / "context_labels.cu", CSRC / "common" / "context_labels.h",
           CSRC / "common" / "fast_divmod.h", CSRC / "common" / "macros.h",
           CSRC / "common" / "dispatch.h"]

TOL = {torch.float32: dict(atol=2e-6, rtol=2e-6), torch.float16: dict(atol=2e-6, rtol=2e-6),
       torch.float64: dict(atol=1e-12, rtol=1e-12)}
GRAD_TOL = {torch.float32: dict(atol=2e-6, rtol=2e-6), torch.float16: dict(atol=1e-3, rtol=1e-3),
            torch.float64: dict(atol=1e-12, rtol=1e-12)}


@pytest.fixture(scope="session")
def emu(request, tmp_path_factory):
    """The emulated kernels as a shared library, built with the host C++ compiler (cached by the
    sources' hash in pytest's cache when it is enabled)."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        pytest.skip("needs a C++20 compiler (g++) to build the CUDA emulation")
    key = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:16]
    cache = getattr(request.config, "cache", None)
    where = cache.mkdir("cuda_emulation") if cache else tmp_path_factory.mktemp("cuda_emulation")
    lib = Path(where) / f"context_labels_{key}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w",
                        f"-I{CSRC}", "-o", str(tmp), str(EMU / "context_labels_emu.cpp")],
                       check=True)
        tmp.replace(lib)  # atomic: a concurrent run sees the whole library or none
    so = ctypes.CDLL(str(lib))
    so.emu_context_labels.restype = ctypes.c_int
    return so


def _addresses(tensors):
    return (ctypes.c_uint64 * max(1, len(tensors)))(*[
        0 if x is None else x.data_ptr() for x in tensors])


def _call(emu, backward, kernel, rows, o, y, d, c, strides3, levels, masks=None, grad_o=None,
          margin=30.0, tau=20.0):
    nlev = len(strides3) // 3
    spatial = (ctypes.c_int64 * 3)(*o.shape[2:])
    strides = (ctypes.c_int64 * len(strides3))(*strides3)
    err = ctypes.create_string_buffer(512)
    rc = emu.emu_context_labels(
        int(backward), kernel.encode(), rows, o.shape[0], o.shape[1], c, spatial, o.dim() - 2,
        strides, nlev, ctypes.c_uint64(o.data_ptr()), _backend.dtype_code(o),
        ctypes.c_uint64(y.data_ptr()), _backend.dtype_code(y), ctypes.c_uint64(d.data_ptr()),
        _addresses(levels), _addresses(masks) if masks else None,
        ctypes.c_uint64(grad_o.data_ptr() if grad_o is not None else 0),
        ctypes.c_double(margin), ctypes.c_double(tau), err, len(err))
    if rc == 1:
        raise RuntimeError(err.value.decode())
    return rc == 0


def _inputs(B, t, c, S, dtype, label_dtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed)
    o = (3 * torch.randn(B, t, *S, generator=g, dtype=torch.float64)).to(dtype)
    y = torch.randint(0, c, (B, *S), generator=g)
    y = torch.where(torch.rand(B, *S, generator=g) < 0.7, torch.zeros_like(y), y)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    d = (torch.rand(B, *S, generator=g, dtype=torch.float64) * 80.0)
    d[y > 0] = 0.0
    d.view(-1)[::7] = 30.0  # exactly at the margin
    if B > 1:
        d[-1] = float("inf")
        y[-1] = 0
    return o, y.to(label_dtype), d.to(acc)


def _strides3(levels, spatial):
    out = []
    for s in normalize_levels(levels, spatial):
        out += [1] * (3 - len(s)) + list(s)
    return out


def _emulated(emu, kernel, rows, o, y, d, c, levels, grads):
    """Forward outputs and masks per level, and ∂o for `grads` (a None entry: no gradient),
    from the emulated kernels; None when `kernel` does not take this geometry."""
    strides3 = _strides3(levels, tuple(o.shape[2:]))
    acc = d.dtype
    K = c + o.shape[1] - 1
    shapes = _level_shapes(o.shape[2:], strides3)
    outs = [torch.empty((o.shape[0], K, *s), dtype=acc) for s in shapes]
    masks = [torch.empty((o.shape[0], *s), dtype=acc) for s in shapes]
    if not _call(emu, False, kernel, rows, o, y, d, c, strides3, outs, masks):
        return None
    grad_o = torch.empty_like(o)
    assert _call(emu, True, kernel, rows, o, y, d, c, strides3, grads, grad_o=grad_o)
    return outs, masks, grad_o


def _on_cpu(o, y, d, c, levels, grads):
    o = o.clone().requires_grad_(True)
    labs, masks = context_labels(o, y, d, c, levels=levels, return_mask=True)
    labs, masks = (labs, masks) if isinstance(labs, list) else ([labs], [masks])
    used = [i for i, g in enumerate(grads) if g is not None]
    (g,) = torch.autograd.grad([labs[i] for i in used], [o], [grads[i] for i in used])
    return [x.detach() for x in labs], masks, g


def _upstream(outs, keep, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(x.shape, generator=g, dtype=x.dtype) if i in keep else None
            for i, x in enumerate(outs)]


def _compare(emulated, cpu, dtype):
    outs, masks, g = emulated
    couts, cmasks, cg = cpu
    for a, b in zip(outs, couts, strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype])
    for a, b in zip(masks, cmasks, strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype])
    torch.testing.assert_close(g.float(), cg.float(), **GRAD_TOL[dtype])


# (B, t, c, spatial, levels) for the coalesced tiled kernels: partial tiles along every axis, 2D
# tiles stacked along y, P1 x strides 1 / 2 / 4 (lane groups), level 0 pooled, anisotropic and
# non-power-of-two strides, t = 1..5 (the exact-t kernels and the wide bucket).
TILED2_CASES = [
    (2, 2, 2, (11, 21, 37), 4),
    (1, 3, 3, (37, 45), 4),
    (2, 1, 2, (9, 19, 45), [1, 2, 4, (8, 8, 16)]),
    (1, 4, 2, (5, 12, 40), [1, (1, 2, 4), (1, 4, 8)]),
    (1, 2, 4, (7, 9, 35), [(1, 1, 1), (1, 1, 1), (3, 3, 3)]),
    (2, 5, 2, (6, 10, 36), [2, 4]),
    (1, 2, 2, (9, 11, 50), [1, (1, 1, 2), (2, 2, 6)]),
    (1, 3, 2, (19, 70), [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16)]),
]


def _id(case):
    B, t, c, S, lev = case
    return f"B{B}t{t}c{c}S{'x'.join(map(str, S))}L{lev}".replace(" ", "")


@pytest.mark.parametrize("case", TILED2_CASES, ids=_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_tiled2_kernels_match_the_cpu_kernels(emu, case, dtype):
    B, t, c, S, lev = case
    o, y, d = _inputs(B, t, c, S, dtype, seed=len(S) + t)
    outs = _emulated(emu, "tiled2", 8, o, y, d, c, lev, [None] * 8)
    assert outs is not None, "the coalesced tiled kernels should take this geometry"
    grads = _upstream(outs[0], keep=range(len(outs[0])))
    _compare(_emulated(emu, "tiled2", 2, o, y, d, c, lev, grads), _on_cpu(o, y, d, c, lev, grads),
             dtype)


@pytest.mark.parametrize("case", TILED2_CASES[:4], ids=_id)
def test_tiled2_unused_levels_get_no_gradient(emu, case):
    B, t, c, S, lev = case
    o, y, d = _inputs(B, t, c, S, torch.float32, seed=3)
    n = len(_strides3(lev, S)) // 3
    for keep in ([0], [n - 1], list(range(1, n))):
        probe = _emulated(emu, "tiled2", 2, o, y, d, c, lev, [None] * n)
        grads = _upstream(probe[0], keep=keep)
        _compare(_emulated(emu, "tiled2", 2, o, y, d, c, lev, grads),
                 _on_cpu(o, y, d, c, lev, grads), torch.float32)


@pytest.mark.parametrize("case", TILED2_CASES[:3], ids=_id)
def test_tiled2_rows_per_block_agree_bitwise(emu, case):
    B, t, c, S, lev = case
    o, y, d = _inputs(B, t, c, S, torch.float32, seed=4)
    first = _emulated(emu, "tiled2", 1, o, y, d, c, lev, [None] * 8)
    grads = _upstream(first[0], keep=range(len(first[0])))
    runs = [_emulated(emu, "tiled2", rows, o, y, d, c, lev, grads) for rows in (1, 2, 3, 8)]
    for other in runs[1:]:
        for a, b in zip([*runs[0][0], *runs[0][1], runs[0][2]], [*other[0], *other[1], other[2]],
                        strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32])
def test_tiled2_label_dtypes(emu, label_dtype):
    B, t, c, S, lev = TILED2_CASES[0]
    o, y, d = _inputs(B, t, c, S, torch.float32, label_dtype=label_dtype, seed=6)
    grads = _upstream(_emulated(emu, "tiled2", 2, o, y, d, c, lev, [None] * 8)[0], keep=range(4))
    _compare(_emulated(emu, "tiled2", 2, o, y, d, c, lev, grads),
             _on_cpu(o, y.long(), d, c, lev, grads), torch.float32)


@pytest.mark.parametrize(("kernel", "case"), [
    ("flat", (2, 2, 3, (9, 10, 11), 1)),
    ("flat", (1, 6, 2, (23, 19), 1)),
    ("tiled", (2, 3, 2, (9, 11, 13), 3)),
    ("tiled", (1, 2, 3, (8, 12, 15), [(1, 1, 1), (1, 1, 3), (2, 2, 3)])),
    ("tiled", (1, 2, 2, (7, 9, 10), [(1, 1, 5), (2, 2, 5)])),
    ("tiled", (1, 2, 2, (9, 11, 50), [1, (1, 1, 3), (2, 2, 6)])),
], ids=lambda v: v if isinstance(v, str) else _id(v))
def test_flat_and_tiled_kernels_match_the_cpu_kernels(emu, kernel, case):
    B, t, c, S, lev = case
    o, y, d = _inputs(B, t, c, S, torch.float32, seed=7)
    probe = _emulated(emu, kernel, 0, o, y, d, c, lev, [None] * 8)
    grads = _upstream(probe[0], keep=range(len(probe[0])))
    _compare(_emulated(emu, kernel, 0, o, y, d, c, lev, grads), _on_cpu(o, y, d, c, lev, grads),
             torch.float32)


def test_tiled2_refuses_p1_x_strides_that_do_not_divide_32(emu):
    o, y, d = _inputs(1, 2, 2, (6, 6, 12), torch.float32)
    assert _emulated(emu, "tiled2", 2, o, y, d, 2, [(1, 1, 3), (2, 2, 6)], [None] * 2) is None


def test_emulation_reports_bad_geometry(emu):
    o, y, d = _inputs(1, 2, 2, (6, 6, 12), torch.float32)
    with pytest.raises(RuntimeError, match="stride must divide the next"):
        _call(emu, False, "flat", 0, o, y, d, 2, [1, 1, 2, 1, 1, 3], [o, o], [o, o])


"""The CUDA kernels' device code on host threads (tests/cuda_emulation), against colabx's CPU
kernels: the tile geometry, index math, grid sizing, barriers and warp shuffles of the GPU-only
code paths are tested on machines without a GPU. Each .cu file is compiled with its launches
rewritten for the emulation and runs through its real host entry points; context_labels' kernels
are also called one by one (each kernel forced). Timing is not tested: that needs the device
script."""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_context_labels import make_inputs

from colabx import _backend, context_labels, distance_transform
from colabx.ops import context_labels as ctx_op
from colabx.ops import dice_ce_loss as dce_op
from colabx.ops import roi_bce_loss as bce_op
from colabx.ops.context_labels import level_shapes
from colabx.twins.context_labels import normalize_levels

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emulation"
CSRC = ROOT / "csrc"
I64, U64, P = ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p  # C argument types
COMMON = [EMU / "cuda_emulation.h", CSRC / "common" / "macros.h", CSRC / "common" / "dispatch.h"]

TOL = {torch.float32: dict(atol=2e-6, rtol=2e-6), torch.float16: dict(atol=2e-6, rtol=2e-6),
       torch.float64: dict(atol=1e-12, rtol=1e-12)}
GRAD_TOL = {torch.float32: dict(atol=2e-6, rtol=2e-6), torch.float16: dict(atol=1e-3, rtol=1e-3),
            torch.float64: dict(atol=1e-12, rtol=1e-12)}


def _launches_for_emulation(source: str) -> str:
    """`kernel<<<grid, block, smem, stream>>>(args)` -> `cuda_emu::launcher(kernel, grid, block,
    smem, stream)(args)`, and `__shared__ alignas(n)` -> `alignas(n) __shared__` (where
    __shared__ is `static`, the alignment must come first)."""
    out, n = re.subn(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)<<<([^;]*?)>>>\(",
                     r"cuda_emu::launcher(\1, \2)(", source)
    assert n > 0, "no kernel launch found to rewrite"
    return re.sub(r"__shared__\s+(alignas\(\d+\))", r"\1 __shared__", out)


# The libraries: translation unit (tests/cuda_emulation/<unit>_emu.cpp), the sources it compiles
# (for the cache key), the .cu file whose launches are rewritten (included as <stem>.emu.cu), and
# extra compiler flags.
CTX_SOURCES = [CSRC / "cuda" / "context_labels.cu", CSRC / "cuda" / "context_labels_tile.h",
               CSRC / "common" / "context_labels.h", CSRC / "common" / "fast_divmod.h"]
LOSS_HEADERS = [CSRC / "cuda" / "dice_ce_loss.h", CSRC / "cuda" / "softmax_rows.cuh",
                CSRC / "common" / "dice_ce_loss.h"]
LIBS = {
    "context_labels": ("context_labels", CTX_SOURCES, CSRC / "cuda" / "context_labels.cu", []),
    "dice_ce_loss": ("dice_ce_loss", [CSRC / "cuda" / "dice_ce_loss.cu", *LOSS_HEADERS],
                     CSRC / "cuda" / "dice_ce_loss.cu", []),
    "roi_bce_loss": ("roi_bce_loss", [CSRC / "cuda" / "roi_bce_loss.cu", *LOSS_HEADERS,
                                      CSRC / "cuda" / "roi_bce_loss.h",
                                      CSRC / "common" / "roi_bce_loss.h"],
                     CSRC / "cuda" / "roi_bce_loss.cu", []),
    "distance_transform": ("distance_transform", [CSRC / "cuda" / "distance_transform.cu",
                                                  CSRC / "cuda" / "distance_transform.h",
                                                  CSRC / "common" / "distance_transform.h"],
                           CSRC / "cuda" / "distance_transform.cu", []),
}


@pytest.fixture(scope="session")
def emu_libs(request, tmp_path_factory) -> dict[str, Path]:
    """Every LIBS entry as a shared library, compiled concurrently with the host C++ compiler and
    cached by the sources' and flags' hash in pytest's cache (when it is enabled)."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        pytest.skip("needs a C++20 compiler (g++) to build the CUDA emulation")
    cache = getattr(request.config, "cache", None)
    where = Path(cache.mkdir("cuda_emulation") if cache
                 else tmp_path_factory.mktemp("cuda_emulation"))
    libs, jobs = {}, []
    for name, (unit_name, sources, rewrite, flags) in LIBS.items():
        unit = EMU / f"{unit_name}_emu.cpp"
        key = hashlib.sha256(b"".join(p.read_bytes() for p in [unit, *COMMON, *sources]) +
                             " ".join(flags).encode())
        lib = libs[name] = where / f"{name}_{key.hexdigest()[:16]}.so"
        if lib.exists():
            continue
        gen = where / f"gen_{name}_{os.getpid()}"
        gen.mkdir(exist_ok=True)
        if rewrite is not None:
            rewritten = _launches_for_emulation(rewrite.read_text())
            (gen / f"{rewrite.stem}.emu.cu").write_text(rewritten)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", *flags,
               f"-I{CSRC}", f"-I{gen}", "-o", str(tmp), str(unit)]
        jobs.append((subprocess.Popen(cmd), tmp, lib, gen))
    for proc, tmp, lib, gen in jobs:
        if proc.wait() != 0:
            raise RuntimeError(f"building the CUDA emulation failed: {' '.join(proc.args)}")
        tmp.replace(lib)  # atomic: a concurrent run sees the whole library or none
        shutil.rmtree(gen)
    return libs


def _context_labels_lib(path: Path) -> ctypes.CDLL:
    so = ctypes.CDLL(str(path))
    so.emu_context_labels.restype = ctypes.c_int
    i, d = ctypes.c_int, ctypes.c_double
    tail = [I64, I64, I64, P, i, P, i, U64, i, U64, i, U64, P, P, U64, d, d, ctypes.c_char_p, i]
    so.emu_context_labels.argtypes = [i, ctypes.c_char_p, i, *tail]
    so.emu_context_labels_entry.argtypes = [i, *tail]
    return so


@pytest.fixture(scope="session")
def emu(emu_libs):
    """context_labels.cu's kernels, each callable by name, and its host entry points."""
    return _context_labels_lib(emu_libs["context_labels"])


@pytest.fixture(scope="session")
def emu_loss(emu_libs):
    """dice_ce_loss.cu's host entry points and kernels."""
    so = ctypes.CDLL(str(emu_libs["dice_ce_loss"]))
    i, d, s = ctypes.c_int, ctypes.c_double, ctypes.c_char_p
    so.emu_set_resident_blocks.argtypes = [i]
    so.emu_dice_ce_loss_forward.argtypes = [i, P, P, i, P, I64, I64, P, P, i, P, d, U64, U64, U64,
                                            s, i]
    so.emu_dice_ce_loss_backward.argtypes = [i, U64, P, P, i, P, I64, I64, P, P, i, P, d, U64, P,
                                             P, s, i]
    so.emu_dice_ce_loss_limits.argtypes = [P]
    return so


@pytest.fixture(scope="session")
def emu_bce(emu_libs):
    """roi_bce_loss.cu's host entry points and kernels."""
    so = ctypes.CDLL(str(emu_libs["roi_bce_loss"]))
    i, s = ctypes.c_int, ctypes.c_char_p
    so.emu_set_resident_blocks.argtypes = [i]
    so.emu_roi_bce_loss_forward.argtypes = [U64, U64, i, i, I64, I64, I64, P, i, U64, U64, s, i]
    so.emu_roi_bce_loss_backward.argtypes = [U64, U64, U64, i, i, I64, I64, I64, P, i, U64, s, i]
    return so


@pytest.fixture(scope="session")
def emu_edt(emu_libs):
    """distance_transform.cu's host entry point and kernels."""
    so = ctypes.CDLL(str(emu_libs["distance_transform"]))
    i = ctypes.c_int
    so.emu_distance_transform.argtypes = [U64, U64, U64, U64, I64, P, P, i, i, ctypes.c_char_p,
                                          i]
    so.emu_set_shared_optin.argtypes = [i]
    return so


def _addresses(tensors):
    return (ctypes.c_uint64 * max(1, len(tensors)))(*[
        0 if x is None else x.data_ptr() for x in tensors])


def _call(emu, backward, kernel, rows, o, y, d, c, flat_strides, levels, masks=None, grad_o=None,
          margin=30.0, tau=20.0):
    nlev = len(flat_strides) // 3
    spatial = (ctypes.c_int64 * 3)(*o.shape[2:])
    strides = (ctypes.c_int64 * len(flat_strides))(*flat_strides)
    err = ctypes.create_string_buffer(512)
    args = (o.shape[0], o.shape[1], c, spatial, o.dim() - 2, strides, nlev,
            ctypes.c_uint64(o.data_ptr()), _backend.dtype_code(o), ctypes.c_uint64(y.data_ptr()),
            _backend.dtype_code(y), ctypes.c_uint64(d.data_ptr()), _addresses(levels),
            _addresses(masks) if masks else None,
            ctypes.c_uint64(grad_o.data_ptr() if grad_o is not None else 0),
            ctypes.c_double(margin), ctypes.c_double(tau), err, len(err))
    if kernel is None:  # the host entry points choose
        rc = emu.emu_context_labels_entry(int(backward), *args)
    else:
        rc = emu.emu_context_labels(int(backward), kernel.encode(), rows, *args)
    if rc == 1:
        raise RuntimeError(err.value.decode())
    return rc == 0


def _inputs(B, t, c, S, dtype, label_dtype=torch.int64, seed=0, far_roi=False):
    """test_context_labels' inputs, with the distance in the kernels' accumulation dtype."""
    o, y, d = make_inputs(B, t, c, S, dtype, seed=seed, label_dtype=label_dtype, far_roi=far_roi)
    return o, y, d.to(torch.float64 if dtype == torch.float64 else torch.float32)


def _flat_strides(levels, spatial):
    out = []
    for s in normalize_levels(levels, spatial):
        out += [1] * (3 - len(s)) + list(s)
    return out


def _emulated(emu, kernel, rows, o, y, d, c, levels, grads):
    """Forward outputs and masks per level, and ∂o for `grads` (a None entry: no gradient),
    from the emulated kernels (`kernel` None: the host entry points' choice); None when
    `kernel` does not take this geometry."""
    flat_strides = _flat_strides(levels, tuple(o.shape[2:]))
    acc = d.dtype
    K = c + o.shape[1] - 1
    shapes = level_shapes(o.shape[2:], flat_strides)
    outs = [torch.empty((o.shape[0], K, *s), dtype=acc) for s in shapes]
    masks = [torch.empty((o.shape[0], *s), dtype=acc) for s in shapes]
    if not _call(emu, False, kernel, rows, o, y, d, c, flat_strides, outs, masks):
        return None
    grad_o = torch.empty_like(o)
    assert _call(emu, True, kernel, rows, o, y, d, c, flat_strides, grads, grad_o=grad_o)
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


def _check_case(emu, kernel, rows, case, dtype=torch.float32, seed=0, far_roi=False):
    """Forward and backward (a gradient on every level) of `kernel` (None: the host entry
    points' choice) against the CPU kernels."""
    B, t, c, S, lev = case
    o, y, d = _inputs(B, t, c, S, dtype, seed=seed, far_roi=far_roi)
    probe = _emulated(emu, kernel, rows, o, y, d, c, lev, [None] * 8)
    assert probe is not None, f"the {kernel} kernels should take this geometry"
    grads = _upstream(probe[0], keep=range(len(probe[0])))
    _compare(_emulated(emu, kernel, rows, o, y, d, c, lev, grads), _on_cpu(o, y, d, c, lev, grads),
             dtype)


# (B, t, c, spatial, levels) for the tiled kernels: partial tiles along every axis, 2D
# tiles stacked along y, P1 x strides 1 / 2 / 4 (lane groups), level 0 pooled, anisotropic and
# non-power-of-two strides, t = 1..5 (the exact-t kernels and the wide bucket).
TILED_CASES = [
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


@pytest.mark.parametrize("case", TILED_CASES, ids=_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_tiled_kernels_match_the_cpu_kernels(emu, case, dtype):
    _check_case(emu, "tiled", 2, case, dtype, seed=len(case[3]) + case[1])


@pytest.mark.parametrize("kernel", ["tiled", "flat"])
def test_roi_voxels_far_by_their_distance_keep_their_label(emu, kernel):
    # ROI voxels whose distance says "far" (even +inf): mask 1 and one-hot label, as on the CPU
    case = (2, 3, 3, (9, 11, 37), [1, 2] if kernel == "tiled" else 1)
    _check_case(emu, kernel, 2 if kernel == "tiled" else 0, case, torch.float32, seed=8,
                far_roi=True)


@pytest.mark.parametrize("case", TILED_CASES[:4], ids=_id)
def test_tiled_unused_levels_get_no_gradient(emu, case):
    B, t, c, S, lev = case
    o, y, d = _inputs(B, t, c, S, torch.float32, seed=3)
    n = len(_flat_strides(lev, S)) // 3
    for keep in ([0], [n - 1], list(range(1, n))):
        probe = _emulated(emu, "tiled", 2, o, y, d, c, lev, [None] * n)
        grads = _upstream(probe[0], keep=keep)
        _compare(_emulated(emu, "tiled", 2, o, y, d, c, lev, grads),
                 _on_cpu(o, y, d, c, lev, grads), torch.float32)


@pytest.mark.parametrize("case", TILED_CASES[:3], ids=_id)
def test_tiled_rows_per_block_agree_bitwise(emu, case):
    B, t, c, S, lev = case
    o, y, d = _inputs(B, t, c, S, torch.float32, seed=4)
    first = _emulated(emu, "tiled", 1, o, y, d, c, lev, [None] * 8)
    grads = _upstream(first[0], keep=range(len(first[0])))
    runs = [_emulated(emu, "tiled", rows, o, y, d, c, lev, grads) for rows in (1, 2, 3, 8)]
    for other in runs[1:]:
        for a, b in zip([*runs[0][0], *runs[0][1], runs[0][2]], [*other[0], *other[1], other[2]],
                        strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32])
def test_tiled_label_dtypes(emu, label_dtype):
    B, t, c, S, lev = TILED_CASES[0]
    o, y, d = _inputs(B, t, c, S, torch.float32, label_dtype=label_dtype, seed=6)
    grads = _upstream(_emulated(emu, "tiled", 2, o, y, d, c, lev, [None] * 8)[0], keep=range(4))
    _compare(_emulated(emu, "tiled", 2, o, y, d, c, lev, grads),
             _on_cpu(o, y.long(), d, c, lev, grads), torch.float32)


@pytest.mark.parametrize("case", [(2, 2, 3, (9, 10, 11), 1), (1, 6, 2, (23, 19), 1)], ids=_id)
def test_flat_kernels_match_the_cpu_kernels(emu, case):
    _check_case(emu, "flat", 0, case, seed=7)


# (B, t, c, spatial, levels) through the host entry points (which choose the kernel and the thread
# rows, an occupancy query, emulated): one level (flat kernel), pooled levels (tiled), 2D and 3D,
# the wide t bucket.
ENTRY_CASES = [
    (2, 3, 2, (9, 10, 11), 1),
    (2, 2, 2, (11, 21, 37), 4),
    (1, 6, 3, (21, 19), [1, 2]),
    (1, 2, 2, (9, 11, 50), [1, (1, 1, 2), (2, 2, 4)]),
    (2, 4, 2, (37, 45), 3),
]


@pytest.mark.parametrize("case", ENTRY_CASES, ids=_id)
def test_host_entry_points_match_the_cpu_kernels(emu, case):
    _check_case(emu, None, 0, case, seed=8)


def test_tiled_refuses_p1_x_strides_that_do_not_divide_32(emu):
    o, y, d = _inputs(1, 2, 2, (6, 6, 12), torch.float32)
    assert _emulated(emu, "tiled", 2, o, y, d, 2, [(1, 1, 3), (2, 2, 6)], [None] * 2) is None
    with pytest.raises(RuntimeError, match="no tile for these levels"):
        _emulated(emu, None, 0, o, y, d, 2, [(1, 1, 3), (2, 2, 6)], [None] * 2)


def test_emulation_reports_bad_geometry(emu):
    o, y, d = _inputs(1, 2, 2, (6, 6, 12), torch.float32)
    with pytest.raises(RuntimeError, match="stride must divide the next"):
        _call(emu, False, "flat", 0, o, y, d, 2, [1, 1, 2, 1, 1, 3], [o, o], [o, o])



# ---------------------------------------------------------------------------------- dice_ce_loss

def _ints(values, ctype=ctypes.c_int64):
    return (ctype * max(1, len(values)))(*values)


def _check(rc, err):
    if rc:
        raise RuntimeError(err.value.decode())


def _loss_inputs(B, K, spatials, dtype, hard, seed=0, label_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    zs, ts = [], []
    for S in spatials:
        zs.append((2 * torch.randn(B, K, *S, generator=g, dtype=torch.float64)).to(dtype))
        if hard:
            ts.append(torch.randint(0, K, (B, *S), generator=g).to(label_dtype))
        else:
            ts.append(torch.softmax(2 * torch.randn(B, K, *S, generator=g, dtype=torch.float64),
                                    1).to(cdt))
    return zs, ts


def _loss_limits(emu_loss) -> tuple[int, int, int]:
    """(partial voxels, max K, max levels) of csrc/cuda/dice_ce_loss.h, as compiled into the
    emulated kernels."""
    out = (ctypes.c_int64 * 3)()
    emu_loss.emu_dice_ce_loss_limits(out)
    return tuple(out)


def _workspace(size_fn, *args):
    """The CUDA path's workspace, sized as the ops size it (the extension's function), NaN
    filled, with a NaN guard behind it; and a check, after the forward, that the kernels wrote
    nothing past its end (they use fewer partials than it holds when tiles are larger)."""
    n = size_fn(*args)
    work = torch.full((n + GUARD,), float("nan"), dtype=torch.float64)

    def check():
        assert torch.isnan(work[n:]).all(), "a kernel wrote past the workspace"

    return work, check


GUARD = 64


def _emulated_loss(emu_loss, zs, ts, dice, weights, smooth, grad_value):
    B, K = zs[0].shape[:2]
    cdt = torch.float64 if zs[0].dtype == torch.float64 else torch.float32
    V = [math.prod(z.shape[2:]) for z in zs]
    L, NS = len(zs), 3 * K + 1
    work, check_work = _workspace(_backend.ext().dice_ce_loss_cuda_workspace_size, B, K, V)
    stats = torch.empty((L, B, NS), dtype=cdt)
    loss = torch.empty((), dtype=cdt)
    err = ctypes.create_string_buffer(512)
    codes = [_backend.dtype_code(t) for t in ts]
    common = (_addresses(zs), _addresses(ts), _backend.dtype_code(zs[0]),
              _ints(codes, ctypes.c_int), B, K, _ints(V), _ints(dice), len(dice),
              (ctypes.c_double * L)(*weights), ctypes.c_double(smooth))
    _check(emu_loss.emu_dice_ce_loss_forward(L, *common, ctypes.c_uint64(stats.data_ptr()),
                                             ctypes.c_uint64(loss.data_ptr()),
                                             ctypes.c_uint64(work.data_ptr()), err, len(err)), err)
    check_work()
    grad = torch.full((), grad_value, dtype=cdt)
    gz = [torch.full_like(z, float("nan")) for z in zs]
    gt = [None if not t.dtype.is_floating_point else torch.full_like(t, float("nan")) for t in ts]
    _check(emu_loss.emu_dice_ce_loss_backward(L, ctypes.c_uint64(grad.data_ptr()), *common,
                                              ctypes.c_uint64(stats.data_ptr()), _addresses(gz),
                                              _addresses(gt), err, len(err)), err)
    return loss, stats, gz, gt


def _cpu_loss(zs, ts, dice, weights, smooth, grad_value):
    loss, stats = dce_op._forward_kernels(zs, ts, dice, weights, smooth)
    grad = torch.full((), grad_value, dtype=loss.dtype)
    gz, gt = dce_op._backward_kernels(grad, zs, ts, stats, dice, weights, smooth, True)
    return loss, stats, gz, [g if g.numel() else None for g in gt]


def _assert_loss_matches(got, want, tol):
    """(loss, stats, ∂logits per level, ∂targets per level or None) of two runs agree."""
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)
    for a, b in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    for a, b in zip(got[3], want[3], strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **tol)


LOSS_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12),
            torch.float16: dict(atol=1e-3, rtol=1e-3), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}

# (B, K, spatial sizes per level, hard targets): odd sizes (ragged tiles, unaligned rows), the
# exact-K buckets 2..4 and the 8 / 16 buckets, 1..3 deep-supervision levels, 2D and 3D.
LOSS_CASES = [
    (2, 2, [(9, 10, 11)], False),
    (1, 3, [(17, 19, 23), (8, 9, 11)], False),
    (2, 4, [(33, 35)], True),
    (3, 5, [(7, 9, 13), (3, 4, 6), (1, 2, 3)], False),
    (1, 6, [(40, 41)], True),
    (2, 9, [(5, 7, 9)], False),
]


@pytest.mark.parametrize("resident", [3, 1000], ids=["grid-stride", "block-per-tile"])
@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: f"B{c[0]}K{c[1]}L{len(c[2])}"
                         f"{'hard' if c[3] else 'soft'}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dice_ce_loss_kernels_match_the_cpu_kernels(emu_loss, case, dtype, resident):
    # A few resident blocks make each block stride over many tiles (and flush its running sums);
    # many give one block per tile.
    B, K, spatials, hard = case
    zs, ts = _loss_inputs(B, K, spatials, dtype, hard, seed=K)
    dice = list(range(1, K)) if K % 2 else list(range(K))
    weights = [1.0 / (i + 1) for i in range(len(zs))]
    emu_loss.emu_set_resident_blocks(resident)
    got = _emulated_loss(emu_loss, zs, ts, dice, weights, 1e-5, 0.75)
    want = _cpu_loss(zs, ts, dice, weights, 1e-5, 0.75)
    _assert_loss_matches(got, want, LOSS_TOL[dtype])


@pytest.mark.parametrize("resident", [2, 1000], ids=["grid-stride", "block-per-tile"])
def test_dice_ce_loss_mixed_target_levels(emu_loss, resident):
    # Soft, hard, soft levels: the soft levels share one launch, the hard level has its own, and
    # the finalize must still find every level's partials.
    spatials = [(9, 11, 13), (5, 6, 7), (3, 3, 4)]
    zs, soft = _loss_inputs(2, 4, spatials, torch.float32, False, seed=3)
    _, hard = _loss_inputs(2, 4, spatials, torch.float32, True, seed=4)
    ts = [soft[0], hard[1], soft[2]]
    emu_loss.emu_set_resident_blocks(resident)
    got = _emulated_loss(emu_loss, zs, ts, [1, 2, 3], [0.5, 0.3, 0.2], 1e-5, 1.5)
    want = _cpu_loss(zs, ts, [1, 2, 3], [0.5, 0.3, 0.2], 1e-5, 1.5)
    _assert_loss_matches(got, want, LOSS_TOL[torch.float32])


def test_dice_ce_loss_most_levels_in_one_launch(emu_loss):
    # kDceMaxLevels = 16 levels fill the launch table; a 17th is refused by the entry point.
    spatials = [(3 + i % 5, 2 + i % 3) for i in range(16)]
    zs, ts = _loss_inputs(2, 3, spatials, torch.float32, False, seed=6)
    weights = [1.0 + i for i in range(16)]
    emu_loss.emu_set_resident_blocks(4)
    got = _emulated_loss(emu_loss, zs, ts, [1, 2], weights, 1e-5, 1.0)
    want = _cpu_loss(zs, ts, [1, 2], weights, 1e-5, 1.0)
    _assert_loss_matches(got, want, LOSS_TOL[torch.float32])
    zs, ts = _loss_inputs(1, 3, [(2, 2)] * 17, torch.float32, False)
    with pytest.raises(RuntimeError, match="bad per-level argument lengths"):
        _emulated_loss(emu_loss, zs, ts, [1, 2], [1.0] * 17, 1e-5, 1.0)


@pytest.mark.parametrize("hard", [False, True])
def test_dice_ce_loss_rows_off_vector_alignment(emu_loss, hard):
    # V a multiple of every bucket's vector width, but the tensors start one element past an
    # aligned address: the kernels must take their element-wise loads and stores throughout.
    def shifted(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype)
        out = buf[1:].view(t.shape)
        out.copy_(t)
        return out

    zs, ts = _loss_inputs(2, 3, [(8, 8, 8), (4, 4, 4)], torch.float32, hard, seed=8)
    zs, ts = [shifted(z) for z in zs], [shifted(t) for t in ts]
    emu_loss.emu_set_resident_blocks(3)
    got = _emulated_loss(emu_loss, zs, ts, [1, 2], [0.6, 0.4], 1e-5, 1.0)
    want = _cpu_loss(zs, ts, [1, 2], [0.6, 0.4], 1e-5, 1.0)
    for a, b in zip(got[:2] + tuple(got[2]), want[:2] + tuple(want[2]), strict=True):
        torch.testing.assert_close(a, b, **LOSS_TOL[torch.float32])


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32])
def test_dice_ce_loss_hard_label_dtypes(emu_loss, label_dtype):
    zs, ts = _loss_inputs(2, 3, [(11, 12, 13)], torch.float32, True, label_dtype=label_dtype)
    emu_loss.emu_set_resident_blocks(5)
    got = _emulated_loss(emu_loss, zs, ts, [1, 2], [1.0], 1e-5, 1.0)
    want = _cpu_loss(zs, [t.long() for t in ts], [1, 2], [1.0], 1e-5, 1.0)
    torch.testing.assert_close(got[0], want[0], **LOSS_TOL[torch.float32])
    torch.testing.assert_close(got[2][0], want[2][0], **LOSS_TOL[torch.float32])


def test_dice_ce_loss_is_bitwise_reproducible(emu_loss):
    zs, ts = _loss_inputs(2, 3, [(13, 14, 15)], torch.float32, False, seed=9)
    emu_loss.emu_set_resident_blocks(7)
    a = _emulated_loss(emu_loss, zs, ts, [1, 2], [1.0], 1e-5, 1.0)
    b = _emulated_loss(emu_loss, zs, ts, [1, 2], [1.0], 1e-5, 1.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(x, y) for x, y in zip(a[2] + a[3], b[2] + b[3], strict=True))


@pytest.mark.parametrize("resident", [2, 1000])
@pytest.mark.parametrize(("K", "S", "dtype"), [(2, (9, 10, 11), torch.float32),
                                               (3, (31, 33), torch.bfloat16),
                                               (6, (7, 8, 9), torch.float64)])
def test_roi_bce_loss_kernels_match_the_cpu_kernels(emu_bce, K, S, dtype, resident):
    g = torch.Generator().manual_seed(K)
    z = (2 * torch.randn(2, K, *S, generator=g, dtype=torch.float64)).to(dtype)
    lab = torch.randint(0, K, (2, *S), generator=g)
    roi = list(range(1, K))
    B, V = 2, math.prod(S)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    emu_bce.emu_set_resident_blocks(resident)
    work, check_work = _workspace(_backend.ext().roi_bce_loss_cuda_workspace_size, B, V)
    loss = torch.empty((), dtype=cdt)
    err = ctypes.create_string_buffer(512)
    args = (ctypes.c_uint64(z.data_ptr()), ctypes.c_uint64(lab.data_ptr()),
            _backend.dtype_code(z), _backend.dtype_code(lab), B, K, V, _ints(roi), len(roi))
    _check(emu_bce.emu_roi_bce_loss_forward(*args, ctypes.c_uint64(loss.data_ptr()),
                                             ctypes.c_uint64(work.data_ptr()), err, len(err)), err)
    check_work()
    grad = torch.full((), 0.5, dtype=cdt)
    gz = torch.full_like(z, float("nan"))
    _check(emu_bce.emu_roi_bce_loss_backward(ctypes.c_uint64(grad.data_ptr()), *args,
                                              ctypes.c_uint64(gz.data_ptr()), err, len(err)), err)
    torch.testing.assert_close(loss, bce_op._forward_kernels(z, lab, roi), **LOSS_TOL[dtype])
    torch.testing.assert_close(gz.float(), bce_op._backward_kernels(grad, z, lab, roi).float(),
                               **LOSS_TOL[dtype])


# ------------------------------------------------------------- routing and sizing of the CUDA path

def _fake_cuda(shape, dtype=torch.float32):
    """What the routing functions read of a CUDA tensor: its device, shape and dtype."""
    return SimpleNamespace(device=torch.device("cuda", 0), shape=torch.Size(shape), dtype=dtype)


@pytest.fixture
def cuda_built(monkeypatch):
    """colabx as built with CUDA kernels, on a machine whose CUDA runtime sees a device."""
    monkeypatch.setattr(_backend, "_cuda_unavailable_reason", lambda device: None)


def test_loss_sizing_and_routing_follow_the_kernel_limits(emu_loss, cuda_built):
    per, max_k, max_levels = _loss_limits(emu_loss)
    assert (per, max_k, max_levels) == (256, 16, 16)  # csrc/cuda/dice_ce_loss.h
    ext = _backend.ext()
    # (B·slots per level + L·B) · (3K+1): B = 2, K = 3, V = 300 and 10 -> (4 + 2 + 4) · 10
    assert ext.dice_ce_loss_cuda_workspace_size(2, 3, [300, 10]) == 100
    assert ext.roi_bce_loss_cuda_workspace_size(3, 513) == 9
    assert [ext.roi_bce_loss_cuda_workspace_size(1, v) for v in (1, 256, 257, 1000)] \
        == [1, 1, 2, 4]
    z = _fake_cuda((2, max_k, 9, 7))
    assert dce_op._kernels_for(z, max_k, max_levels)
    assert not dce_op._kernels_for(z, max_k + 1, 1)
    assert not dce_op._kernels_for(z, 2, max_levels + 1)
    assert bce_op._kernels_for(z, max_k) and not bce_op._kernels_for(z, max_k + 1)
    assert dce_op._kernels_for(torch.zeros(1, 40, 2, 2), 40)  # the CPU kernels take any K
    # the kernels take exactly that: K = max_k runs, max_k + 1 is refused
    zs, ts = _loss_inputs(2, max_k, [(5, 6, 7), (2, 3, 3)], torch.float32, False, seed=11)
    emu_loss.emu_set_resident_blocks(4)
    _assert_loss_matches(_emulated_loss(emu_loss, zs, ts, [1, 5], [0.7, 0.3], 1e-5, 1.0),
                         _cpu_loss(zs, ts, [1, 5], [0.7, 0.3], 1e-5, 1.0),
                         LOSS_TOL[torch.float32])
    zs, ts = _loss_inputs(1, max_k + 1, [(3, 4)], torch.float32, False)
    with pytest.raises(RuntimeError, match=f"K must be in 2..{max_k}"):
        _emulated_loss(emu_loss, zs, ts, [1], [1.0], 1e-5, 1.0)


def test_context_labels_routing_follows_the_kernels_t_limit(emu, cuda_built):
    max_t = emu.emu_context_labels_max_t()
    assert max_t == 16
    flat_strides = _flat_strides(2, (8, 9, 10))
    assert ctx_op._kernels_for(_fake_cuda((1, max_t, 8, 9, 10)), flat_strides, 2)
    assert not ctx_op._kernels_for(_fake_cuda((1, max_t + 1, 8, 9, 10)), flat_strides, 2)
    _check_case(emu, None, 0, (1, max_t, 2, (8, 9, 10), 2), seed=12)  # the kernels take max_t
    o, y, d = _inputs(1, max_t + 1, 2, (8, 9, 10), torch.float32)
    with pytest.raises(RuntimeError, match=f"t must be <= {max_t}"):
        _emulated(emu, None, 0, o, y, d, 2, 2, [None] * 2)


# (levels, t, spatial, bytes of the tile's per-level statistics = cells · (t + 1) · 4, whether a
# tile fits): the tile's statistics must fit 48 KiB of shared memory, its x extent 256 threads and
# the first pooled level's x stride must divide 32.
TILE_CASES = [
    ([1, 2, 4, (8, 8, 16)], 16, (8, 16, 32), True),
    ([1, (1, 1, 3), (2, 2, 6)], 2, (6, 6, 12), False),     # P1 x stride 3
    ([1, (1, 1, 1), (16, 16, 16)], 16, (16, 16, 32), False),  # 16·16·32 cells · 17 · 4 > 48 KiB
    ([1, (2, 2, 2), (4, 4, 4)], 16, (8, 8, 32), True),
]


@pytest.mark.parametrize(("levels", "t", "spatial", "fits"), TILE_CASES)
def test_context_labels_routing_asks_the_extension(emu, cuda_built, levels, t, spatial, fits):
    flat_strides = _flat_strides(levels, spatial)
    assert ctx_op._kernels_for(_fake_cuda((1, t, *spatial)), flat_strides, 2) == fits
    if fits:  # what colabx routes to the kernels, they run, and right
        _check_case(emu, None, 0, (1, t, 2, spatial, levels), seed=13)
    else:  # what they refuse, colabx never routes to them
        o, y, d = _inputs(1, t, 2, spatial, torch.float32)
        with pytest.raises(RuntimeError, match="no tile for these levels"):
            _emulated(emu, None, 0, o, y, d, 2, levels, [None] * 3)


# ---------------------------------------------------------------------------- distance_transform

def _emulated_edt(emu_edt, mask, spacing, signed, workspace=None):
    """The emulated EDT; workspace None: given exactly when the host code asks for one."""
    m = mask.to(torch.uint8).contiguous()
    out = torch.full(m.shape, float("nan"), dtype=torch.float32)
    scratch = torch.empty_like(out) if signed else None
    if workspace is None:
        workspace = max(m.shape[1:-1]) > emu_edt.emu_edt_smem_max_n()
    workspace = torch.empty(out.numel() * 2, dtype=torch.float32) if workspace else None
    nsp = m.dim() - 1
    err = ctypes.create_string_buffer(512)
    _check(emu_edt.emu_distance_transform(
        m.data_ptr(), out.data_ptr(), 0 if scratch is None else scratch.data_ptr(),
        0 if workspace is None else workspace.data_ptr(), m.shape[0], _ints(list(m.shape[1:])),
        (ctypes.c_double * nsp)(*spacing), nsp, int(signed), err, len(err)), err)
    return out


# Row widths pick the register kernels' chunk counts (<= 32, 64, 128, 256, 512) and the general
# row kernel (> 512); a strided axis over 640 takes the global-memory envelope (workspace) on a
# device with sm_80's shared memory or more.
EDT_CASES = [
    ((2, 9, 20), (1.0, 1.0)),
    ((1, 13, 50), (0.7, 1.3)),
    ((2, 5, 100), (1.0, 2.5)),
    ((1, 6, 200), (1.0, 1.0)),
    ((1, 4, 300), (2.0, 0.5)),
    ((1, 3, 600), (1.0, 1.0)),
    ((1, 700, 5), (1.0, 1.0)),
    ((2, 7, 9, 11), (1.0, 1.0, 1.0)),
    ((1, 5, 33, 70), (2.5, 0.8, 0.8)),
    ((1, 260, 2, 3), (1.0, 1.0, 1.0)),
]


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize(("shape", "spacing"), EDT_CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v[0], int) else None)
def test_distance_transform_kernels_match_the_cpu_kernels(emu_edt, shape, spacing, signed):
    g = torch.Generator().manual_seed(sum(shape))
    mask = torch.rand(shape, generator=g) < 0.02
    mask[-1] = False  # an item without features: +inf (unsigned)
    mask.view(shape[0], -1)[0, 0] = True
    got = _emulated_edt(emu_edt, mask, spacing, signed)
    want = distance_transform(mask, spacing=spacing, signed=signed)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)


@pytest.fixture
def small_shared_memory(emu_edt):
    """Set the emulated device's opt-in shared memory per block; restored afterwards."""
    yield emu_edt.emu_set_shared_optin
    emu_edt.emu_set_shared_optin(228 * 1024)


# (opt-in bytes per block, the longest strided axis kept in shared memory): sm_75, sm_86/89, sm_80
# and later (capped at 640)
SHARED_OPTIN = [(64 * 1024, 341), (99 * 1024, 528), (163 * 1024, 640)]


@pytest.mark.parametrize(("optin", "max_n"), SHARED_OPTIN, ids=["sm75", "sm86", "sm80"])
@pytest.mark.parametrize("n", [256, 341, 342, 528, 529, 640])
def test_distance_transform_lines_follow_the_devices_shared_memory(emu_edt, small_shared_memory,
                                                                   optin, max_n, n):
    small_shared_memory(optin)
    assert emu_edt.emu_edt_smem_max_n() == max_n
    g = torch.Generator().manual_seed(n)
    mask = torch.rand((1, n, 3), generator=g) < 0.01
    mask[0, n // 2, 1] = True
    want = distance_transform(mask, spacing=(1.0, 1.0))
    if n > max_n:  # the global-memory envelope: without its workspace the host code refuses
        with pytest.raises(RuntimeError, match=f"an axis longer than {max_n} needs the CUDA "
                                               "workspace"):
            _emulated_edt(emu_edt, mask, (1.0, 1.0), False, workspace=False)
    torch.testing.assert_close(_emulated_edt(emu_edt, mask, (1.0, 1.0), False), want,
                               atol=1e-5, rtol=1e-6)

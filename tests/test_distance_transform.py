"""distance_transform: colabx op vs scipy (independent oracle) and vs the pure-PyTorch twin."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

import colabx
from colabx.ops.distance_transform import compute_distance_transform
from colabx.twins.distance_transform import distance_transform as twin

RTOL, ATOL = 2e-6, 1e-5


def scipy_edt(mask: np.ndarray, spacing) -> np.ndarray:
    """Per-item scipy EDT with the op's empty-item convention (+inf)."""
    out = np.empty(mask.shape, np.float64)
    for b in range(mask.shape[0]):
        m = mask[b] != 0
        out[b] = ndimage.distance_transform_edt(~m, sampling=spacing) if m.any() else np.inf
    return out


def scipy_signed(mask: np.ndarray, spacing) -> np.ndarray:
    """CoLab's one_hot2dist formula per item, computed with scipy; 0 for empty / full items."""
    out = np.zeros(mask.shape, np.float64)
    for b in range(mask.shape[0]):
        pos = mask[b] != 0
        if pos.any() and not pos.all():
            neg = ~pos
            out[b] = ndimage.distance_transform_edt(neg, sampling=spacing) * neg - (
                ndimage.distance_transform_edt(pos, sampling=spacing) - 1
            ) * pos
    return out


def close(actual: torch.Tensor, expected: np.ndarray | torch.Tensor, rtol=RTOL, atol=ATOL):
    exp = torch.as_tensor(expected).to(torch.float64)
    act = actual.to(torch.float64).cpu()
    assert act.shape == exp.shape
    assert torch.equal(torch.isinf(act), torch.isinf(exp)), "inf pattern differs"
    fin = torch.isfinite(exp)
    torch.testing.assert_close(act[fin], exp[fin], rtol=rtol, atol=atol)


def blobs(shape, n, rng, radius=(1.0, 6.0)) -> np.ndarray:
    """A few random ellipsoid blobs: a realistic sparse ROI."""
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    m = np.zeros(shape, bool)
    for _ in range(n):
        c = [rng.uniform(0, s) for s in shape]
        r = [rng.uniform(*radius) for _ in shape]
        m |= sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grids, c, r, strict=True)) <= 1
    return m


def random_case(rng, ndim):
    shape = tuple(int(s) for s in rng.integers(1, 14 if ndim == 3 else 40, size=ndim))
    batch = int(rng.integers(1, 4))
    density = float(rng.choice([0.0005, 0.01, 0.1, 0.5, 0.95]))
    mask = rng.random((batch, *shape)) < density
    spacing = tuple(float(s) for s in rng.uniform(0.3, 3.0, size=ndim))
    return mask, spacing


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("seed", range(12))
def test_random_vs_scipy(ndim, seed):
    rng = np.random.default_rng(seed * 10 + ndim)
    mask, spacing = random_case(rng, ndim)
    sp = spacing if seed % 3 else None
    out = colabx.distance_transform(torch.from_numpy(mask), spacing=sp)
    assert out.dtype == torch.float32 and not out.requires_grad
    close(out, scipy_edt(mask, sp))


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_signed_vs_scipy(ndim, seed):
    rng = np.random.default_rng(100 + seed)
    mask, spacing = random_case(rng, ndim)
    out = colabx.distance_transform(torch.from_numpy(mask), spacing=spacing, signed=True)
    close(out, scipy_signed(mask, spacing))


def test_blobs_anisotropic_3d_and_twin():
    rng = np.random.default_rng(7)
    shape = (21, 34, 27)
    mask = np.stack([blobs(shape, 3, rng), blobs(shape, 1, rng), np.zeros(shape, bool),
                     np.ones(shape, bool)])
    sp = (0.8, 0.8, 2.5)
    expected = scipy_edt(mask, sp)
    out = colabx.distance_transform(torch.from_numpy(mask), spacing=sp)
    close(out, expected)
    assert torch.isinf(out[2]).all() and (out[3] == 0).all()
    close(twin(torch.from_numpy(mask), sp), expected, rtol=1e-5)
    close(twin(torch.from_numpy(mask), sp, signed=True), scipy_signed(mask, sp), rtol=1e-5)
    signed = colabx.distance_transform(torch.from_numpy(mask), spacing=sp, signed=True)
    assert (signed[2] == 0).all() and (signed[3] == 0).all()
    assert (signed[0][torch.from_numpy(mask[0])] <= 1).all()


@pytest.mark.parametrize("ndim", [2, 3])
def test_op_vs_twin_random(ndim):
    rng = np.random.default_rng(55 + ndim)
    for _ in range(4):
        mask, spacing = random_case(rng, ndim)
        m = torch.from_numpy(mask)
        for signed in (False, True):
            close(colabx.distance_transform(m, spacing, signed=signed),
                  twin(m, spacing, signed=signed), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", [(9, 1, 7), (1, 11, 1), (1, 1, 1), (5, 6, 1), (1, 13)])
def test_corners_and_thin_axes(shape):
    for corner in range(2 ** len(shape)):
        idx = tuple((s - 1) if (corner >> a) & 1 else 0 for a, s in enumerate(shape))
        mask = np.zeros((1, *shape), bool)
        mask[(0, *idx)] = True
        sp = tuple(0.5 + a for a in range(len(shape)))
        close(colabx.distance_transform(torch.from_numpy(mask), sp), scipy_edt(mask, sp))


def test_larger_volume_multithread_paths():
    # Enough slices for the fused row+H path, W not a multiple of the 16-wide tile.
    rng = np.random.default_rng(3)
    shape = (70, 45, 37)
    mask = blobs(shape, 4, rng, radius=(2.0, 9.0))[None]
    sp = (2.5, 0.8, 0.8)
    close(colabx.distance_transform(torch.from_numpy(mask), sp), scipy_edt(mask, sp))
    mask2 = rng.random((2, 300, 211)) < 0.001
    close(colabx.distance_transform(torch.from_numpy(mask2)), scipy_edt(mask2, None))


@pytest.mark.parametrize(
    "dtype", [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float16, torch.bfloat16,
              torch.float32, torch.float64],
)
def test_mask_dtypes_and_noncontiguous(dtype):
    rng = np.random.default_rng(11)
    base = rng.random((2, 17, 12, 9)) < 0.05
    expected = scipy_edt(base, (1.0, 2.0, 0.5))
    vals = torch.from_numpy(base).to(dtype)
    if dtype in (torch.uint8, torch.int32, torch.int64):
        vals = vals * 7  # any nonzero value counts
    elif dtype.is_floating_point:
        vals = vals * -0.25
    out = colabx.distance_transform(vals, spacing=[1.0, 2.0, 0.5])
    close(out, expected)
    # non-contiguous: a transposed copy and a strided slice
    t = vals.transpose(1, 3).contiguous().transpose(1, 3)
    assert not t.is_contiguous()
    close(colabx.distance_transform(t, spacing=(1.0, 2.0, 0.5)), expected)
    big = torch.zeros(2, 34, 12, 9, dtype=dtype)
    big[:, ::2] = vals
    close(colabx.distance_transform(big[:, ::2], (1.0, 2.0, 0.5)), expected)


def test_scalar_spacing_and_thread_counts():
    rng = np.random.default_rng(5)
    mask = rng.random((3, 30, 25, 20)) < 0.01
    expected = scipy_edt(mask, (1.5, 1.5, 1.5))
    old = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            close(colabx.distance_transform(torch.from_numpy(mask), 1.5), expected)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("spacing", [
    (np.float32(0.8), np.float32(1.25), np.float32(2.5)),  # nibabel's header.get_zooms()
    np.array([0.8, 1.25, 2.5]), torch.tensor([0.8, 1.25, 2.5], dtype=torch.float64)],
    ids=["numpy-scalars", "ndarray", "tensor"])
def test_numpy_and_torch_spacings(spacing):
    rng = np.random.default_rng(6)
    mask = rng.random((2, 13, 11, 9)) < 0.02
    close(colabx.distance_transform(torch.from_numpy(mask), spacing),
          scipy_edt(mask, (0.8, 1.25, 2.5)))
    for one in (np.float32(2.5), np.int64(2), np.array(2.5)):
        close(colabx.distance_transform(torch.from_numpy(mask), one),
              scipy_edt(mask, (float(one),) * 3))


def test_internal_function_and_empty_tensor():
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[0, 1, 2] = True
    out = compute_distance_transform(mask, (1.0, 1.0))
    close(out, scipy_edt(mask.numpy(), (1.0, 1.0)))
    assert colabx.distance_transform(torch.zeros(0, 3, 4, dtype=torch.bool)).shape == (0, 3, 4)
    assert colabx.distance_transform(torch.zeros(2, 0, 4, 5)).shape == (2, 0, 4, 5)


def test_bad_inputs():
    m = torch.zeros(1, 4, 4, dtype=torch.bool)
    with pytest.raises(TypeError, match="mask"):
        colabx.distance_transform(np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="mask"):
        colabx.distance_transform(torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        colabx.distance_transform(torch.zeros(1, 2, 2, 2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        colabx.distance_transform(torch.zeros(1, 4, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="spacing"):
        colabx.distance_transform(m, spacing=(1.0, 2.0, 3.0))
    for bad in [(0.0, 1.0), (-1.0, 1.0), (float("inf"), 1.0), (float("nan"), 1.0)]:
        with pytest.raises(ValueError, match="spacing"):
            colabx.distance_transform(m, spacing=bad)
    for bad in [(1e19, 1.0), (1.0, 1e-25)]:  # squared in float32: inf, or 0
        with pytest.raises(ValueError, match=r"spacing values must be between 1e-12 and 1e\+12"):
            colabx.distance_transform(m, spacing=bad)
    with pytest.raises(TypeError, match="spacing"):
        colabx.distance_transform(m, spacing="ab")
    with pytest.raises(TypeError, match="signed"):
        colabx.distance_transform(m, signed=1)


def test_torch_compile_fullgraph():
    mask = torch.zeros(1, 6, 7, dtype=torch.bool)
    mask[0, 2, 3] = True

    @torch.compile(fullgraph=True, backend="eager")
    def f(m):
        return colabx.distance_transform(m, spacing=(2.0, 1.0)) * 2

    close(f(mask), 2 * scipy_edt(mask.numpy(), (2.0, 1.0)))


def test_opcheck():
    mask = torch.zeros(2, 5, 6, dtype=torch.uint8)
    mask[0, 1, 1] = 1
    torch.library.opcheck(torch.ops.colabx.distance_transform.default, (mask, [1.0, 2.0], False),
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------- CUDA


def _cuda_cases():
    rng = np.random.default_rng(1234)
    cases = []
    for ndim in (2, 3):
        for _ in range(6):
            cases.append(random_case(rng, ndim))
    return cases


@pytest.mark.cuda
def test_cuda_vs_scipy_twin_and_cpu():
    for mask, spacing in _cuda_cases():
        m = torch.from_numpy(mask)
        for signed in (False, True):
            out = colabx.distance_transform(m.cuda(), spacing, signed=signed)
            expected = scipy_signed(mask, spacing) if signed else scipy_edt(mask, spacing)
            close(out, expected)
            close(out, twin(m.cuda(), spacing, signed=signed).cpu(), rtol=1e-5, atol=1e-4)
            close(out, colabx.distance_transform(m, spacing, signed=signed))


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(80, 80, 80), (37, 300, 45), (5, 1100, 9), (1100, 3, 40)])
def test_cuda_larger_and_long_axes(shape):
    # long strided axes (> shared-memory limit) take the global-workspace path
    rng = np.random.default_rng(sum(shape))
    mask = np.stack([blobs(shape, 3, rng, radius=(1.0, 12.0)), rng.random(shape) < 1e-4])
    sp = (0.8, 0.8, 2.5)
    out = colabx.distance_transform(torch.from_numpy(mask).cuda(), sp)
    expected = scipy_edt(mask, sp)
    fin = np.isfinite(expected)
    err = np.abs(out.cpu().numpy()[fin] - expected[fin]).max()
    assert err <= 1e-4 * max(1.0, expected[fin].max())
    close(out, colabx.distance_transform(torch.from_numpy(mask), sp))


@pytest.mark.cuda
def test_cuda_batch_items_independent_and_deterministic():
    rng = np.random.default_rng(9)
    shape = (40, 33, 29)
    mask = np.stack([blobs(shape, 2, rng), np.zeros(shape, bool), np.ones(shape, bool),
                     rng.random(shape) < 0.002])
    m = torch.from_numpy(mask).cuda()
    first = colabx.distance_transform(m, (0.8, 0.8, 2.5))
    assert torch.isinf(first[1]).all() and (first[2] == 0).all()
    for _ in range(3):
        assert torch.equal(colabx.distance_transform(m, (0.8, 0.8, 2.5)), first)
    for b in range(4):
        assert torch.equal(colabx.distance_transform(m[b : b + 1], (0.8, 0.8, 2.5))[0], first[b])
    sgn = colabx.distance_transform(m, (0.8, 0.8, 2.5), signed=True)
    assert torch.equal(colabx.distance_transform(m, (0.8, 0.8, 2.5), signed=True), sgn)


@pytest.mark.cuda
def test_cuda_dtypes_noncontiguous_compile():
    rng = np.random.default_rng(2)
    base = rng.random((2, 17, 12, 9)) < 0.05
    expected = scipy_edt(base, (1.0, 2.0, 0.5))
    for dtype in (torch.bool, torch.uint8, torch.int64, torch.float16, torch.bfloat16):
        t = torch.from_numpy(base).to(dtype).cuda().transpose(1, 3).contiguous().transpose(1, 3)
        close(colabx.distance_transform(t, (1.0, 2.0, 0.5)), expected)
    f = torch.compile(lambda m: colabx.distance_transform(m, (1.0, 2.0, 0.5)), fullgraph=True)
    close(f(torch.from_numpy(base).cuda()), expected)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "shape",
    [(256, 8, 40), (257, 5, 33), (3, 256, 70), (2, 257, 31), (640, 2, 3), (1, 1, 1),
     (4, 6, 256), (3, 4, 300), (2, 3, 513), (2, 5, 129)],
)
def test_cuda_row_and_line_kernels_vs_scipy(shape):
    # Strided passes: cp.async kernel (uint8 vertex indices up to 256, uint16 above) vs scipy;
    # line counts not multiples of a block. Rows: register kernel (W <= 512, 1..16 chunks per
    # lane) and rows_kernel (W > 512).
    rng = np.random.default_rng(sum(shape) + 5)
    mask = np.stack([blobs(shape, 2, rng, radius=(1.0, 5.0)), rng.random(shape) < 0.003,
                     rng.random(shape) < 0.5, np.zeros(shape, bool)])
    mask[3, -1, -1, -1] = True  # one far corner feature: long envelopes
    m = torch.from_numpy(mask).cuda()
    for sp, signed in (((0.8, 0.8, 2.5), False), ((2.5, 1.3, 0.7), True)):
        new = colabx.distance_transform(m, sp, signed=signed)
        close(new, scipy_signed(mask, sp) if signed else scipy_edt(mask, sp))
        m2, sp2 = mask[:, :, :, 0], sp[:2]  # 2D items: the H pass takes the square root
        exp2 = scipy_signed(m2, sp2) if signed else scipy_edt(m2, sp2)
        close(colabx.distance_transform(torch.from_numpy(m2).cuda(), sp2, signed=signed), exp2)


def test_twin_chunked_vs_scipy(monkeypatch):
    import colabx.twins.distance_transform as ref

    monkeypatch.setattr(ref, "_CHUNK_ELEMS", 1)  # force many chunks per axis
    rng = np.random.default_rng(21)
    mask = rng.random((2, 40, 7, 35)) < 0.01
    sp = (0.7, 1.9, 1.1)
    close(ref.distance_transform(torch.from_numpy(mask), sp), scipy_edt(mask, sp), rtol=1e-5)

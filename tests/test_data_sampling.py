"""Patch sampling: shapes (2D/3D), ROI forcing and class balance, jitter, padding values of small
volumes and borders, ROI location subsampling."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from colabx.data.preprocessing import PreprocessedCase
from colabx.data.sampling import (
    MAX_LOCATIONS,
    SamplingCase,
    _crop,
    roi_locations,
    sample_patch,
)


def make_case(shape, boxes=(), channels=2, context=True, spacing=None, seed=0):
    """In-memory case: random image, label boxes (class k+1 for boxes[k]), exact distance map."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.int16)
    for k, box in enumerate(boxes):
        label[box] = k + 1
    spacing = spacing or (1.0,) * len(shape)
    roi = label > 0
    distance = (ndi.distance_transform_edt(~roi, sampling=spacing).astype(np.float32)
                if roi.any() else np.full(shape, np.inf, np.float32))
    image = rng.normal(size=(channels, *shape)).astype(np.float32)
    ctx = (rng.integers(0, 3, size=shape).astype(np.int16) if context else None)
    return PreprocessedCase("c", image, label, distance, ctx, tuple(spacing), {})


@pytest.mark.parametrize("shape,patch", [((30, 26, 20), (16, 12, 8)), ((40, 33), (24, 16)),
                                         ((10, 12, 9), (16, 16, 16)), ((8, 40), (16, 16))])
@pytest.mark.parametrize("force", [False, True])
def test_shapes_and_dtypes(shape, patch, force):
    box = tuple(slice(n // 3, n // 3 + 2) for n in shape)
    case = SamplingCase.from_case(make_case(shape, [box]))
    rng = np.random.default_rng(0)
    for _ in range(5):
        out = sample_patch(case, patch, rng, force_roi=force)
        assert set(out) == {"image", "label", "distance", "context"}
        assert out["image"].shape == (2, *patch) and out["image"].dtype == np.float32
        for k in ("label", "distance", "context"):
            assert out[k].shape == patch
        assert out["label"].dtype == np.int16 and out["distance"].dtype == np.float32
        assert all(type(v) is np.ndarray and v.flags.c_contiguous for v in out.values())
    # no context map -> no key
    out = sample_patch(make_case(shape, [box], context=False), patch, rng, force_roi=force)
    assert "context" not in out


def test_patch_is_a_window_of_the_volume():
    case = make_case((30, 26, 20), [(slice(5, 9), slice(3, 6), slice(10, 12))])
    rng = np.random.default_rng(1)
    for force in (False, True):
        for _ in range(10):
            out = sample_patch(case, (16, 12, 8), rng, force_roi=force)
            # locate the patch by its (unique, continuous random) image values
            hits = np.argwhere(case.image[0] == out["image"][0, 8, 6, 4])
            if not len(hits):  # that voxel is padding; covered by the padding tests
                continue
            s = hits[0] - np.array([8, 6, 4])
            lo, hi = np.maximum(s, 0), np.minimum(s + (16, 12, 8), case.label.shape)
            inner = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
            local = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, s, strict=True))
            np.testing.assert_array_equal(out["image"][(slice(None), *local)],
                                          case.image[(slice(None), *inner)])
            for k in ("label", "distance", "context"):
                np.testing.assert_array_equal(out[k][local], getattr(case, k)[inner])


@pytest.mark.parametrize("ndim", [2, 3])
def test_roi_forcing_puts_roi_in_the_central_half(ndim):
    shape = (60, 50, 40)[:ndim]
    patch = (16, 12, 20)[:ndim]
    box = (slice(50, 52), slice(3, 5), slice(30, 31))[:ndim]  # tiny ROI near a border
    case = SamplingCase.from_case(make_case(shape, [box]))
    rng = np.random.default_rng(2)
    for _ in range(50):
        out = sample_patch(case, patch, rng, force_roi=True)
        central = tuple(slice(p // 2 - p // 4, p // 2 + p // 4 + 1) for p in patch)
        assert (out["label"][central] > 0).any()
        assert (out["distance"][central] == 0).any()
    # an explicit offset puts the ROI voxel exactly there
    for offset in [(0,) * ndim, tuple(-(p // 2) for p in patch), tuple(p - 1 - p // 2
                                                                     for p in patch)]:
        out = sample_patch(case, patch, rng, force_roi=True, roi_offset=offset)
        assert out["label"][tuple(p // 2 + o for p, o in zip(patch, offset, strict=True))] == 1
    with pytest.raises(ValueError, match="roi_offset"):
        sample_patch(case, patch, rng, force_roi=True, roi_offset=tuple(p - p // 2
                                                                         for p in patch))
    # uniform sampling rarely sees this ROI
    hits = sum((sample_patch(case, patch, rng, force_roi=False)["label"] > 0).any()
               for _ in range(50))
    assert hits < 25


def test_roi_forcing_balances_classes():
    big = (slice(0, 30), slice(0, 30), slice(0, 20))
    small = (slice(40, 41), slice(40, 41), slice(5, 6))  # one voxel
    case = SamplingCase.from_case(make_case((50, 50, 20), [big, small]))
    rng = np.random.default_rng(3)
    centre = [sample_patch(case, (8, 8, 8), rng, force_roi=True, roi_offset=(0, 0, 0))
              ["label"][4, 4, 4] for _ in range(200)]
    counts = np.bincount(centre, minlength=3)
    assert counts[0] == 0 and 70 <= counts[1] <= 130 and 70 <= counts[2] <= 130


def test_force_roi_without_roi_is_uniform():
    case = make_case((20, 20, 10), [])
    out = sample_patch(case, (8, 8, 8), np.random.default_rng(0), force_roi=True)
    assert (out["label"] == 0).all() and np.isinf(out["distance"]).all()


def test_small_volume_is_centred_and_padded():
    case = make_case((5, 6), [(slice(1, 3), slice(2, 4))], channels=1)
    out = sample_patch(case, (9, 10), np.random.default_rng(0), force_roi=False)
    inner = (slice(2, 7), slice(2, 8))  # need (4, 4): the volume sits at offset 2
    np.testing.assert_array_equal(out["image"][0][inner], case.image[0])
    mask = np.ones((9, 10), bool)
    mask[inner] = False
    assert (out["image"][0][mask] == 0).all()
    assert (out["label"][mask] == 0).all() and (out["context"][mask] == 0).all()
    np.testing.assert_array_equal(out["label"][inner], case.label)
    np.testing.assert_array_equal(out["distance"], np.pad(case.distance, 2, mode="edge"))
    # odd need: start in {-2, -1} along the first axis (nnU-Net's get_bbox range)
    starts = set()
    for s in range(20):
        o = sample_patch(case, (8, 6), np.random.default_rng(s), force_roi=False)
        starts.add(int(np.argwhere(o["image"][0] == case.image[0, 0, 0])[0, 0]))
    assert starts == {1, 2}


def test_border_padding_values():
    case = make_case((12, 14, 10), [(slice(0, 1), slice(0, 1), slice(0, 1))])
    out = sample_patch(case, (8, 6, 4), np.random.default_rng(0), force_roi=True,
                       roi_offset=(0, 0, 0))
    # ROI voxel (0, 0, 0) at (4, 3, 2): start (-4, -3, -2)
    pad = ((4, 0), (3, 0), (2, 0))
    want = {
        "label": np.pad(case.label, pad)[:8, :6, :4],
        "context": np.pad(case.context, pad)[:8, :6, :4],
        "distance": np.pad(case.distance, pad, mode="edge")[:8, :6, :4],
    }
    for k, v in want.items():
        np.testing.assert_array_equal(out[k], v)
    np.testing.assert_array_equal(out["image"], np.pad(case.image, ((0, 0), *pad))[:, :8, :6, :4])


@pytest.mark.parametrize("start", [(0, 0), (-3, 2), (5, -4), (-2, -2), (8, 9)])
@pytest.mark.parametrize("pad", [0.0, "edge"])
def test_crop_equals_padded_reference(start, pad):
    arr = np.arange(2 * 10 * 12, dtype=np.float32).reshape(2, 10, 12)
    size = (6, 7)
    w = 8
    mode = {"mode": "edge"} if pad == "edge" else {"mode": "constant"}
    ref = np.pad(arr, ((0, 0), (w, w), (w, w)), **mode)
    want = ref[:, start[0] + w: start[0] + w + 6, start[1] + w: start[1] + w + 7]
    np.testing.assert_array_equal(_crop(arr, start, size, pad), want)


def test_roi_locations_subsample_and_ignore():
    label = np.zeros((120, 120, 10), np.int16)
    label[:110, :110] = 1  # 121 000 voxels -> max(10 000, 1 210) kept
    label[115:, 115:, :2] = 2  # 50 voxels -> all
    label[0, 119, 0] = 4  # the ignore label
    locs = roi_locations(label, ignore_label=4)
    assert sorted(locs) == [1, 2]
    assert locs[1].size == MAX_LOCATIONS and locs[2].size == 50
    for c, idx in locs.items():
        assert (label.reshape(-1)[idx] == c).all() and (np.diff(idx) > 0).all()
    again = roi_locations(label.copy(), ignore_label=4)
    np.testing.assert_array_equal(locs[1], again[1])  # same in every process
    huge = np.ones((1_100_000,), np.int16)
    assert roi_locations(huge)[1].size == 11_000  # 1 % coverage beats the cap
    assert roi_locations(np.zeros((4, 4), np.int16)) == {}


def test_errors():
    case = make_case((10, 10, 10), [])
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="patch_size"):
        sample_patch(case, (8, 8), rng, force_roi=False)
    with pytest.raises(ValueError, match="patch_size"):
        sample_patch(case, (8, 0, 8), rng, force_roi=False)
    with pytest.raises(TypeError, match="rng"):
        sample_patch(case, 8, np.random.RandomState(0), force_roi=False)
    with pytest.raises(TypeError, match="case"):
        sample_patch({"label": case.label}, 8, rng, force_roi=False)

"""Preprocessing: crop, resample, normalisation, distance maps, fingerprint cache, parallel runs,
atomic output. Tiny synthetic nnU-Net v2 datasets with anisotropic spacing, written with nibabel."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

from colabx.data.datasets import DatasetError, load_dataset
from colabx.data.preprocessing import (
    crop_to_nonzero,
    ct_statistics,
    fullres_target_spacing,
    load_preprocessed,
    nearest_indices,
    normalization_schemes,
    normalize_image,
    preprocess_dataset,
    resample_image,
    resample_labels,
    separate_z_axis,
    target_shape,
)

SHAPE = (22, 18, 9)
BOX = (slice(3, 19), slice(2, 15), slice(1, 8))  # the nonzero (body) region
SPACINGS = [(0.8, 1.0, 2.5), (0.9, 1.0, 3.0), (0.8, 1.2, 2.5)]  # anisotropic, median (0.8,1,2.5)
LABELS = {"background": 0, "organ": 1, "tumour": 2}


def _affine(spacing) -> np.ndarray:
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = (10.0, -5.0, 3.0)
    return a


def _save(path: Path, arr: np.ndarray, spacing) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, _affine(spacing)), str(path))
    return path


def _case(seed: int, n_channels: int, roi: bool = True):
    """CT-like image (HU) zero outside BOX, organ (1) holding a tumour (2), context organs."""
    rng = np.random.default_rng(seed)
    image = np.zeros((n_channels, *SHAPE), np.float32)
    label = np.zeros(SHAPE, np.uint8)
    context = np.zeros(SHAPE, np.uint8)
    x, y, z = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    organ = ((x - 10 - seed) ** 2 / 25 + (y - 8) ** 2 / 16 + (z - 4) ** 2 / 4) <= 1
    tumour = ((x - 10 - seed) ** 2 + (y - 8) ** 2 + (z - 4) ** 2) <= 3
    other = ((x - 15) ** 2 / 4 + (y - 12) ** 2 / 4 + (z - 4) ** 2 / 4) <= 1
    for c in range(n_channels):
        body = rng.normal(-80, 30, size=SHAPE) + 400 * c
        body[organ] += 140
        body[tumour] += 90
        body[other] += 200
        body.flat[rng.integers(0, body.size, 4)] += 3000  # outliers the clip removes
        image[c][BOX] = body[BOX]
    if roi:
        label[organ] = 1
        label[tumour] = 2
    context[organ] = 1
    context[other] = 2
    return image, label, context


def make_ds(root: Path, n_cases: int = 3, channels=("CT",), context: bool = False,
            empty: tuple[int, ...] = (), spacings=SPACINGS) -> dict[str, tuple]:
    """nnU-Net v2 raw dataset; returns case id → (image, label, context, spacing)."""
    root.mkdir(parents=True, exist_ok=True)
    js = {"name": "Prep", "channel_names": {str(i): n for i, n in enumerate(channels)},
          "labels": LABELS, "numTraining": n_cases, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(js))
    out = {}
    for k in range(n_cases):
        cid = f"case_{k:03d}"
        sp = spacings[k % len(spacings)]
        image, label, ctx = _case(k, len(channels), roi=k not in empty)
        for c in range(len(channels)):
            _save(root / "imagesTr" / f"{cid}_{c:04d}.nii.gz", image[c], sp)
        _save(root / "labelsTr" / f"{cid}.nii.gz", label, sp)
        if context:
            _save(root / "contextTr" / f"{cid}.nii.gz", ctx, sp)
        out[cid] = (image, label, ctx, sp)
    return out


def _run(root: Path, out: Path, **kw):
    kw.setdefault("progress", False)
    return preprocess_dataset(load_dataset(root), out, **kw)


# -- array operations -----------------------------------------------------------------------------


def test_crop_to_nonzero_union_over_channels():
    img = np.zeros((2, 10, 12, 6), np.float32)
    img[0, 2:5, 3:4, 1:3] = 1.0
    img[1, 4:8, 6:9, 2:5] = -2.0
    bbox, mask = crop_to_nonzero(img)
    assert bbox == (slice(2, 8), slice(3, 9), slice(1, 5))
    assert mask.shape == (10, 12, 6) and mask.sum() == 3 * 1 * 2 + 4 * 3 * 3
    bbox, mask = crop_to_nonzero(np.zeros((1, 4, 5, 6), np.float32))
    assert bbox == (slice(0, 4), slice(0, 5), slice(0, 6)) and not mask.any()


def test_nonzero_mask_has_its_holes_filled():
    img = np.zeros((1, 9, 9, 9), np.float32)
    img[0, 1:8, 1:8, 1:8] = 5.0
    img[0, 3:6, 3:6, 3:6] = 0.0  # an enclosed zero region (e.g. air in a bowel loop)
    img[0, 1:8, 1:8, 1] = 0.0  # and an open one: a zero face stays outside the mask
    bbox, mask = crop_to_nonzero(img)
    assert mask[3:6, 3:6, 3:6].all() and not mask[1:8, 1:8, 1].any()
    assert mask.sum() == 7 * 7 * 6 and bbox == (slice(1, 8), slice(1, 8), slice(2, 8))
    ring = np.zeros((1, 9, 9), np.float32)  # 2D: nothing is filled, as in nnU-Net
    ring[0, 2:7, 2:7] = 1.0
    ring[0, 4, 4] = 0.0
    assert not crop_to_nonzero(ring)[1][4, 4]


def test_target_shape_rounds_in_nnunets_order():
    # spacing / target first, then times the size: products near .5 round as in nnU-Net
    assert target_shape((5,), (1.2,), (0.8,)) == (7,)
    assert target_shape((3,), (0.7,), (0.6,)) == (4,)
    assert target_shape((4, 1), (1.0, 1.0), (3.0, 5.0)) == (1, 1)  # at least 1


def test_target_spacing_follows_nnunet_for_thick_slices():
    # ACDC-like: thick, few slices; the 10th percentile of the thick axis, not the median
    spacings = [(0.8, 0.8, z) for z in (5.0, 5.0, 6.0, 3.0, 2.5)]
    shapes = [(200, 200, 16)] * 5
    np.testing.assert_allclose(fullres_target_spacing(spacings, shapes),
                               (0.8, 0.8, np.percentile([5.0, 5.0, 6.0, 3.0, 2.5], 10)))
    assert fullres_target_spacing(spacings, shapes)[2] == pytest.approx(2.7)
    # many slices (3 x 16 is not below 40): the median stays
    assert fullres_target_spacing(spacings, [(40, 40, 16)] * 5) == (0.8, 0.8, 5.0)
    # spacing under 3x the others: the median stays
    assert fullres_target_spacing([(1.0, 1.0, 2.5)] * 3, shapes[:3]) == (1.0, 1.0, 2.5)
    # the 10th percentile is never below the other axes' spacing
    low = fullres_target_spacing([(1.0, 1.0, 4.0)] * 3 + [(1.0, 1.0, 0.5)] * 2, shapes)
    assert low[2] == pytest.approx(1.0 + 1e-5)
    # 2D: the median, even for an axis over 3x the other with few pixels (nnU-Net's 2D images
    # carry a placeholder axis that is always the coarsest)
    assert fullres_target_spacing([(0.5, 0.7), (0.7, 0.9), (0.6, 0.8)], [(9, 9)] * 3) == \
        (0.6, 0.8)
    assert fullres_target_spacing([(4, 1), (6, 1), (8, 1), (10, 1)], [(20, 200)] * 4) == \
        (7.0, 1.0)


def test_separate_z_axis_rule():
    assert separate_z_axis((0.8, 1.0, 3.1), (1.0, 1.0, 1.0)) == 2
    assert separate_z_axis((1.0, 1.0, 1.0), (4.0, 1.0, 1.0)) == 0  # the target is anisotropic
    assert separate_z_axis((1.0, 1.0, 2.9), (1.0, 1.0, 2.9)) is None
    assert separate_z_axis((0.3, 1.25, 1.25), (1.0, 1.0, 1.0)) is None  # two coarse axes
    assert separate_z_axis((1.0, 5.0), (1.0, 1.0)) is None  # 2D
    np.testing.assert_array_equal(nearest_indices(3, 7), [0, 0, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(nearest_indices(7, 3), [1, 3, 5])
    np.testing.assert_array_equal(nearest_indices(5, 5), np.arange(5))


def _nnunet_resize_segmentation(lbl: np.ndarray, shape: tuple[int, ...]
                                ) -> tuple[np.ndarray, np.ndarray]:
    """An independent float64 rendering of nnU-Net's resize_segmentation at order 1
    (skimage.transform.resize, mode "edge", no anti-aliasing): voxel centres mapped, edges
    clamped; each class's one-hot map where >= 0.5, in ascending class order, else 0. Also
    returns where some class's weight is within 1e-6 of 0.5: a true tie, which float rounding
    decides (float64 here and in skimage, float32 in colabx)."""
    grids = np.meshgrid(*[np.clip((np.arange(m) + 0.5) * n / m - 0.5, 0, n - 1)
                          for n, m in zip(lbl.shape, shape, strict=True)], indexing="ij")
    out, tie = np.zeros(shape, lbl.dtype), np.zeros(shape, bool)
    for c in np.unique(lbl):
        w = ndi.map_coordinates((lbl == c).astype(np.float64), grids, order=1, mode="nearest")
        out[w >= 0.5] = c
        tie |= np.abs(w - 0.5) < 1e-6
    return out, tie


def test_resample_labels_follows_nnunet_resize_segmentation():
    rng = np.random.default_rng(0)
    lbl = ndi.zoom(rng.integers(0, 5, size=(6, 6, 4)), 3, order=0).astype(np.int16)  # blobs
    lbl[lbl == 3] = 7  # a gap in the class values
    for shape in [(11, 25, 5), (40, 13, 30), (9, 9, 6), (18, 18, 12), (36, 36, 24)]:
        out = resample_labels(lbl, shape)
        assert out.shape == shape and out.dtype == np.int16
        want, tie = _nnunet_resize_segmentation(lbl, shape)
        assert tie.mean() < 0.2  # most voxels are compared
        np.testing.assert_array_equal(out[~tie], want[~tie])
    assert resample_labels(np.full((3, 4, 5), 2, np.int16), (7, 2, 9)).tolist() == \
        np.full((7, 2, 9), 2).tolist()


def test_resample_labels_keeps_thin_structures_and_zeroes_junctions():
    # a one-voxel plane halved by 2x downsampling: weight exactly 0.5, which nnU-Net gives to
    # the class (an argmax with ties to the lower class erased it)
    plane = np.zeros((8, 8, 8), np.uint8)
    plane[4] = 1
    down = resample_labels(plane, (4, 4, 4))
    assert (down[2] == 1).all() and down.sum() == 16
    # four classes meeting at a corner, each at weight 1/4 at the upsampled corner voxel: no
    # class reaches 0.5, so that voxel is 0, a class the input does not hold
    corner = np.array([[1, 2], [3, 4]], np.int16)
    got = resample_labels(corner, (3, 3))
    assert got[1, 1] == 0 and got[0, 0] == 1 and got[2, 2] == 4
    np.testing.assert_array_equal(got, _nnunet_resize_segmentation(corner, (3, 3))[0])


def test_resample_image_order3_and_identity():
    x = np.linspace(0, 1, 20, dtype=np.float32)
    img = np.broadcast_to(x[:, None, None], (20, 6, 5))[None].copy()
    out = resample_image(img, (40, 6, 5))
    assert out.shape == (1, 40, 6, 5) and out.dtype == np.float32
    # a linear ramp is reproduced by cubic splines away from the (edge-extended) border
    xo = (np.arange(40) + 0.5) * 20 / 40 - 0.5
    np.testing.assert_allclose(out[0, 12:-12, 2, 2], xo[12:-12] / 19, atol=1e-4)
    assert resample_image(img, (20, 6, 5)) is not img
    np.testing.assert_array_equal(resample_image(img, (20, 6, 5)), img)


def test_cubic_resampling_is_clipped_to_the_input_range():
    step = np.zeros((1, 12, 5, 5), np.float32)
    step[0, 6:] = 3.0
    for shape in [(29, 5, 5), (7, 9, 5)]:
        out = resample_image(step, shape)
        assert out.min() == 0.0 and out.max() == 3.0  # unclipped splines ring to -0.27 and 3.27
        assert 0 < out[0, shape[0] // 2].mean() < 3


def test_separate_z_resampling_is_in_plane_then_nearest():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(2, 9, 8, 5)).astype(np.float32)
    shape = (13, 6, 11)
    out = resample_image(img, shape, separate_axis=2)
    idx = nearest_indices(5, 11)
    for c in range(2):
        planes = np.stack([resample_image(img[c, :, :, k][None], shape[:2])[0]
                           for k in range(5)], axis=-1)
        np.testing.assert_allclose(out[c], planes[:, :, idx], rtol=0, atol=0)
    # along the separate axis nothing is interpolated: every output slice is an input slice's
    # in-plane resampling
    lbl = ndi.zoom(rng.integers(0, 4, size=(4, 4, 5)), (3, 3, 1), order=0).astype(np.int16)
    got = resample_labels(lbl, (7, 17, 9), separate_axis=2)
    want = np.stack([resample_labels(lbl[:, :, k], (7, 17)) for k in range(5)], axis=-1)
    np.testing.assert_array_equal(got, want[:, :, nearest_indices(5, 9)])
    np.testing.assert_array_equal(resample_labels(lbl, (12, 12, 2), separate_axis=2),
                                  lbl[:, :, nearest_indices(5, 2)])


def test_normalization_schemes_from_names_and_override():
    assert normalization_schemes(["CT", "T2", "ct"]) == ("ct", "zscore", "ct")
    assert normalization_schemes(["noNorm", "RESCALE_TO_0_1", "rgb_to_0_1", "zscore", "MR"]) == \
        ("nonorm", "rescale_to_0_1", "rgb_to_0_1", "zscore", "zscore")
    assert normalization_schemes(["CT", "T2"], "MR") == ("zscore", "zscore")
    assert normalization_schemes(["x"], "CT") == ("ct",)
    assert normalization_schemes(["a", "b"], ["ct", "zscore"]) == ("ct", "zscore")
    with pytest.raises(ValueError, match="one per channel"):
        normalization_schemes(["a", "b"], ["CT"])


def test_normalize_image_schemes():
    rng = np.random.default_rng(2)
    img = rng.uniform(10, 200, size=(4, 6, 7)).astype(np.float32)
    img[:, :2] = 0.0
    mask = np.any(img != 0, axis=0)
    out, used = normalize_image(img, mask, ["nonorm", "rescale_to_0_1", "rgb_to_0_1", "zscore"],
                                [None] * 4, [False, False, False, False])
    np.testing.assert_array_equal(out[0], img[0])
    x = img[1].astype(np.float64)
    np.testing.assert_allclose(out[1], (x - x.min()) / (x.max() - x.min()), rtol=1e-6)
    np.testing.assert_allclose(out[2], img[2] / 255.0, rtol=1e-6)
    # z-score without the mask: over every voxel, zeros included and not kept at 0
    x = img[3].astype(np.float64)
    np.testing.assert_allclose(out[3], (x - x.mean()) / x.std(), rtol=1e-5, atol=1e-6)
    assert used[3] == {"mean": pytest.approx(x.mean()), "std": pytest.approx(x.std())}
    # with the mask: statistics inside it, 0 outside
    masked, used = normalize_image(img[3:], mask, ["zscore"], [None], [True])
    v = x[mask]
    np.testing.assert_allclose(masked[0][mask], (v - v.mean()) / v.std(), rtol=1e-5, atol=1e-6)
    assert (masked[0][~mask] == 0).all()
    with pytest.raises(ValueError, match=r"channel 0 \(rgb_to_0_1\) has values in \[300, 300\]; "
                       r"RGB channels must lie in \[0, 255\]"):
        normalize_image(np.full((1, 2, 2), 300.0), mask[:2, :2], ["rgb_to_0_1"], [None])


def _mixture_quantile(cases, q):
    """Independent oracle: the smallest value where the equal-weight mixture's CDF reaches q."""
    grid = np.unique(np.concatenate(cases))
    cdf = np.mean([np.searchsorted(np.sort(c), grid, side="right") / c.size for c in cases],
                  axis=0)
    return grid[np.searchsorted(cdf, q / 100 - 1e-12)]


def test_ct_statistics_weigh_every_case_equally():
    rng = np.random.default_rng(3)
    cases = [rng.normal(0, 10, 50), rng.normal(300, 40, 5000), rng.normal(100, 5, 700)]
    st = ct_statistics([c.astype(np.float32) for c in cases] + [np.zeros(0, np.float32)])
    cases = [c.astype(np.float32).astype(np.float64) for c in cases]
    mean = np.mean([c.mean() for c in cases])
    var = np.mean([((c - mean) ** 2).mean() for c in cases])
    assert st["mean"] == pytest.approx(mean, rel=1e-12) and st["std"] == pytest.approx(
        np.sqrt(var), rel=1e-12)
    assert st["lower"] == _mixture_quantile(cases, 0.5)
    assert st["upper"] == _mixture_quantile(cases, 99.5)
    assert st["cases"] == 3 and st["voxels"] == 5750
    # nnU-Net's random draws (the same number per case, with replacement) converge to it; pooling
    # every voxel would not (the 5000-voxel case would dominate)
    draws = np.concatenate([np.random.RandomState(1234).choice(c, 200_000) for c in cases])
    np.testing.assert_allclose([st["lower"], st["upper"], st["mean"], st["std"]],
                               [*np.percentile(draws, [0.5, 99.5]), draws.mean(), draws.std()],
                               rtol=0.02, atol=0.5)
    assert abs(np.concatenate(cases).mean() - st["mean"]) > 100
    with pytest.raises(ValueError, match="no foreground"):
        ct_statistics([np.zeros(0)])


# -- the pipeline ---------------------------------------------------------------------------------


def test_crop_bounds_shapes_and_median_spacing(tmp_path):
    cases = make_ds(tmp_path / "ds", context=True)
    pre = _run(tmp_path / "ds", tmp_path / "out")
    target = pre.target_spacing
    np.testing.assert_allclose(target, np.median(np.array(SPACINGS), axis=0))
    assert pre.plans["median_spacing"] == list(target)
    assert pre.case_ids == sorted(cases)
    cropped = tuple(s.stop - s.start for s in BOX)
    for cid, (_, _, _, sp) in cases.items():
        c = pre.load_case(cid)
        assert c.meta["crop_bbox"] == [[s.start, s.stop] for s in BOX]
        assert c.meta["cropped_shape"] == list(cropped)
        want = tuple(int(round(s / t * n)) for n, s, t in zip(cropped, sp, target, strict=True))
        assert want == target_shape(cropped, sp, target)
        assert c.image.shape == (1, *want) and c.image.dtype == np.float32
        assert c.label.shape == c.distance.shape == c.context.shape == want
        assert c.label.dtype == c.context.dtype == np.int16 and c.distance.dtype == np.float32
        assert c.spacing == target
    # a case at a different spacing really changed shape
    assert pre.load_case("case_001").image.shape[1:] != cropped
    explicit = _run(tmp_path / "ds", tmp_path / "out15", target_spacing=(1.5, 1.5, 1.5))
    assert explicit.target_spacing == (1.5, 1.5, 1.5)
    assert explicit.load_case("case_000").label.shape == target_shape(cropped, SPACINGS[0],
                                                                      (1.5,) * 3)


def test_label_and_context_values_preserved(tmp_path):
    cases = make_ds(tmp_path / "ds", context=True)
    pre = _run(tmp_path / "ds", tmp_path / "out", target_spacing=(0.6, 0.7, 1.3))
    for cid, (_, label, ctx, _) in cases.items():
        c = pre.load_case(cid)
        assert set(np.unique(c.label)) == set(np.unique(label))  # no new class, none lost
        assert set(np.unique(c.context)) == set(np.unique(ctx))
        assert c.meta["classes"] == sorted(set(np.unique(label).tolist()))


def test_ct_normalization_statistics(tmp_path):
    cases = make_ds(tmp_path / "ds", spacings=[SPACINGS[0]])  # same spacing: no resampling
    pre = _run(tmp_path / "ds", tmp_path / "out")
    fg = [img[0][BOX][lbl[BOX] > 0].astype(np.float64) for img, lbl, _, _ in cases.values()]
    lo, hi = (_mixture_quantile(fg, q) for q in (0.5, 99.5))
    mean = np.mean([v.mean() for v in fg])
    std = np.sqrt(np.mean([((v - mean) ** 2).mean() for v in fg]))
    norm = pre.plans["normalization"][0]
    assert norm["scheme"] == "ct" and norm["voxels"] == sum(v.size for v in fg)
    assert not norm["use_mask_for_norm"]
    np.testing.assert_allclose([norm["lower"], norm["upper"], norm["mean"], norm["std"]],
                               [lo, hi, mean, std], rtol=1e-12)
    for cid, (img, _, _, _) in cases.items():
        want = (np.clip(img[0][BOX].astype(np.float64), lo, hi) - mean) / std
        np.testing.assert_allclose(pre.load_case(cid).image[0], want, rtol=1e-5, atol=1e-5)
    all_fg = np.concatenate([pre.load_case(c).image[0][pre.load_case(c).label > 0]
                             for c in cases])
    assert abs(all_fg.mean()) < 0.05 and 0.8 < all_fg.std() < 1.05  # clipping shrinks std a bit


def test_mr_zscore_per_case_over_nonzero(tmp_path):
    cases = make_ds(tmp_path / "ds", channels=("T2", "ADC"), spacings=[SPACINGS[0]])
    pre = _run(tmp_path / "ds", tmp_path / "out")
    assert [n["scheme"] for n in pre.plans["normalization"]] == ["zscore", "zscore"]
    for cid, (img, _, _, _) in cases.items():
        out = pre.load_case(cid).image
        mask = np.any(img[:, BOX[0], BOX[1], BOX[2]] != 0, axis=0)
        for ch in range(2):
            x = img[ch][BOX][mask].astype(np.float64)
            stats = pre.plans["cases"][cid]["channel_stats"][ch]
            np.testing.assert_allclose([stats["mean"], stats["std"]], [x.mean(), x.std()],
                                       rtol=1e-10)
            np.testing.assert_allclose(out[ch][mask].mean(), 0, atol=1e-5)
            np.testing.assert_allclose(out[ch][mask].std(), 1, rtol=1e-5)
            assert (out[ch][~mask] == 0).all()
    # per case: the cases' statistics differ
    s = [pre.plans["cases"][c]["channel_stats"][0]["mean"] for c in cases]
    assert len(set(s)) == len(s)
    # modality override: the same dataset as CT
    ct = _run(tmp_path / "ds", tmp_path / "out_ct", modality="CT")
    assert [n["scheme"] for n in ct.plans["normalization"]] == ["ct", "ct"]


def test_distance_maps_equal_scipy_on_resampled_label(tmp_path):
    make_ds(tmp_path / "ds")
    pre = _run(tmp_path / "ds", tmp_path / "out")
    for cid in pre:
        c = pre.load_case(cid)
        roi = np.asarray(c.label) > 0
        assert roi.any() and c.meta["roi_voxels"] == roi.sum()
        want = ndi.distance_transform_edt(~roi, sampling=pre.target_spacing)
        np.testing.assert_allclose(c.distance, want, rtol=1e-6, atol=1e-5)
        assert (c.distance[roi] == 0).all()


def test_empty_roi_case_gets_inf_distances(tmp_path):
    make_ds(tmp_path / "ds", empty=(1,))
    pre = _run(tmp_path / "ds", tmp_path / "out")
    c = pre.load_case("case_001", mmap=False)
    assert c.meta["roi_voxels"] == 0 and (c.label == 0).all()
    assert np.isposinf(c.distance).all() and c.distance.dtype == np.float32
    raw = np.load(tmp_path / "out" / "case_001_distance.npy")  # stored as IEEE +inf
    assert np.isposinf(raw).all()
    assert np.isfinite(pre.load_case("case_000").distance).all()


def test_no_foreground_anywhere_refused(tmp_path):
    make_ds(tmp_path / "ds", channels=("T1",), empty=(0, 1, 2))
    with pytest.raises(DatasetError, match="no foreground anywhere"):
        _run(tmp_path / "ds", tmp_path / "out")
    assert not (tmp_path / "out" / "plans.json").exists()
    make_ds(tmp_path / "ct", empty=(0, 1, 2))
    with pytest.raises(DatasetError, match="no foreground anywhere"):
        _run(tmp_path / "ct", tmp_path / "out_ct")


def _mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir()}


def test_fingerprint_skips_unchanged_and_reruns_on_change(tmp_path):
    root, out = tmp_path / "ds", tmp_path / "out"
    make_ds(root)
    first = _run(root, out)
    assert not first.from_cache
    before = _mtimes(out)
    second = _run(root, out)
    assert second.from_cache and second.fingerprint == first.fingerprint
    assert _mtimes(out) == before  # nothing rewritten
    # an input file changes → rerun
    lbl_path = root / "labelsTr" / "case_002.nii.gz"
    lbl = np.asarray(nib.load(str(lbl_path)).dataobj).copy()
    lbl[lbl == 2] = 1
    _save(lbl_path, lbl, SPACINGS[2])
    st = lbl_path.stat()
    os.utime(lbl_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = _run(root, out)
    assert not third.from_cache and third.fingerprint != first.fingerprint
    assert 2 not in np.unique(third.load_case("case_002").label)
    assert _run(root, out).from_cache
    # a setting changes → rerun
    fourth = _run(root, out, target_spacing=(1.0, 1.0, 2.0))
    assert not fourth.from_cache and fourth.target_spacing == (1.0, 1.0, 2.0)
    assert load_preprocessed(out).plans == fourth.plans
    # a deleted output file → rerun
    (out / "case_000_distance.npy").unlink()
    fifth = _run(root, out, target_spacing=(1.0, 1.0, 2.0))
    assert not fifth.from_cache and (out / "case_000_distance.npy").is_file()


def test_serial_equals_parallel(tmp_path):
    make_ds(tmp_path / "ds", n_cases=4, channels=("CT", "PET"), context=True, empty=(3,))
    serial = _run(tmp_path / "ds", tmp_path / "serial")
    par = _run(tmp_path / "ds", tmp_path / "par", num_workers=2)
    assert par.plans["cases"] == serial.plans["cases"]
    assert par.plans["normalization"] == serial.plans["normalization"]
    assert par.fingerprint == serial.fingerprint
    for cid in serial:
        a, b = serial.load_case(cid), par.load_case(cid)
        for k in ("image", "label", "distance", "context"):
            np.testing.assert_array_equal(getattr(a, k), getattr(b, k), err_msg=f"{cid} {k}")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_failed_case_leaves_no_plans_and_no_partial_files(tmp_path, num_workers):
    root, out = tmp_path / "ds", tmp_path / "out"
    make_ds(root, channels=("T2",))
    assert not _run(root, out).from_cache  # a complete earlier result
    bad = root / "labelsTr" / "case_001.nii.gz"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated gzip
    with pytest.raises(DatasetError, match=r"case_001\.nii\.gz.*truncated"):
        _run(root, out, num_workers=num_workers)
    assert not (out / "plans.json").exists()  # the stale plans were invalidated
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")]
    for p in out.glob("*.npy"):  # whatever is there is a complete file
        np.load(p)
    with pytest.raises(FileNotFoundError):
        load_preprocessed(out)


def test_progress_bar_can_be_disabled(tmp_path, capsys):
    make_ds(tmp_path / "ds", n_cases=2)
    _run(tmp_path / "ds", tmp_path / "a", progress=False)
    err = capsys.readouterr().err
    assert "preprocessing" not in err
    preprocess_dataset(tmp_path / "ds", tmp_path / "b", progress=True)  # path accepted too
    err = capsys.readouterr().err
    assert "preprocessing" in err and "dataset fingerprint" in err


def test_bad_target_spacing(tmp_path):
    make_ds(tmp_path / "ds", n_cases=1)
    with pytest.raises(ValueError, match="target_spacing must be 3 finite values"):
        _run(tmp_path / "ds", tmp_path / "out", target_spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="target_spacing"):
        _run(tmp_path / "ds", tmp_path / "out", target_spacing=(1.0, 0.0, 1.0))
    assert not (tmp_path / "out").exists()  # checked before the folder is made


def test_ignore_label_is_not_roi(tmp_path):
    root = tmp_path / "ds"
    make_ds(root, n_cases=2, channels=("T2",))
    js = json.loads((root / "dataset.json").read_text())
    js["labels"]["ignore"] = 3
    (root / "dataset.json").write_text(json.dumps(js))
    lbl_path = root / "labelsTr" / "case_000.nii.gz"
    lbl = np.asarray(nib.load(str(lbl_path)).dataobj).copy()
    lbl[BOX[0].start:BOX[0].start + 3] = 3  # a slab of ignore, away from the organ
    _save(lbl_path, lbl, SPACINGS[0])
    pre = _run(root, tmp_path / "out")
    c = pre.load_case("case_000")
    roi = (np.asarray(c.label) > 0) & (np.asarray(c.label) != 3)
    assert (np.asarray(c.label) == 3).any() and c.meta["roi_voxels"] == roi.sum()
    np.testing.assert_allclose(c.distance, ndi.distance_transform_edt(
        ~roi, sampling=pre.target_spacing), rtol=1e-6, atol=1e-5)
    assert (c.distance[np.asarray(c.label) == 3] > 0).all()


def test_zscore_mask_only_when_cropping_removed_a_quarter(tmp_path):
    """nnU-Net's rule: z-score channels use the nonzero mask when the median case kept < 75 % of
    its voxels after cropping (here 41 %); with no zero background, the whole image is used."""
    make_ds(tmp_path / "ds", channels=("T2",), spacings=[SPACINGS[0]])
    masked = _run(tmp_path / "ds", tmp_path / "masked")
    assert masked.plans["median_relative_size_after_cropping"] == pytest.approx(
        np.prod([s.stop - s.start for s in BOX]) / np.prod(SHAPE))
    assert masked.plans["normalization"][0]["use_mask_for_norm"]
    for path in sorted((tmp_path / "ds" / "imagesTr").iterdir()):  # no zero voxel left
        img = nib.load(str(path))
        _save(path, np.asarray(img.dataobj) + np.float32(1000.0), SPACINGS[0])
    whole = _run(tmp_path / "ds", tmp_path / "whole")
    assert whole.plans["median_relative_size_after_cropping"] == 1.0
    assert not whole.plans["normalization"][0]["use_mask_for_norm"]
    for cid in whole:
        c = whole.load_case(cid)
        assert c.image.shape[1:] == SHAPE  # nothing cropped
        raw = np.asarray(nib.load(str(tmp_path / "ds" / "imagesTr" / f"{cid}_0000.nii.gz"))
                         .dataobj).astype(np.float64)
        stats = c.meta["channel_stats"][0]
        np.testing.assert_allclose([stats["mean"], stats["std"]], [raw.mean(), raw.std()],
                                   rtol=1e-10)
        outside = np.ones(SHAPE, bool)
        outside[BOX] = False
        np.testing.assert_allclose(c.image[0][outside], (1000 - raw.mean()) / raw.std(),
                                   rtol=1e-5)


def test_rgb_channel_out_of_range_names_the_file(tmp_path):
    make_ds(tmp_path / "ds", n_cases=2, channels=("rgb_to_0_1",))
    with pytest.raises(DatasetError, match=r"case_000_0000\.nii\.gz: channel 0 \(rgb_to_0_1\) "
                                           r"has values in"):
        _run(tmp_path / "ds", tmp_path / "out")
    assert not (tmp_path / "out" / "plans.json").exists()


def test_a_failing_first_run_leaves_no_folder(tmp_path):
    make_ds(tmp_path / "ds")
    _save(tmp_path / "ds" / "labelsTr" / "case_002.nii.gz", np.zeros((22, 17, 9), np.uint8),
          SPACINGS[2])
    with pytest.raises(DatasetError, match="case_002"):
        _run(tmp_path / "ds", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # nor the parent folders it created
    with pytest.raises(DatasetError, match="case_002"):
        _run(tmp_path / "ds", tmp_path / "new" / "deeper" / "out")
    assert not (tmp_path / "new").exists()
    # an earlier run's folder stays (without plans.json: invalid until written anew)
    (tmp_path / "ds" / "labelsTr" / "case_002.nii.gz").unlink()
    make_ds(tmp_path / "ds")
    _run(tmp_path / "ds", tmp_path / "out")
    _save(tmp_path / "ds" / "labelsTr" / "case_002.nii.gz", np.zeros((22, 17, 9), np.uint8),
          SPACINGS[2])
    with pytest.raises(DatasetError, match="case_002"):
        _run(tmp_path / "ds", tmp_path / "out")
    assert (tmp_path / "out").is_dir() and not (tmp_path / "out" / "plans.json").exists()

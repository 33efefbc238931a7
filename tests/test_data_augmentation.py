"""Augmentation: one spatial transform for every array (labels stay aligned with the image,
distance maps stay distances to the transformed ROI, mirroring exact), intensity transforms touch
the image only, determinism, source regions, config validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import colabx
from colabx.data.augmentation import AugmentConfig, SpatialParams, augment, sample_spatial

NO_INTENSITY = dict(noise_p=0.0, blur_p=0.0, brightness_p=0.0, contrast_p=0.0, gamma_p=0.0,
                    inverted_gamma_p=0.0)
SPATIAL = AugmentConfig(rotation_p=1.0, scale_p=1.0, mirror_p=0.5, **NO_INTENSITY)
THRESHOLD = math.exp(-0.5 * (7.0 / 6.0) ** 2)  # image value on the sphere's surface


def sphere(shape, spacing, radius=7.0, context=True):
    """Smooth blob image exp(-r²/2σ²), label = image > THRESHOLD (a ball), exact distance map."""
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    r2 = sum(((g - n // 2) * s) ** 2 for g, n, s in zip(grids, shape, spacing, strict=True))
    label = torch.from_numpy((r2 <= radius**2).astype(np.int16))
    out = {
        "image": torch.from_numpy(np.exp(-r2 / (2 * 6.0**2)).astype(np.float32))[None],
        "label": label,
        "distance": colabx.distance_transform(label[None] > 0, spacing=spacing)[0],
    }
    if context:
        out["context"] = torch.from_numpy(((grids[0] + grids[1]) % 3).astype(np.int16))
    return out


def _draw(cfg, ndim, seed, spacing, patch):
    g = torch.Generator().manual_seed(seed)
    params = sample_spatial(cfg, ndim, g, spacing)
    return g, params, params.source_size(patch)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.5, 1.0, 1.0), (4.0, 0.9, 0.9),
                                     (1.0, 1.0), (0.8, 1.2)])
def test_labels_stay_aligned_with_the_image(spacing):
    ndim = len(spacing)
    patch = (24, 32, 32)[-ndim:]
    for seed in range(4):
        g, params, src = _draw(SPATIAL, ndim, seed, spacing, patch)
        assert params.resample
        out = augment(sphere(src, spacing), SPATIAL, g, patch_size=patch, spacing=spacing,
                      spatial=params)
        assert out["image"].shape == (1, *patch) and out["label"].shape == patch
        roi = out["label"] > 0
        wrong = (out["image"][0] > THRESHOLD) != roi
        assert wrong.float().mean() < 0.03, (seed, wrong.float().mean())
        # disagreement only on the ball's surface (within one voxel of the label boundary)
        band = ((colabx.distance_transform(roi[None])[0] <= 1)
                & (colabx.distance_transform(~roi[None])[0] <= 1))
        near_surface = (colabx.distance_transform(band[None])[0] <= 1)
        assert near_surface[wrong].all(), seed
        assert out["label"].sum() > 0 and out["label"].dtype == torch.int16
        assert set(out["context"].unique().tolist()) <= {0, 1, 2}


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.5, 1.0, 1.0), (1.2, 0.9)])
def test_distance_is_the_distance_to_the_transformed_roi(spacing):
    ndim = len(spacing)
    patch = (24, 32, 32)[-ndim:]
    for seed in range(4):
        g, params, src = _draw(SPATIAL, ndim, seed, spacing, patch)
        out = augment(sphere(src, spacing), SPATIAL, g, patch_size=patch, spacing=spacing,
                      spatial=params)
        recomputed = colabx.distance_transform(out["label"][None] > 0, spacing=spacing)[0]
        near = recomputed < 12  # the ball is inside the patch: these distances are complete
        err = (out["distance"] - recomputed)[near].abs()
        assert err.mean() < 0.5 and err.max() < 1.5, (seed, params.scale, err.mean(), err.max())
        # a scaled-only transform multiplies distances by the scale
        assert torch.isfinite(out["distance"]).all()


def test_distance_scaling_factor():
    spacing = (1.0, 1.0, 1.0)
    cfg = AugmentConfig(rotation_p=0.0, scale_p=1.0, mirror_p=0.0, **NO_INTENSITY)
    g, params, src = _draw(cfg, 3, 5, spacing, (20, 20, 20))
    s = sphere(src, spacing, radius=4.0)
    out = augment(s, cfg, g, patch_size=(20, 20, 20), spatial=params)
    c = 10  # the ball's centre (source anchor -> output anchor); along an axis, distance is
    for r in (7, 9):  # (r/scale - 4) in the source, times the scale in the output
        want = (r / params.scale - 4.0) * params.scale
        assert abs(out["distance"][c, c, c + r].item() - want) < 0.15


def test_no_roi_keeps_infinite_distance():
    s = sphere((31, 31, 31), (1, 1, 1))
    s["distance"] = torch.full_like(s["distance"], math.inf)
    s["label"].zero_()
    out = augment(s, SPATIAL, torch.Generator().manual_seed(0), patch_size=(16, 16, 16))
    assert torch.isinf(out["distance"]).all()


def test_mirroring_is_an_exact_flip():
    s = sphere((20, 18, 16), (1, 1, 1))
    s["image"] = torch.randn(2, 20, 18, 16)
    cfg = AugmentConfig(rotation_p=0.0, scale_p=0.0, mirror_p=1.0, mirror_axes=(0, 2),
                        **NO_INTENSITY)
    out = augment(s, cfg, torch.Generator().manual_seed(0), patch_size=(12, 10, 16))
    crop = (slice(4, 16), slice(4, 14), slice(0, 16))
    torch.testing.assert_close(out["image"], s["image"][(slice(None), *crop)].flip([1, 3]),
                               rtol=0, atol=0)
    for k in ("label", "distance", "context"):
        torch.testing.assert_close(out[k], s[k][crop].flip([0, 2]), rtol=0, atol=0)


def test_resampling_with_the_identity_is_a_crop():
    s = sphere((21, 24, 19), (1, 1, 1))
    ident = SpatialParams(np.eye(3), 1.0, (False, True, False), True)
    crop = SpatialParams(np.eye(3), 1.0, (False, True, False), False)
    a = augment(s, AugmentConfig(**NO_INTENSITY), torch.Generator(), patch_size=(8, 10, 7),
                spatial=ident)
    b = augment(s, AugmentConfig(**NO_INTENSITY), torch.Generator(), patch_size=(8, 10, 7),
                spatial=crop)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


def test_intensity_transforms_leave_labels_unchanged():
    s = sphere((16, 16, 16), (1, 1, 1))
    s["image"] = torch.randn(2, 16, 16, 16) * 2 + 1
    cfg = AugmentConfig(rotation_p=0, scale_p=0, mirror_p=0, noise_p=1, blur_p=1,
                        brightness_p=1, contrast_p=1, gamma_p=1, inverted_gamma_p=1)
    out = augment(s, cfg, torch.Generator().manual_seed(0))
    for k in ("label", "distance", "context"):
        assert torch.equal(out[k], s[k])
    assert out["image"].shape == s["image"].shape and not torch.allclose(out["image"], s["image"])
    assert torch.isfinite(out["image"]).all()


def test_noise_standard_deviation_is_drawn_from_the_range_as_nnunet():
    """batchgenerators draws the noise's standard deviation from ``noise_variance`` (despite the
    name): over many draws, the added noise's std is uniform in (0, 0.1): mean 0.05, max 0.1."""
    img = torch.zeros(1, 16, 16, 16)
    s = {"image": img, "label": torch.zeros(16, 16, 16, dtype=torch.int16),
         "distance": torch.zeros(16, 16, 16)}
    only = {k: 0.0 for k in NO_INTENSITY}
    cfg = AugmentConfig(mirror_p=0, rotation_p=0, scale_p=0, **{**only, "noise_p": 1.0})
    sds = torch.tensor([float(augment(s, cfg, torch.Generator().manual_seed(i))["image"].std())
                        for i in range(300)])
    assert float(sds.max()) < 0.1 * 1.05 and float(sds.min()) < 0.01
    assert abs(float(sds.mean()) - 0.05) < 0.005


@pytest.mark.parametrize("lo, hi", [(0.5, 0.8), (0.75, 1.25), (1.1, 1.5)])
def test_factor_ranges_on_one_side_of_one_stay_in_range(lo, hi):
    """Ranges straddling 1 are drawn as nnU-Net's BGContrast (half below 1, half above); a range
    on one side of 1 is drawn uniformly within itself."""
    img = torch.rand(1, 6, 6, 6) + 1
    s = {"image": img, "label": torch.zeros(6, 6, 6, dtype=torch.int16),
         "distance": torch.zeros(6, 6, 6)}
    only = {k: 0.0 for k in NO_INTENSITY}
    cfg = AugmentConfig(mirror_p=0, rotation_p=0, scale_p=0,
                        **{**only, "brightness_p": 1.0, "brightness_range": (lo, hi)})
    factors = torch.tensor([float((augment(s, cfg, torch.Generator().manual_seed(i))["image"]
                                   / img).mean()) for i in range(400)])
    assert float(factors.min()) >= lo - 1e-6 and float(factors.max()) <= hi + 1e-6
    below = float((factors < 1).float().mean())
    if lo < 1 < hi:
        assert 0.4 < below < 0.6
    else:
        assert abs(float(factors.mean()) - (lo + hi) / 2) < 0.03 * (hi - lo) + 0.01


def test_gamma_retains_stats_and_contrast_keeps_range():
    img = torch.randn(3, 12, 12, 12) * torch.tensor([1.0, 5.0, 0.3]).view(3, 1, 1, 1)
    s = {"image": img, "label": torch.zeros(12, 12, 12, dtype=torch.int16),
         "distance": torch.zeros(12, 12, 12)}
    only = {k: 0.0 for k in NO_INTENSITY}
    gamma = AugmentConfig(mirror_p=0, rotation_p=0, scale_p=0, **{**only, "gamma_p": 1.0})
    out = augment(s, gamma, torch.Generator().manual_seed(1))["image"]
    dims = (1, 2, 3)
    torch.testing.assert_close(out.mean(dims), img.mean(dims), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std(dims), img.std(dims), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out, img)
    # a gamma curve then an increasing affine map per channel: the voxels' order is kept
    order = img.flatten(1).argsort(1)
    assert (out.flatten(1).gather(1, order).diff(dim=1) >= 0).all()
    contrast = AugmentConfig(mirror_p=0, rotation_p=0, scale_p=0, **{**only, "contrast_p": 1.0})
    out = augment(s, contrast, torch.Generator().manual_seed(1))["image"]
    assert (out.amin(dims) >= img.amin(dims)).all() and (out.amax(dims) <= img.amax(dims)).all()
    torch.testing.assert_close(out.mean(dims), img.mean(dims), atol=0.2, rtol=0)


def test_determinism_and_disabled():
    s = sphere((41, 41, 41), (1, 1, 1))
    cfg = AugmentConfig(rotation_p=1, scale_p=1, noise_p=1, blur_p=1, gamma_p=1)
    a = augment(s, cfg, torch.Generator().manual_seed(7), patch_size=(20, 20, 20))
    b = augment(s, cfg, torch.Generator().manual_seed(7), patch_size=(20, 20, 20))
    c = augment(s, cfg, torch.Generator().manual_seed(8), patch_size=(20, 20, 20))
    for k in a:
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["image"], c["image"])
    off = augment(s, AugmentConfig(enabled=False), torch.Generator(), patch_size=(20, 20, 20))
    for k in ("label", "distance", "context"):
        assert torch.equal(off[k], s[k][10:30, 10:30, 10:30])


def test_source_sizes_cover_every_sampled_transform():
    for spacing in [None, (1.0, 1.0, 1.0), (2.5, 0.8, 0.8), (5.0, 1.0, 1.0)]:
        cfg = AugmentConfig(rotation_p=1, scale_p=1)
        bound = cfg.source_size((40, 48, 32), spacing)
        g = torch.Generator().manual_seed(0)
        for _ in range(30):
            p = sample_spatial(cfg, 3, g, spacing)
            assert all(a <= b for a, b in zip(p.source_size((40, 48, 32)), bound, strict=True))
            assert all(n % 2 == 1 for n in p.source_size((40, 48, 32)))
    flat = AugmentConfig(rotation_p=0, scale_p=0)
    assert flat.source_size((40, 48, 32)) == (40, 48, 32)


def test_anisotropic_data_rotates_in_plane_only():
    cfg = AugmentConfig(rotation_p=1, scale_p=1)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        m = sample_spatial(cfg, 3, g, (4.0, 1.0, 1.0)).matrix
        np.testing.assert_allclose(m[0], [1, 0, 0])  # the coarse axis is neither mixed nor scaled
        np.testing.assert_allclose(m[:, 0], [1, 0, 0])
    assert cfg.low_res_axis(3, (1.0, 1.0, 2.9)) is None
    assert cfg.low_res_axis(3, (1.0, 1.0, 3.1)) == 2
    assert AugmentConfig(anisotropic=True).low_res_axis(3) == 0
    assert cfg.low_res_axis(2, (5.0, 1.0)) is None


@pytest.mark.parametrize("kw,field", [
    ({"rotation_p": 1.5}, "rotation_p"), ({"mirror_p": -0.1}, "mirror_p"),
    ({"scale_range": (1.4, 0.7)}, "scale_range"), ({"gamma_range": (0.0, 1.5)}, "gamma_range"),
    ({"noise_variance": (0.0,)}, "noise_variance"), ({"rotation_deg": 270}, "rotation_deg"),
    ({"mirror_axes": (0, 0)}, "mirror_axes"), ({"enabled": 1}, "enabled"),
    ({"anisotropy_ratio": 0.5}, "anisotropy_ratio"), ({"blur_sigma": (0.0, 1.0)}, "blur_sigma"),
])
def test_config_validation_names_the_field(kw, field):
    with pytest.raises((ValueError, TypeError), match=field):
        AugmentConfig(**kw)


def test_bad_samples():
    s = sphere((10, 10, 10), (1, 1, 1))
    g = torch.Generator()
    with pytest.raises(ValueError, match="distance"):
        augment({**s, "distance": s["distance"][:5]}, AugmentConfig(), g)
    with pytest.raises(ValueError, match="image"):
        augment({k: v for k, v in s.items() if k != "image"}, AugmentConfig(), g)
    with pytest.raises(ValueError, match="smaller than patch_size"):
        augment(s, AugmentConfig(rotation_p=0, scale_p=0), g, patch_size=(12, 12, 12))


@pytest.mark.cuda
def test_cuda_matches_cpu():
    s = sphere((41, 41, 41), (1, 1, 1))
    cfg = AugmentConfig(rotation_p=1, scale_p=1, noise_p=1, blur_p=1, gamma_p=1)
    cpu = augment(s, cfg, torch.Generator().manual_seed(3), patch_size=(24, 24, 24))
    gpu = augment({k: v.cuda() for k, v in s.items()}, cfg, torch.Generator().manual_seed(3),
                  patch_size=(24, 24, 24))
    for k in cpu:
        assert gpu[k].is_cuda
        torch.testing.assert_close(gpu[k].cpu(), cpu[k], atol=1e-4, rtol=1e-4)

"""Sliding-window inference, the CoLab prediction rule, raw-case prediction in the original grid
(round trip through preprocessing with stub models that know the answer) and NIfTI output."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F
from torch import nn

from colabx.data.datasets import DatasetError
from colabx.data.preprocessing import preprocess_dataset
from colabx.inference import (
    evaluate_case,
    gaussian_importance_map,
    predict_case,
    predict_labels,
    predict_raw_case,
    roi_probabilities,
    save_prediction,
    sliding_window_logits,
    sliding_window_steps,
)
from colabx.models import UNet

# -- stub models ----------------------------------------------------------------------------------


class Pointwise(nn.Module):
    """A fixed 1×1 convolution: sliding windows must reproduce it on the whole image exactly."""

    def __init__(self, cin: int, k: int, nd: int):
        super().__init__()
        self.conv = (nn.Conv2d if nd == 2 else nn.Conv3d)(cin, k, 1)

    def forward(self, x):
        return self.conv(x)


class BoxBlur(nn.Module):
    """3^nd box filter with zero padding: equivariant under every flip, not pointwise."""

    def __init__(self, nd: int):
        super().__init__()
        self.nd = nd

    def forward(self, x):
        w = torch.ones((x.shape[1], 1) + (3,) * self.nd) / 3 ** self.nd
        conv = F.conv2d if self.nd == 2 else F.conv3d
        return conv(x, w, padding=1, groups=x.shape[1])


class TileMean(nn.Module):
    """Every output voxel is the mean of its tile (a per-tile constant)."""

    def forward(self, x):
        return x.mean(dim=tuple(range(2, x.dim())), keepdim=True).expand_as(x)


# -- sliding windows ------------------------------------------------------------------------------


def test_steps_and_gaussian():
    assert sliding_window_steps((20, 13), (8, 8), 0.5) == [[0, 4, 8, 12], [0, 2, 5]]
    assert sliding_window_steps((41,), (16,), 0.5) == [[0, 6, 12, 19, 25]]
    assert sliding_window_steps((32, 16), (16, 16), 0.0) == [[0, 16], [0]]
    assert sliding_window_steps((33,), (16,), 0.0) == [[0, 8, 17]]
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="overlap"):
            sliding_window_steps((20,), (8,), bad)
    with pytest.raises(ValueError, match="larger than the image"):
        sliding_window_steps((7,), (8,))
    for patch in [(80, 80, 80), (7, 12, 5), (64, 160), (1, 3)]:
        tmp = np.zeros(patch)
        tmp[tuple(p // 2 for p in patch)] = 1
        ref = ndi.gaussian_filter(tmp, [p / 8 for p in patch], 0, mode="constant", cval=0)
        ref = (ref / ref.max()).astype(np.float32)
        ref[ref == 0] = ref[ref != 0].min()  # nnU-Net's construction
        g = gaussian_importance_map(patch)
        assert g.dtype == torch.float32 and (g > 0).all() and g.max() == 1
        np.testing.assert_allclose(g.numpy(), ref, rtol=1e-6)


@pytest.mark.parametrize("shape,patch", [
    ((2, 37, 45), (16, 32)),          # 2D, odd sizes
    ((2, 5, 30), (16, 16)),           # 2D, smaller than the patch along one axis
    ((1, 19, 11, 23), (8, 16, 8)),    # 3D, odd, smaller along one axis
    ((3, 4, 4, 4), (8, 8, 8)),        # 3D, smaller than the patch everywhere
])
@pytest.mark.parametrize("overlap", [0.0, 0.5])
def test_pointwise_model_is_reproduced(shape, patch, overlap):
    nd = len(patch)
    model = Pointwise(shape[0], 3, nd)
    x = torch.randn(shape)
    with torch.no_grad():
        want = model(x[None])
    for gaussian in (True, False):
        out = sliding_window_logits(model, x, patch, overlap=overlap, gaussian=gaussian,
                                    batch_size=3)
        assert out.shape == (1, 3, *shape[1:]) and out.dtype == torch.float32
        torch.testing.assert_close(out, want, atol=2e-6, rtol=1e-5)


def test_tiles_per_forward_change_nothing_but_speed():
    """A U-Net's logits with 1, 2 (the CPU default) and 3 tiles per forward agree to float32
    rounding (the convolutions run on other oneDNN paths per batch size)."""
    from colabx.models import UNet

    torch.manual_seed(0)
    net = UNet(1, 3, 3, base_features=4, num_pool=2)
    x = torch.randn(1, 27, 21, 19)
    one = sliding_window_logits(net, x, (16, 16, 8), batch_size=1)
    for b in (None, 2, 3):
        torch.testing.assert_close(sliding_window_logits(net, x, (16, 16, 8), batch_size=b),
                                   one, rtol=1e-5, atol=1e-5)


def test_tile_weighting_matches_hand_oracle():
    """2D image 20×13, patch 8×8, overlap 0.5: tiles start at rows 0,4,8,12 and columns 0,2,5;
    each voxel is the Gaussian-weighted mean of the means of the tiles covering it."""
    x = torch.randn(2, 1, 20, 13)
    patch = (8, 8)
    tmp = np.zeros(patch)
    tmp[4, 4] = 1
    g = ndi.gaussian_filter(tmp, [1, 1], 0, mode="constant", cval=0)
    g = g / g.max()
    g[g == 0] = g[g != 0].min()
    for b in range(2):
        num, den = np.zeros((20, 13)), np.zeros((20, 13))
        for r in (0, 4, 8, 12):
            for c in (0, 2, 5):
                num[r:r + 8, c:c + 8] += g * x[b, 0, r:r + 8, c:c + 8].double().mean().item()
                den[r:r + 8, c:c + 8] += g
        out = sliding_window_logits(TileMean(), x, patch, batch_size=5)
        np.testing.assert_allclose(out[b, 0].numpy(), num / den, rtol=1e-5, atol=1e-6)
    batched = torch.cat([sliding_window_logits(TileMean(), x[b], patch) for b in range(2)])
    torch.testing.assert_close(sliding_window_logits(TileMean(), x, patch), batched)


@pytest.mark.parametrize("shape,patch,axes", [
    ((2, 21, 30), (16, 16), (0, 1)),
    ((1, 13, 10, 17), (8, 8, 8), (0, 1, 2)),
])
def test_mirror_tta(shape, patch, axes):
    x = torch.randn(shape)
    plain = sliding_window_logits(BoxBlur(len(patch)), x, patch)
    mirrored = sliding_window_logits(BoxBlur(len(patch)), x, patch, mirror_axes=axes)
    torch.testing.assert_close(mirrored, plain, atol=1e-6, rtol=1e-5)
    # A model that is not flip-equivariant: TTA = mean over the 2^n flipped predictions.
    shift = nn.Module()
    shift.forward = lambda t: torch.roll(t, 1, dims=2)  # type: ignore[method-assign]
    got = sliding_window_logits(shift, x, patch, mirror_axes=axes[:1], overlap=0.0)
    # flipping axis 0, rolling by 1 along it and flipping back rolls by -1: the mean of the two
    # rolls, tile by tile, and the windows' weighted merge is linear in the tiles' logits
    unshift = nn.Module()
    unshift.forward = lambda t: torch.roll(t, -1, dims=2)  # type: ignore[method-assign]
    want = 0.5 * (sliding_window_logits(shift, x, patch, overlap=0.0)
                  + sliding_window_logits(unshift, x, patch, overlap=0.0))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, sliding_window_logits(shift, x, patch, overlap=0.0))


def test_unet_deep_supervision_and_modes():
    net = UNet(1, 3, spatial_dims=2, base_features=4, num_pool=2)
    net.train()
    x = torch.randn(1, 37, 45)
    ds = sliding_window_logits(net, x, (16, 32), mirror_axes=(1,))
    assert net.training and all(m.training for m in net.modules())  # mode restored
    net.deep_supervision = False
    torch.testing.assert_close(sliding_window_logits(net, x, (16, 32), mirror_axes=(1,)), ds)
    # bf16 autocast: float32 output near the fp32 result
    x = x[:, :16, :32]  # one tile: bf16 convolutions are slow on CPU
    fp32 = sliding_window_logits(net, x, (16, 32))
    amp = sliding_window_logits(net, x, (16, 32), amp=torch.bfloat16)
    assert amp.dtype == torch.float32
    assert (amp - fp32).abs().max() < 0.05 * fp32.abs().max()
    with pytest.raises(ValueError, match="multiple of the model's input_divisor"):
        sliding_window_logits(net, x, (16, 30))


def test_sliding_window_errors():
    m = Pointwise(1, 2, 2)
    x = torch.randn(1, 10, 10)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_logits(m, x, (8, 8), overlap=1.0)
    with pytest.raises(ValueError, match="mirror_axes"):
        sliding_window_logits(m, x, (8, 8), mirror_axes=(2,))
    with pytest.raises(ValueError, match="does not fit"):
        sliding_window_logits(m, x[0, 0], (8, 8))
    with pytest.raises(ValueError, match="patch_size"):
        sliding_window_logits(m, x, (8,))
    with pytest.raises(ValueError, match="batch_size"):
        sliding_window_logits(m, x, (8, 8), batch_size=0)
    with pytest.raises(ValueError, match="turned a"):
        sliding_window_logits(lambda t: t[..., ::2], x, (8, 8))


@pytest.mark.cuda
def test_cpu_image_cuda_model():
    m = Pointwise(2, 3, 3)
    x = torch.randn(2, 13, 9, 17)
    want = sliding_window_logits(m, x, (8, 8, 8), mirror_axes=(0,))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # TF32 convs err by ~1e-3
        got = sliding_window_logits(m.cuda(), x, (8, 8, 8), mirror_axes=(0,))
    assert got.is_cuda
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-4)


# -- prediction rule ------------------------------------------------------------------------------


def test_predict_labels_rule():
    # channels: [ctx0, roi1, roi2, ctx1]  (c = 3, t = 2)
    z = torch.tensor([
        [0.0, 1.0, 0.5, 0.2],   # roi1 wins
        [0.0, 1.0, 0.5, 2.0],   # context 1 wins -> background
        [0.0, 1.0, 1.0, 0.2],   # roi tie -> lowest class
        [0.0, 1.0, 0.5, 1.0],   # tie with a context channel -> background
        [1.0, 1.0, 0.5, 0.0],   # tie with context 0 -> background
        [0.0, 0.1, 0.5, 0.2],   # roi2 wins
    ]).T[None]  # [1, 4, 6]
    assert predict_labels(z, 3).tolist() == [[1, 0, 1, 0, 0, 2]]
    z = torch.randn(2, 6, 5, 7, 3)
    ref = z.argmax(1)
    ref[(ref == 0) | (ref >= 3)] = 0  # the reference's argmax, contexts mapped to background
    assert torch.equal(predict_labels(z, 3), ref)
    assert torch.equal(predict_labels(z, 6), z.argmax(1))  # t = 1: plain argmax
    with pytest.raises(ValueError, match="num_classes"):
        predict_labels(z, 7)


def test_roi_probabilities():
    z = torch.randn(2, 5, 4, 6)
    p = roi_probabilities(z, 3)
    full = torch.softmax(z, 1)
    assert p.shape == (2, 3, 4, 6)
    torch.testing.assert_close(p.sum(1), torch.ones(2, 4, 6))
    torch.testing.assert_close(p[:, 1:], full[:, 1:3])


def test_predict_case_matches_rule():
    m = Pointwise(1, 4, 3)
    img = np.random.default_rng(0).normal(size=(1, 11, 9, 14)).astype(np.float32)
    lab = predict_case(m, img, 3, (8, 8, 8))
    with torch.no_grad():
        assert torch.equal(lab, predict_labels(m(torch.from_numpy(img)[None]), 3)[0])
    # a read-only array (the memory map of PreprocessedDataset.load_case): same result, and no
    # warning about tensors of non-writable arrays
    img.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(predict_case(m, img, 3, (8, 8, 8)), lab)


# -- raw cases: round trip through preprocessing ------------------------------------------------

SHAPE = (30, 26, 12)
BODY = (slice(2, 28), slice(3, 24), slice(1, 11))


def _phantom():
    x, y, z = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    label = np.zeros(SHAPE, np.int16)
    label[((x - 14) / 9) ** 2 + ((y - 13) / 7) ** 2 + ((z - 6) / 3.5) ** 2 <= 1] = 1
    label[((x - 15) / 4) ** 2 + ((y - 13) / 3.5) ** 2 + ((z - 6) / 2) ** 2 <= 1] = 2
    return label


def _dataset(root: Path, spacing, modality: str, intensities) -> np.ndarray:
    """One-case nnU-Net v2 dataset: constant intensity per class inside a box-shaped body."""
    label = _phantom()
    image = np.zeros(SHAPE, np.float32)
    image[BODY] = np.asarray(intensities, np.float32)[label[BODY]]
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-20.0, 7.5, 3.0)
    for sub, arr in (("imagesTr/case_0000.nii.gz", image), ("labelsTr/case.nii.gz", label)):
        (root / sub).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(arr, affine), str(root / sub))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": modality}, "labels": {"background": 0, "organ": 1, "tumour": 2},
        "numTraining": 1, "file_ending": ".nii.gz"}))
    return label


class Oracle(nn.Module):
    """Classifies each voxel by the nearest normalised class intensity; outputs CoLab logits
    [ctx0, organ, tumour, ctx1] with context 1 always beating context 0, plus a deep-supervision
    level, so the whole path (DS head, context mapping) is exercised."""

    def __init__(self, centres):
        super().__init__()
        self.register_buffer("centres", torch.tensor(centres, dtype=torch.float32))

    def forward(self, x):
        d = -50.0 * (x - self.centres.view(1, -1, *[1] * (x.dim() - 2))) ** 2
        out = torch.cat([d, d[:, :1] + 1.0], dim=1)
        return [out, F.avg_pool3d(out, 2)]


def _oracle(plans, intensities) -> Oracle:
    norm = plans["normalization"][0]
    v = np.asarray(intensities, np.float64)
    if norm["scheme"] == "ct":
        v = (np.clip(v, norm["lower"], norm["upper"]) - norm["mean"]) / norm["std"]
    else:
        st = plans["cases"]["case"]["channel_stats"][0]
        v = (v - st["mean"]) / st["std"]
    return Oracle(v.tolist())


def test_raw_round_trip_identity(tmp_path):
    """Target spacing = case spacing: no resampling, prediction equals the label exactly (CT
    normalisation with the dataset statistics, crop and paste back)."""
    spacing, inten = (0.8, 1.0, 2.5), (200.0, 100.0, 300.0)
    label = _dataset(tmp_path / "raw", spacing, "CT", inten)
    pre = preprocess_dataset(tmp_path / "raw", tmp_path / "pre", progress=False)
    assert pre.plans["cases"]["case"]["shape"] == pre.plans["cases"]["case"]["cropped_shape"]
    images = [tmp_path / "raw/imagesTr/case_0000.nii.gz"]
    pred, affine = predict_raw_case(_oracle(pre.plans, inten), images, pre.plans, (16, 16, 8))
    assert pred.dtype == np.int16 and pred.shape == SHAPE
    np.testing.assert_array_equal(pred, label)
    np.testing.assert_array_equal(affine, nib.load(str(images[0])).affine)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # current plans: no warning
        predict_raw_case(_oracle(pre.plans, inten), images, pre.plans, (16, 16, 8))
    # plans of the format before nnU-Net-style resampling: a warning, and the masked z-score
    old = {**pre.plans, "format_version": 1}
    with pytest.warns(RuntimeWarning, match="these plans are format 1: the model was trained "
                                            "before colabx preprocessed as nnU-Net v2 does"):
        again, _ = predict_raw_case(_oracle(old, inten), images, old, (16, 16, 8))
    np.testing.assert_array_equal(again, label)


def test_raw_prediction_names_the_models_channel_count(tmp_path):
    """An input with the wrong number of channels: the message names the case without its file
    ending and the model (prediction has no dataset.json) as what declares the channels."""
    spacing, inten = (0.8, 1.0, 2.5), (200.0, 100.0, 300.0)
    _dataset(tmp_path / "raw", spacing, "CT", inten)
    pre = preprocess_dataset(tmp_path / "raw", tmp_path / "pre", progress=False)
    images = [tmp_path / "raw/imagesTr/case_0000.nii.gz"] * 2
    with pytest.raises(DatasetError, match=r"image of case 'case_0000' has 2 channel files but "
                                           r"the model was trained with 1 channel\(s\)"):
        predict_raw_case(_oracle(pre.plans, inten), images, pre.plans, (16, 16, 8))


def test_raw_round_trip_anisotropic(tmp_path):
    """Spacing (0.8, 1, 2.5) predicted at (1, 1, 1): z-score normalisation, cubic resampling
    there, linear logit resampling back; only boundary voxels may differ (Dice >= 0.95)."""
    spacing, inten = (0.8, 1.0, 2.5), (50.0, 150.0, 300.0)
    label = _dataset(tmp_path / "raw", spacing, "MR", inten)
    pre = preprocess_dataset(tmp_path / "raw", tmp_path / "pre", target_spacing=(1.0, 1.0, 1.0),
                             progress=False)
    meta = pre.plans["cases"]["case"]
    assert meta["shape"] != meta["cropped_shape"]
    images = [tmp_path / "raw/imagesTr/case_0000.nii.gz"]
    pred, _ = predict_raw_case(_oracle(pre.plans, inten), images, pre.plans, (16, 16, 16),
                               mirror_axes=(0, 1, 2))
    m = evaluate_case(pred, label, 3, spacing)
    assert m[1]["dice"] >= 0.95 and m[2]["dice"] >= 0.95, m
    assert not pred[tuple(slice(None) if i else slice(0, 2) for i in range(3))].any()


def test_save_prediction(tmp_path):
    ref = tmp_path / "img.nii.gz"
    affine = np.diag([0.7, 0.8, 2.0, 1.0])
    affine[:3, 3] = (1.0, 2.0, 3.0)
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.float32)
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.random((6, 5, 4), np.float32), affine, hdr), str(ref))
    lab = rng.integers(0, 3, (6, 5, 4))
    (tmp_path / "out").mkdir()
    out = save_prediction(torch.from_numpy(lab), ref, tmp_path / "out" / "case.nii.gz")
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(img.dataobj), lab)
    np.testing.assert_allclose(img.affine, affine)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["case.nii.gz"]
    big = save_prediction(lab * 200, ref, tmp_path / "big.nii")
    assert nib.load(str(big)).get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(nib.load(str(big)).dataobj), lab * 200)
    with pytest.raises(ValueError, match="shape"):
        save_prediction(lab[:5], ref, tmp_path / "x.nii.gz")
    with pytest.raises(ValueError, match=r"must end with one of \.nii\.gz, \.nii, \.nrrd, \.mha"):
        save_prediction(lab, ref, tmp_path / "x.npy")
    with pytest.raises(ValueError, match=r"\[0, 32767\]"):
        save_prediction(lab - 1, ref, tmp_path / "x.nii.gz")


@pytest.mark.parametrize("src,dst", [((7, 12, 5), (9, 10, 13)), ((11, 6), (4, 15))])
def test_logit_resampling_matches_forward_convention(src, dst):
    """Logits go back with the voxel-centre mapping and edge handling of the forward resampling
    (scipy zoom, grid_mode=True, mode='nearest'), at order 1."""
    from colabx.inference.predict import _resize_logits

    z = np.random.default_rng(0).normal(size=(2, *src)).astype(np.float32)
    got = _resize_logits(torch.from_numpy(z)[None], dst)[0].numpy()
    for k in range(2):
        factors = [d / s for d, s in zip(dst, src, strict=True)]
        want = ndi.zoom(z[k], factors, order=1, mode="nearest", grid_mode=True)
        np.testing.assert_allclose(got[k], want, atol=1e-5)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_logit_resampling_of_anisotropic_data_is_in_plane_then_nearest(axis):
    """nnU-Net's export of anisotropic data: linear within the slices across the separate axis,
    nearest neighbour along it."""
    from colabx.data.preprocessing import nearest_indices
    from colabx.inference.predict import _resize_logits

    src, dst = (7, 12, 5), (9, 10, 13)
    z = np.random.default_rng(axis).normal(size=(2, *src)).astype(np.float32)
    got = _resize_logits(torch.from_numpy(z)[None], dst, separate_axis=axis)[0].numpy()
    plane = [n for a, n in enumerate(dst) if a != axis]
    for k in range(2):
        moved = np.moveaxis(z[k], axis, 0)
        slices = np.stack([ndi.zoom(s, [d / n for d, n in zip(plane, s.shape, strict=True)],
                                    order=1, mode="nearest", grid_mode=True) for s in moved])
        want = np.moveaxis(slices[nearest_indices(src[axis], dst[axis])], 0, axis)
        np.testing.assert_allclose(got[k], want, atol=1e-5)

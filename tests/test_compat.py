"""colabx.compat (drop-ins for the public CoLab code) against the reference-style twins of
colabx.compat.twins, and those twins against independent oracles (scipy, float64)."""

import sys
import types
import zlib

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

import colabx.compat
import colabx.models
from colabx.compat import (
    calcualte_loss_val,
    calculate_loss,
    hessian_vector_product_Unet,
    one_hot2dist,
)
from colabx.compat.common import _resize_labels
from colabx.compat.twins import (
    calculate_loss_reference,
    calculate_loss_val_reference,
    hessian_vector_product_reference,
    one_hot2dist_reference,
    resize_labels_order0,
)
from colabx.models import UNet, task_generator
from colabx.twins.dice_ce_loss import default_level_weights
from colabx.twins.roi_bce_loss import BCE_EPS


def _args(c=2, t=2, deep=True, n=3, vanilla=False, manual=False):
    return types.SimpleNamespace(NumsClass=c, taskcls=t, deepsupervision=deep, downsampling=n,
                                 vanilla=vanilla, manuallabel=manual)


def _inputs(args, spatial, batch=2, seed=0, dtype=torch.float32):
    """Labels, per-level logits / generator probabilities / soft masks (floor-halved shapes)."""
    g = torch.Generator().manual_seed(seed)
    k = args.NumsClass + args.taskcls - 1
    n_labels = 3 if args.manuallabel else args.NumsClass
    y = torch.randint(0, n_labels, (batch, *spatial), generator=g)
    zs, qs, ms = [], [], []
    for lvl in range(args.downsampling if args.deepsupervision else 1):
        shape = [s // 2**lvl for s in spatial]
        zs.append((3 * torch.randn(batch, k, *shape, generator=g)).to(dtype).requires_grad_())
        q = torch.softmax(torch.randn(batch, args.taskcls, *shape, generator=g), 1)
        qs.append(q.to(dtype).requires_grad_())
        m = torch.exp(-torch.rand(batch, 1, *shape, generator=g) * 2)
        m[..., : shape[-1] // 2] = 1  # part of every level fully inside the mask
        ms.append(m.to(dtype))
    if not args.deepsupervision:
        return y, zs[0], qs[0], ms[0]
    return y, zs, qs, ms


def _clone(masks):
    return [m.clone() for m in masks] if isinstance(masks, list) else masks.clone()


def _flat(x):
    return x if isinstance(x, list) else [x]


# --------------------------------------------------------------------------------------------
# deep-supervision labels: the order-0 resize
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_in", [80, 81, 79, 13, 11, 10, 7, 6, 5, 33])
@pytest.mark.parametrize("level", [1, 2, 3])
def test_device_resize_samples_what_scipy_zoom_samples(n_in, level):
    n_out = max(1, n_in // 2**level)
    line = np.arange(n_in)[None, :]
    want = resize_labels_order0(line, (n_out,))
    got = _resize_labels(torch.from_numpy(line), (n_out,)).numpy()
    np.testing.assert_array_equal(got, want)


def test_resize_of_a_power_of_two_level_takes_the_voxel_after_the_centre():
    """docs/design.md: level k of a 2^k-divisible patch samples y at r·2^k + 2^(k-1)."""
    y = torch.arange(2 * 16 * 8).reshape(2, 16, 8)
    got = _resize_labels(y, (4, 2))
    np.testing.assert_array_equal(got.numpy(), y[:, 2::4, 2::4].numpy())


def test_reference_resize_is_order0_zoom_per_item():
    rng = np.random.default_rng(3)
    lab = rng.integers(0, 3, (2, 13, 9, 7))
    out = resize_labels_order0(lab, (6, 4, 3))
    for b in range(2):
        want = ndi.zoom(lab[b].astype(float), (6 / 13, 4 / 9, 3 / 7), order=0, grid_mode=True,
                        mode="grid-constant")
        np.testing.assert_array_equal(out[b], want)


def test_deep_supervision_weights():
    np.testing.assert_allclose(default_level_weights(4), np.array([1, 0.5, 0.25, 0]) / 1.75)
    np.testing.assert_allclose(default_level_weights(1), [1.0])


# --------------------------------------------------------------------------------------------
# calculate_loss
# --------------------------------------------------------------------------------------------

CASES = [
    # (c, t, deep, vanilla, manual, detach, losstype, BGcls)
    (2, 2, True, False, False, False, 0, 0),
    (2, 3, True, False, False, True, 0, 0),
    (3, 2, True, False, False, False, 0, 2),
    (3, 4, True, True, False, True, 0, 0),
    (2, 2, True, True, False, False, 0, 0),
    (2, 2, True, False, True, False, 0, 0),
    (2, 3, True, False, False, False, 1, 2),
    (2, 2, False, False, False, False, 0, 0),
    (2, 5, False, False, False, True, 0, 0),
    (3, 3, False, False, False, False, 1, 1),
]


# without deep supervision the reference needs loss_masks
MASKED = [(case, m) for case in CASES for m in (True, False) if case[2] or m]


@pytest.mark.parametrize("case, with_masks", MASKED,
                         ids=lambda v: "-".join(str(int(x)) for x in v) if isinstance(v, tuple)
                         else f"masks{int(v)}")
@pytest.mark.parametrize("spatial", [(16, 12, 10), (13, 11, 9), (20, 17)], ids=str)
def test_calculate_loss_matches_the_reference(case, with_masks, spatial):
    c, t, deep, vanilla, manual, detach, losstype, bg = case
    args = _args(c, t, deep, 3 if len(spatial) == 3 else 2, vanilla, manual)
    y, zs, qs, ms = _inputs(args, spatial, seed=zlib.crc32(repr(case).encode()) % 1000)
    m_ours, m_ref = (_clone(ms), _clone(ms)) if with_masks else (None, None)
    kwargs = dict(detach=detach, losstype=losstype, BGcls=bg)
    ours = calculate_loss(args, y, zs, qs, loss_masks=m_ours, **kwargs)
    want = calculate_loss_reference(args, y, zs, qs, loss_masks=m_ref, **kwargs)
    assert ours.dtype == torch.float32 and ours.dim() == 0
    torch.testing.assert_close(ours, want, rtol=2e-6, atol=2e-6)
    if with_masks:  # the same in-place update of the caller's masks
        for a, b in zip(_flat(m_ours), _flat(m_ref), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    wrt = _flat(zs) + _flat(qs)
    g_ours = torch.autograd.grad(ours, wrt, allow_unused=True)
    g_ref = torch.autograd.grad(want, wrt, allow_unused=True)
    for a, b in zip(g_ours, g_ref, strict=True):
        if b is None:
            assert a is None
            continue
        a = torch.zeros_like(b) if a is None else a  # vanilla: the generator is overwritten
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()) + 1e-12)


@pytest.mark.parametrize("deep, manual", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("losstype", [0, 1])
@pytest.mark.parametrize("dtypes", [("f32", "f64", "f32"), ("f32", "f32", "f64"),
                                    ("f64", "f32", "f32"), ("f32", "f64", "f64")], ids=str)
def test_calculate_loss_returns_the_references_dtype_for_mixed_inputs(dtypes, losstype, deep,
                                                                       manual):
    """The reference's arithmetic promotes the loss to the widest dtype it reads: the logits,
    the masks, and the generator's probabilities unless the labels are manual."""
    dt = {"f32": torch.float32, "f64": torch.float64}
    args = _args(2, 2, deep, 3, manual=manual)
    y, zs, qs, ms = _inputs(args, (12, 10, 8), seed=5)
    cast = [[t.detach().to(dt[d]).requires_grad_(t.requires_grad) for t in _flat(x)]
            for x, d in zip((zs, qs, ms), dtypes, strict=True)]
    zs, qs, ms = (c if deep else c[0] for c in cast)
    kwargs = dict(losstype=losstype, BGcls=1)
    ours = calculate_loss(args, y, zs, qs, loss_masks=_clone(ms), **kwargs)
    want = calculate_loss_reference(args, y, zs, qs, loss_masks=_clone(ms), **kwargs)
    assert ours.dtype == want.dtype
    torch.testing.assert_close(ours, want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("losstype, bg", [(0, 0), (1, 2)])
def test_calculate_loss_gradient_reaches_a_differentiable_mask(losstype, bg):
    """Without deep supervision the reference leaves loss_masks untouched, so a mask that
    requires grad gets ∂loss/∂M through aux·M + e_bg·(1 − M)."""
    args = _args(3, 2, deep=False)
    y, z, q, m = _inputs(args, (9, 7, 6))
    m = m.requires_grad_()
    kwargs = dict(losstype=losstype, BGcls=bg)
    ours = calculate_loss(args, y, z, q, loss_masks=m, **kwargs)
    want = calculate_loss_reference(args, y, z, q, loss_masks=m, **kwargs)
    for a, b in zip(torch.autograd.grad(ours, [m, q]), torch.autograd.grad(want, [m, q]),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("bg", [-1, 4])
def test_calculate_loss_names_a_background_class_outside_the_output(bg):
    """The reference indexes past the channels (an IndexError deep in its loss): here a
    ValueError naming BGcls and the valid range (K = c + t - 1 = 4 channels)."""
    args = _args(3, 2, deep=False)
    y, z, q, m = _inputs(args, (9, 7, 6))
    with pytest.raises(ValueError, match=rf"calculate_loss: BGcls {bg} is not a channel of the "
                       r"output \(0 to 3\)"):
        calculate_loss(args, y, z, q, loss_masks=m, losstype=1, BGcls=bg)


def test_calculate_loss_forces_the_ground_truth_into_every_masks_level():
    args = _args(3, 2, True, 3)
    y, zs, qs, ms = _inputs(args, (16, 16, 8))
    masks = [torch.zeros_like(m) for m in ms]
    calculate_loss(args, y, zs, qs, loss_masks=masks)
    for lvl, m in enumerate(masks):
        roi = _resize_labels(y, m.shape[2:]) > 0
        assert torch.equal(m[:, 0] == 1, roi), lvl


def test_calculate_loss_in_float64_matches_an_independent_float64_loss():
    """No masks, one level: −mean Dice over 1..K-1 + CE of the assembled labels, computed from
    scratch in float64 with torch's log_softmax."""
    args = _args(2, 3, deep=False)
    y, z, q, m = _inputs(args, (9, 8, 7), dtype=torch.float64)
    ours = calculate_loss(args, y, z, q, loss_masks=torch.ones_like(m))
    k = 4
    onehot = F.one_hot(y, k).movedim(-1, 1).double()
    ctx = torch.cat((q[:, :1], torch.zeros_like(q[:, :1]), q[:, 1:]), 1)
    target = torch.where((y > 0).unsqueeze(1), onehot, ctx)
    p = torch.softmax(z, 1)
    ce = -(target * F.log_softmax(z, 1)).sum() / y.numel()
    tp = (p * target).sum((2, 3, 4))
    dice = (2 * tp + 1e-5) / (p.sum((2, 3, 4)) + target.sum((2, 3, 4)) + 1e-5)
    want = ce - dice[:, 1:].mean()
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad, match", [
    (lambda a, y, z, q, m: (a, y.float(), z, q, m), "integer label"),
    (lambda a, y, z, q, m: (a, y + 5, z, q, m), r"targets values must be in 0\.\.1"),
    (lambda a, y, z, q, m: (a, y[:, :-1], z, q, m), "targets has shape"),
    (lambda a, y, z, q, m: (a, y, [z[0][:, :2]] + z[1:], q, m), r"output\[0\] has shape"),
    (lambda a, y, z, q, m: (a, y, z, [q[0], q[1][:, :1], q[2]], m), r"taskGenerated\[1\]"),
    (lambda a, y, z, q, m: (a, y, z, q, [m[0], m[1], m[2][:, :, :-1]]), r"loss_masks\[2\]"),
    (lambda a, y, z, q, m: (a, y, z[:2], q, m), "at least args.downsampling = 3"),
])
def test_calculate_loss_bad_input(bad, match):
    args = _args(2, 2, True, 3)
    y, zs, qs, ms = _inputs(args, (8, 8, 8))
    a, y, zs, qs, ms = bad(args, y, zs, qs, ms)
    with pytest.raises((ValueError, TypeError), match=match):
        calculate_loss(a, y, zs, qs, loss_masks=ms)


def test_calculate_loss_half_precision_logits():
    args = _args(2, 2, True, 3)
    y, zs, qs, ms = _inputs(args, (16, 16, 8))
    half = [z.detach().bfloat16().requires_grad_() for z in zs]
    ours = calculate_loss(args, y, half, qs, loss_masks=_clone(ms))
    want = calculate_loss_reference(args, y, [z.float() for z in half], qs, loss_masks=_clone(ms))
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(ours, half[0])[0]
    assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()


# --------------------------------------------------------------------------------------------
# calcualte_loss_val (the reference's spelling)
# --------------------------------------------------------------------------------------------

VAL_CASES = [(2, 2, True, (16, 12, 10)), (3, 2, True, (9, 8, 7)), (2, 3, False, (12, 10, 8)),
             (3, 2, False, (11, 9, 8)), (2, 4, True, (20, 17)), (4, 2, True, (8, 8, 8))]


def _val_inputs(c, t, deep, spatial, dtype=torch.float32):
    g = torch.Generator().manual_seed(c * 10 + t)
    z = (3 * torch.randn(2, c + t - 1, *spatial, generator=g)).to(dtype).requires_grad_()
    y = torch.randint(0, c, (2, *spatial), generator=g)
    args = types.SimpleNamespace(NumsClass=c, taskcls=t, deepsupervision=deep)
    return args, z, y, _val_output(z, deep)


def _val_output(z, deep):
    """The network output calcualte_loss_val sees: z, or with deep supervision z and a
    stride-2 view as the second level."""
    sub = (slice(None), slice(None)) + (slice(None, None, 2),) * (z.dim() - 2)
    return [z, z[sub]] if deep else z


def _assert_near_float64_val_grad(g, args, y, z):
    """The reference's log(1 - p + 1e-6) makes the fp32 gradient at a voxel with 1 - p_roi ~ 1e-5
    move by ~0.4 % when p moves by an ulp, so two fp32 implementations (the drop-in, torch's CUDA
    softmax in the twin) may differ there by that much. ``g`` must stay within 4 ulp of p of the
    float64 gradient, relative to 1 - p + 1e-6, plus 1e-5 of max|g|. On the CPU the drop-in and
    the twin reach 0.27 of this bound; a 1e-4 relative error anywhere exceeds it 6-fold."""
    z64 = z.detach().double().requires_grad_()
    out64 = _val_output(z64, args.deepsupervision)
    g64 = torch.autograd.grad(calculate_loss_val_reference(args, y, out64)[0], z64)[0]
    p_roi = torch.softmax(z64.detach(), 1)[:, 1:args.NumsClass].sum(1, keepdim=True)
    bound = 1e-5 * g64.abs().max() + g64.abs() * 8 * 2.0**-24 / (1 - p_roi + BCE_EPS)
    assert float(((g.double() - g64).abs() / bound).max()) <= 1


@pytest.mark.parametrize("c, t, deep, spatial", VAL_CASES, ids=str)
def test_calcualte_loss_val_matches_the_reference(c, t, deep, spatial):
    args, z, y, out = _val_inputs(c, t, deep, spatial)
    ours, want = calcualte_loss_val(args, y, out), calculate_loss_val_reference(args, y, out)
    assert len(ours) == len(want) == 10
    for i, (a, b) in enumerate(zip(ours, want, strict=True)):
        assert a.dim() == 0, i
        torch.testing.assert_close(a, b.detach(), rtol=2e-6, atol=2e-6, msg=f"value {i}")
    g_ours = torch.autograd.grad(ours[0], z)[0]
    g_ref = torch.autograd.grad(want[0], z)[0]
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-5 * float(g_ref.abs().max()))
    _assert_near_float64_val_grad(g_ours, args, y, z)
    # the diagnostics carry gradients too, as the reference's do
    ours, want = calcualte_loss_val(args, y, out), calculate_loss_val_reference(args, y, out)
    for i, (a, b) in enumerate(zip(ours[1:], want[1:], strict=True), 1):
        ga = torch.autograd.grad(a, z, retain_graph=True)[0]
        gb = torch.autograd.grad(b, z, retain_graph=True)[0]
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-5 * float(gb.abs().max()) + 1e-12,
                                   msg=f"gradient of value {i}")


def test_calcualte_loss_val_backpropagates_lossvalpbce():
    """A variant that trains on the positive BCE part (the fourth value): its backward fills
    ∂/∂z, equal in float64 to the reference's and to the gradient of an independent
    formula, −Σ_ROI y·log(p + 1e-6)/(B·V) by autograd through log_softmax-free torch ops."""
    args, z, y, out = _val_inputs(3, 2, True, (9, 8, 7), torch.float64)
    lossvalpbce = calcualte_loss_val(args, y, out)[3]
    lossvalpbce.backward()
    want = torch.autograd.grad(calculate_loss_val_reference(args, y, out)[3], z)[0]
    torch.testing.assert_close(z.grad, want, rtol=1e-12, atol=1e-14)
    z2 = z.detach().clone().requires_grad_()
    p = torch.softmax(z2, 1)[:, 1:3]
    onehot = F.one_hot(y, 4).movedim(-1, 1)[:, 1:3].double()
    (-(onehot * torch.log(p + 1e-6)).sum() / y.numel()).backward()
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-12, atol=1e-14)
    assert float(z.grad.abs().max()) > 0


def test_calcualte_loss_val_without_grad_builds_no_graph():
    args, z, y, out = _val_inputs(2, 2, False, (8, 8, 8))
    with torch.no_grad():
        vals = calcualte_loss_val(args, y, out)
    assert not any(v.requires_grad for v in vals)
    vals = calcualte_loss_val(args, y, z.detach())
    assert not any(v.requires_grad for v in vals)


def test_calcualte_loss_val_against_float64_formulas():
    """Independent float64 recomputation of the BCE, Dice and specificity."""
    args, z, y, out = _val_inputs(3, 2, False, (7, 6, 5), torch.float64)
    vals = calcualte_loss_val(args, y, out)
    p = torch.softmax(z.detach(), 1)
    onehot = F.one_hot(y, 4).movedim(-1, 1).double()
    pr, yr = p[:, 1:3], onehot[:, 1:3]
    bce = -(yr * torch.log(pr + 1e-6) + (1 - yr) * torch.log(1 - pr + 1e-6)).mean(
        (0, 2, 3, 4)).sum()
    axes = (2, 3, 4)
    tp = (pr * yr).sum(axes)
    dice = -((2 * tp + 1e-5) / (pr.sum(axes) + yr.sum(axes) + 1e-5)).mean()
    tn = ((1 - pr) * (1 - yr)).sum(axes)
    spec = -((tn + 1e-5) / (tn + (pr * (1 - yr)).sum(axes) + 1e-5)).mean()
    torch.testing.assert_close(vals[0].detach(), bce, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vals[2], dice, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vals[9], spec, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad, match", [
    (lambda y, out: (y.float(), out), "integer label"),
    (lambda y, out: (y + 2, out), r"target_varval values must be in 0\.\.1"),
    (lambda y, out: (y[:, 1:], out), "target_varval has shape"),
    (lambda y, out: (y, [out[0][:, :1]]), "K >= NumsClass = 2"),
])
def test_calcualte_loss_val_bad_input(bad, match):
    args, z, y, out = _val_inputs(2, 2, True, (8, 8, 8))
    y, out = bad(y, out)
    with pytest.raises((ValueError, TypeError), match=match):
        calcualte_loss_val(args, y, out)


# --------------------------------------------------------------------------------------------
# one_hot2dist
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 40, 41, 23), (3, 17, 9), (2, 5, 6, 7), (1, 1, 1, 9)],
                         ids=str)
@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.float32, np.float64], ids=str)
def test_one_hot2dist_is_the_reference_bit_for_bit_in_voxel_units(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    seg = (rng.random(shape) < 0.08).astype(dtype)
    if shape[0] > 1:
        seg[-1] = 1  # a full channel: scipy measures to a phantom voxel outside the array
        seg[0] = 0  # an empty channel stays 0
    ours, want = one_hot2dist(seg), one_hot2dist_reference(seg)
    assert ours.dtype == want.dtype and ours.shape == want.shape
    np.testing.assert_array_equal(ours, want)


@pytest.mark.parametrize("resolution", [(0.8, 0.8, 2.5), (2.0, 1.0, 0.5)], ids=str)
def test_one_hot2dist_with_a_spacing_agrees_to_float32(resolution):
    rng = np.random.default_rng(7)
    seg = (rng.random((2, 19, 16, 11)) < 0.05).astype(np.float32)
    ours, want = one_hot2dist(seg, resolution), one_hot2dist_reference(seg, resolution)
    np.testing.assert_allclose(ours, want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("resolution", [(0.7, 0.7, 0.7), (1.3, 0.35, 1.0)], ids=str)
def test_one_hot2dist_integer_masks_with_a_spacing_truncate_as_the_reference(resolution):
    """An integer ``seg`` truncates the distances; where float32 cannot tell on which side of an
    integer a distance lies (0.7 * 90 is 63 in float32 and just below it in float64), the
    result is still the reference's."""
    seg = np.zeros((2, 96, 20, 12), np.int32)
    seg[0, :3, 5:9, 4:7] = 1
    seg[1, 40:, :, :] = 1
    ours, want = one_hot2dist(seg, resolution), one_hot2dist_reference(seg, resolution)
    assert ours.dtype == want.dtype
    np.testing.assert_array_equal(ours, want)


def test_one_hot2dist_rejects_other_ranks():
    with pytest.raises(ValueError, match=r"seg must be \[K, H, W\] or \[K, D, H, W\]"):
        one_hot2dist(np.zeros((4, 4)))


# --------------------------------------------------------------------------------------------
# hessian_vector_product_Unet
# --------------------------------------------------------------------------------------------

def _meta_setup(dtype, deep=True):
    """Nets and inputs drawn in float32, then cast (the same values for every dtype)."""
    torch.manual_seed(0)
    args = _args(2, 2, deep, 2 if deep else 1)
    f = UNet(1, 3, 3, base_features=4, num_pool=2, deep_supervision=deep)
    g = task_generator(1, 2, 3, base_features=4, num_pool=2)
    x = torch.randn(1, 1, 16, 16, 16)
    vector = [torch.randn_like(p).to(dtype) for p in f.parameters()]
    f, g, x = f.to(dtype), g.to(dtype), x.to(dtype)
    y = torch.zeros(1, 16, 16, 16, dtype=torch.long)
    y[:, 5:10, 4:9, 6:12] = 1
    q = torch.softmax(g(x), 1)
    gen = [q, F.avg_pool3d(q, 2)] if deep else q
    d = torch.from_numpy(ndi.distance_transform_edt(y[0].numpy() == 0))[None, None]
    mask = torch.exp((4 - d) / 4).clamp(max=1).to(dtype)
    masks = [mask, -F.max_pool3d(-mask, 2)] if deep else mask
    return args, f, g, x, y, gen, masks, vector


@pytest.mark.parametrize("deep", [True, False])
def test_hessian_vector_product_matches_the_reference(deep):
    args, f, g, x, y, gen, masks, vector = _meta_setup(torch.float64, deep)
    ours = hessian_vector_product_Unet(f, g, vector, x, y, gen, None, args, masks, 0)
    after_ours = [p.detach().clone() for p in f.parameters()]
    args, f, g, x, y, gen, masks, vector = _meta_setup(torch.float64, deep)
    want = hessian_vector_product_reference(f, g, vector, x, y, gen, None, args, masks, 0,
                                             loss_fn=calculate_loss_reference)
    for a, b in zip(after_ours, f.parameters(), strict=True):
        assert torch.equal(a, b)  # θ restored by the same arithmetic
    scale = max(float(w.abs().max()) for w in want)
    assert scale > 0
    for a, b in zip(ours, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7 * scale)


def _rel_err(got, want):
    num = sum(float(((a.double() - b.double()) ** 2).sum()) for a, b in zip(got, want, strict=True))
    return (num / sum(float((b.double() ** 2).sum()) for b in want)) ** 0.5


@pytest.mark.parametrize("deep", [True, False])
def test_hessian_vector_product_in_float32_is_as_accurate_as_the_reference(deep):
    """Against the float64 product: colabx's single backward of L(θ+) − L(θ−) in float32 is at
    least as close as the reference's two backwards in float32 (measured 2.3e-4 vs 2.6e-4)."""
    want = hessian_vector_product_reference(*_hvp_args(torch.float64, deep))
    ours = hessian_vector_product_Unet(*_hvp_args(torch.float32, deep))
    ref32 = hessian_vector_product_reference(*_hvp_args(torch.float32, deep))
    assert _rel_err(ours, want) < 1e-3
    assert _rel_err(ours, want) <= 1.1 * _rel_err(ref32, want)


def _hvp_args(dtype, deep=True):
    args, f, g, x, y, gen, masks, vector = _meta_setup(dtype, deep)
    return f, g, vector, x, y, gen, None, args, masks, 0


def test_hessian_vector_product_rejects_a_mismatched_vector():
    args, f, g, x, y, gen, masks, vector = _meta_setup(torch.float32)
    with pytest.raises(ValueError, match="vector has"):
        hessian_vector_product_Unet(f, g, vector[:-1], x, y, gen, None, args, masks, 0)


# --------------------------------------------------------------------------------------------
# apply_to_reference
# --------------------------------------------------------------------------------------------

COMMON_PY = """
from utilities import hessian_vector_product_Unet

def calculate_loss(*args, **kwargs):
    return "original"

def calcualte_loss_val(*args, **kwargs):
    return "original"

def train_step():
    return calculate_loss, hessian_vector_product_Unet
"""

UTILITIES_PY = """
def one_hot2dist(seg, resolution=None):
    return "original"

def hessian_vector_product_Unet(*args, **kwargs):
    return "original"
"""


@pytest.fixture
def reference_modules(tmp_path, monkeypatch):
    (tmp_path / "common.py").write_text(COMMON_PY)
    (tmp_path / "utilities.py").write_text(UTILITIES_PY)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("common", "utilities"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield
    for name in ("common", "utilities"):
        sys.modules.pop(name, None)


def test_apply_to_reference_replaces_the_functions_the_reference_calls(reference_modules):
    import common
    import utilities

    replaced = colabx.compat.apply_to_reference(cpu_convolutions=False)
    assert sorted(replaced) == ["common.calcualte_loss_val", "common.calculate_loss",
                                "common.hessian_vector_product_Unet",
                                "utilities.hessian_vector_product_Unet",
                                "utilities.one_hot2dist"]
    assert common.calculate_loss is calculate_loss
    assert common.calcualte_loss_val is calcualte_loss_val
    assert utilities.one_hot2dist is one_hot2dist
    # the reference's own functions look the names up in their module at call time
    assert common.train_step() == (calculate_loss, hessian_vector_product_Unet)


def test_apply_to_reference_routes_cpu_convolutions(reference_modules):
    """On a machine without CUDA (the default) the thread's batch-1 3D convolutions go to
    oneDNN from then on; ``cpu_convolutions=False`` leaves PyTorch's dispatch alone."""
    x = torch.randn(1, 8, 16, 16, 16)
    w = torch.randn(8, 8, 3, 3, 3)

    def kernels():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            torch.nn.functional.conv3d(x, w, padding=1)
        return {e.key for e in prof.key_averages()}

    before = kernels()
    replaced = colabx.compat.apply_to_reference(cpu_convolutions=True)
    assert replaced[-2:] == ["torch.conv3d", "torch.conv_transpose3d"]
    assert "aten::mkldnn_convolution" in kernels()
    colabx.models.disable_onednn_convolutions()
    assert kernels() == before
    assert "torch.conv3d" not in colabx.compat.apply_to_reference(cpu_convolutions=False)
    default = colabx.compat.apply_to_reference()
    assert ("torch.conv3d" in default) == (not torch.cuda.is_available())


def test_apply_to_reference_changes_nothing_when_a_module_is_not_the_reference():
    common = types.ModuleType("common")
    common.calculate_loss = common.calcualte_loss_val = common.hessian_vector_product_Unet = None
    utilities = types.ModuleType("utilities")
    utilities.one_hot2dist = None
    with pytest.raises(AttributeError, match="has no hessian_vector_product_Unet"):
        colabx.compat.apply_to_reference(common, utilities)
    assert common.calculate_loss is None  # all or nothing


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------

def _to_cuda(x):
    if isinstance(x, list):
        return [_to_cuda(v) for v in x]
    return x.detach().cuda().requires_grad_(x.requires_grad)


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(int(v)) for v in c))
def test_cuda_calculate_loss_matches_the_reference_and_the_cpu(case):
    c, t, deep, vanilla, manual, detach, losstype, bg = case
    args = _args(c, t, deep, 3, vanilla, manual)
    y, zs, qs, ms = _inputs(args, (24, 20, 17), seed=5)
    kwargs = dict(detach=detach, losstype=losstype, BGcls=bg)
    yc, zc, qc = y.cuda(), _to_cuda(zs), _to_cuda(qs)
    ours = calculate_loss(args, yc, zc, qc, loss_masks=_to_cuda(_clone(ms)), **kwargs)
    want = calculate_loss_reference(args, yc, zc, qc, loss_masks=_to_cuda(_clone(ms)), **kwargs)
    cpu = calculate_loss(args, y, zs, qs, loss_masks=_clone(ms), **kwargs)
    torch.testing.assert_close(ours, want, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(ours.cpu(), cpu, rtol=2e-6, atol=2e-6)
    wrt = _flat(zc) + _flat(qc)
    for a, b in zip(torch.autograd.grad(ours, wrt, allow_unused=True),
                    torch.autograd.grad(want, wrt, allow_unused=True), strict=True):
        if b is not None:
            a = torch.zeros_like(b) if a is None else a
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()) + 1e-12)


@pytest.mark.cuda
@pytest.mark.parametrize("c, t, deep, spatial", VAL_CASES, ids=str)
def test_cuda_calcualte_loss_val_matches_the_reference(c, t, deep, spatial):
    args, z, y, out = _val_inputs(c, t, deep, spatial)
    zc = z.detach().cuda().requires_grad_()
    outc = _val_output(zc, deep)
    ours = calcualte_loss_val(args, y.cuda(), outc)
    want = calculate_loss_val_reference(args, y.cuda(), outc)
    for a, b in zip(ours, want, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=2e-6, atol=2e-6)
    _assert_near_float64_val_grad(torch.autograd.grad(ours[0], zc)[0].cpu(), args, y, z)


@pytest.mark.cuda
def test_cuda_hessian_vector_product_matches_the_reference():
    def on_cuda(dtype):
        f, g, vector, x, y, gen, crit, args, masks, bg = _hvp_args(dtype)
        f, g = f.cuda(), g.cuda()
        q = torch.softmax(g(x.cuda()), 1)
        return (f, g, [v.cuda() for v in vector], x.cuda(), y.cuda(), [q, F.avg_pool3d(q, 2)],
                crit, args, [m.cuda() for m in masks], bg)

    want = hessian_vector_product_reference(*on_cuda(torch.float64))
    ours = hessian_vector_product_Unet(*on_cuda(torch.float64))
    assert _rel_err(ours, want) < 1e-6

"""Tests for colabx.context_labels: op vs PyTorch twin, independent numpy oracle, gradients,
argument errors, torch.compile, and (marked cuda) the CUDA kernels."""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest
import torch

from colabx import context_labels
from colabx.twins.context_labels import context_labels_twin

FP_TOL = {
    torch.float32: dict(atol=2e-6, rtol=2e-6),
    torch.float16: dict(atol=2e-6, rtol=2e-6),  # both sides upcast to float32 first
    torch.bfloat16: dict(atol=2e-6, rtol=2e-6),
    torch.float64: dict(atol=1e-12, rtol=1e-12),
}


def case_seed(*case) -> int:
    """A seed from a test case's parameters, the same in every process (``hash()`` of a string
    is salted per process)."""
    return zlib.crc32(repr(case).encode())


def make_inputs(B, t, c, S, dtype=torch.float32, device="cpu", seed=0, label_dtype=torch.int64,
                scale=3.0, far_roi=False):
    """Random logits, labels (70 % background) and distances (0 on the ROI, unless ``far_roi``:
    then ROI voxels get distances at or past the margin, some +inf, which the mask must ignore
    there)."""
    g = torch.Generator().manual_seed(seed)
    o = (torch.randn(B, t, *S, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, c, (B, *S), generator=g)
    y = torch.where(torch.rand(B, *S, generator=g) < 0.7, torch.zeros_like(y), y)
    d = torch.rand(B, *S, generator=g, dtype=torch.float64) * 80.0
    if far_roi:
        far = 30.0 + 40.0 * torch.rand(B, *S, generator=g, dtype=torch.float64)
        far.view(-1)[::5] = float("inf")
        d = torch.where(y > 0, far, d)
    else:
        d[y > 0] = 0.0
    if B > 1:  # one item without ROI
        y[-1] = 0
        d[-1] = float("inf")
    d.view(-1)[::7] = 30.0  # exactly at the margin
    return o.to(device), y.to(label_dtype).to(device), d.float().to(device)


def as_list(x):
    return x if isinstance(x, list) else [x]


# (B, t, c, spatial, levels): 2D/3D, odd sizes, B 1..3, c 2..4, t 1..6, levels 1..4,
# anisotropic and non-power-of-two strides.
CASES = [
    (1, 1, 2, (9, 7), 1),
    (2, 2, 2, (16, 16), 2),
    (3, 3, 3, (17, 13), 3),
    (2, 6, 4, (21, 19), [1, 3]),
    (1, 4, 2, (33, 12), 4),
    (2, 2, 2, (5, 6, 7), 1),
    (1, 1, 3, (8, 9, 10), 2),
    (2, 3, 2, (9, 11, 13), 3),
    (3, 2, 4, (17, 16, 18), 4),
    (2, 5, 3, (7, 13, 14), [(1, 1, 1), (1, 2, 2), (2, 4, 4)]),
    (1, 2, 2, (12, 10, 11), [(1, 2, 2), (2, 2, 4)]),
    (2, 3, 2, (10, 12, 9), [2, (2, 4, 2)]),
    (1, 2, 3, (6, 9, 12), [(1, 1, 1), (1, 1, 1), (3, 3, 3)]),
]


def _case_id(case):
    B, t, c, S, lev = case
    return f"B{B}t{t}c{c}S{'x'.join(map(str, S))}L{lev}".replace(" ", "")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_matches_twin(case, dtype):
    B, t, c, S, lev = case
    seed = case_seed(B, t, c, S, lev, dtype)
    o, y, d = make_inputs(B, t, c, S, dtype, seed=seed)
    o.requires_grad_(True)
    labs, masks = context_labels(o, y, d, c, levels=lev, return_mask=True)
    rlabs, rmasks = context_labels_twin(o, y, d, c, levels=lev, return_mask=True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert type(labs) is type(rlabs)
    for a, b in zip(as_list(labs), as_list(rlabs), strict=True):
        assert a.dtype == acc and a.shape == b.shape
        torch.testing.assert_close(a, b.detach(), **FP_TOL[dtype])
    for a, b in zip(as_list(masks), as_list(rmasks), strict=True):
        assert not a.requires_grad
        torch.testing.assert_close(a, b, **FP_TOL[dtype])
    grads = [torch.randn_like(a) for a in as_list(labs)]
    (ga,) = torch.autograd.grad(as_list(labs), [o], grads)
    (gb,) = torch.autograd.grad(as_list(rlabs), [o], grads)
    assert ga.dtype == dtype
    tol = FP_TOL[dtype] if dtype in (torch.float32, torch.float64) else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(ga, gb, **tol)


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32, torch.bool])
def test_label_dtypes(label_dtype):
    c = 2 if label_dtype == torch.bool else 3
    o, y, d = make_inputs(2, 3, c, (6, 7, 9), label_dtype=label_dtype, seed=3)
    a = context_labels(o, y, d, c, levels=2)
    b = context_labels(o, y.long(), d, c, levels=2)
    for x, z in zip(a, b, strict=True):
        torch.testing.assert_close(x, z, atol=0, rtol=0)


def test_non_contiguous_inputs():
    o, y, d = make_inputs(2, 3, 3, (10, 12, 14), seed=5)
    o_nc = o.permute(0, 1, 4, 3, 2).contiguous().permute(0, 1, 4, 3, 2).requires_grad_(True)
    y_nc = y.transpose(1, 3).contiguous().transpose(1, 3)
    d_nc = torch.cat([d, d], dim=-1)[..., ::2].clone()
    d_nc = torch.stack([d, d], dim=-1)[..., 0]
    assert not o_nc.is_contiguous() and not y_nc.is_contiguous() and not d_nc.is_contiguous()
    a = context_labels(o_nc, y_nc, d_nc, 3, levels=3)
    b = context_labels_twin(o_nc, y_nc, d_nc, 3, levels=3)
    for x, z in zip(a, b, strict=True):
        torch.testing.assert_close(x, z, **FP_TOL[torch.float32])
    grads = [torch.randn_like(x) for x in a]
    (ga,) = torch.autograd.grad(a, [o_nc], grads)
    (gb,) = torch.autograd.grad(b, [o_nc], grads)
    torch.testing.assert_close(ga, gb, **FP_TOL[torch.float32])


@pytest.mark.parametrize(
    "S,lev", [((5, 6), 1), ((6, 5), [1, 2]), ((4, 5, 6), [(1, 1, 1), (1, 2, 2), (2, 2, 4)])]
)
def test_gradcheck_float64(S, lev):
    o, y, d = make_inputs(2, 3, 3, S, torch.float64, seed=11)
    d = d.double()
    o.requires_grad_(True)

    def f(x):
        return tuple(as_list(context_labels(x, y, d, 3, levels=lev)))

    assert torch.autograd.gradcheck(f, (o,), eps=1e-6, atol=1e-8)


def test_mask_formula_and_continuity():
    m, tau = 30.0, 20.0
    dv = torch.tensor(
        [0.0, 10.0, m - 1e-3, m, m + 1e-3, 45.0, 200.0, float("inf"), -5.0], dtype=torch.float64
    )
    n = dv.numel()
    o = torch.zeros(1, 2, 1, n, dtype=torch.float64)
    y = torch.zeros(1, 1, n, dtype=torch.int64)
    d = dv.view(1, 1, n)
    _, M = context_labels(o, y, d, 2, margin=m, tau=tau, return_mask=True)
    M = M.view(-1)
    expect = torch.where(dv < m, torch.ones_like(dv), torch.exp((m - dv) / tau))
    torch.testing.assert_close(M, expect, atol=1e-15, rtol=1e-15)
    assert M[0] == 1 and M[3] == 1 and M[7] == 0 and M[8] == 1
    assert abs(M[2] - M[4]) < 1e-4  # continuous at d = m
    # float32 path (polynomial exp on CPU) against libm in float64
    _, M32 = context_labels(o.float(), y, d.float(), 2, margin=m, tau=tau, return_mask=True)
    torch.testing.assert_close(M32.view(-1).double(), expect, atol=1e-7, rtol=3e-7)


def test_exp_accuracy_wide_range():
    # M = exp((m - d) / tau) over the whole float range, through the float32 kernel.
    dv = torch.linspace(30.0, 30.0 + 20.0 * 110.0, 20001)
    o = torch.zeros(1, 1, 1, dv.numel())
    y = torch.zeros(1, 1, dv.numel(), dtype=torch.int64)
    _, M = context_labels(o, y, dv.view(1, 1, -1), 2, return_mask=True)
    ref = torch.exp(((30.0 - dv) / 20.0).double())  # same float32 argument, exact exp
    normal = ref > 1.2e-38
    rel = ((M.view(-1).double() - ref).abs() / ref)[normal]
    assert rel.max() < 4e-7
    assert (M.view(-1)[ref < 1e-45] == 0).all()


@pytest.mark.parametrize("lev", [1, 3])
def test_roi_one_hot_and_rows_sum_to_one(lev):
    c, t = 4, 3
    o, y, d = make_inputs(3, t, c, (9, 10, 11), seed=7)
    outs, masks = context_labels(o, y, d, c, levels=lev, return_mask=True)
    for level, (out, M) in enumerate(zip(as_list(outs), as_list(masks), strict=True)):
        s = 2**level
        y_l = y[:, s // 2 :: s, s // 2 :: s, s // 2 :: s]
        y_l = y_l[:, : out.shape[2], : out.shape[3], : out.shape[4]]
        torch.testing.assert_close(out.sum(1), torch.ones_like(out[:, 0]), atol=1e-6, rtol=0)
        roi = y_l > 0
        onehot = torch.nn.functional.one_hot(y_l, out.shape[1]).movedim(-1, 1).float()
        assert torch.equal(out.movedim(1, -1)[roi], onehot.movedim(1, -1)[roi])
        assert torch.equal(M[roi], torch.ones_like(M[roi]))
        bg = ~roi
        assert (out[:, 1:c].movedim(1, -1)[bg] == 0).all()


def test_vanilla_t1():
    o, y, d = make_inputs(2, 1, 3, (7, 8), seed=2)
    out = context_labels(o, y, d, 3)
    assert out.shape == (2, 3, 7, 8)
    bg = y == 0
    assert torch.equal(out[:, 0][bg], torch.ones_like(out[:, 0][bg]))
    # t = 1 is vanilla training: the expanded label is the plain one-hot label.
    onehot = torch.nn.functional.one_hot(y, 3).movedim(-1, 1).float()
    assert torch.equal(out, onehot)
    o.requires_grad_(True)
    (g,) = torch.autograd.grad(context_labels(o, y, d, 3).sum(), [o])
    assert torch.equal(g, torch.zeros_like(g))  # softmax over one channel is constant


def _numpy_oracle(o, y, d, c, strides, margin=30.0, tau=20.0):
    """Independent loop-level oracle for one pooled level (float64 numpy)."""
    o = o.double().numpy()
    y = y.numpy()
    d = d.double().numpy()
    q = np.exp(o - o.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    M = np.where(d < margin, 1.0, np.exp((margin - d) / tau))
    B, t = o.shape[:2]
    S = o.shape[2:]
    Sl = tuple(n // s for n, s in zip(S, strides, strict=True))
    out = np.zeros((B, c + t - 1, *Sl))
    mask = np.zeros((B, *Sl))
    for b in range(B):
        for r in itertools.product(*[range(n) for n in Sl]):
            cell = tuple(slice(ri * s, (ri + 1) * s) for ri, s in zip(r, strides, strict=True))
            ql = q[(b, slice(None), *cell)].reshape(t, -1).mean(1)
            Ml = M[(b, *cell)].min()
            yl = y[(b, *[ri * s + s // 2 for ri, s in zip(r, strides, strict=True)])]
            if yl > 0:
                out[(b, yl, *r)] = 1.0
                mask[(b, *r)] = 1.0
            else:
                out[(b, 0, *r)] = Ml * ql[0] + 1 - Ml
                for k in range(1, t):
                    out[(b, c - 1 + k, *r)] = Ml * ql[k]
                mask[(b, *r)] = Ml
    return out, mask


@pytest.mark.parametrize(
    "S,levels,pick",
    [((11, 13), [1, 2, (2, 4)], 2), ((7, 9, 10), [(1, 1, 1), (1, 2, 2), (3, 2, 4)], 2),
     ((9, 8, 7), 3, 1)],
)
def test_levels_vs_numpy_oracle(S, levels, pick):
    c, t = 3, 3
    o, y, d = make_inputs(2, t, c, S, torch.float64, seed=13)
    d = d.double()
    outs, masks = context_labels(o, y, d, c, levels=levels, return_mask=True)
    if isinstance(levels, int):
        stride = (2**pick,) * len(S)
    else:
        stride = levels[pick]
        stride = (stride,) * len(S) if isinstance(stride, int) else stride
    ref_out, ref_mask = _numpy_oracle(o, y, d, c, stride)
    np.testing.assert_allclose(outs[pick].numpy(), ref_out, atol=1e-12)
    np.testing.assert_allclose(masks[pick].numpy(), ref_mask, atol=1e-12)


@pytest.mark.parametrize("S", [(9, 11), (7, 6, 9)], ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_roi_voxels_keep_their_label_whatever_their_distance(S, dtype):
    """The mask is 1 and the label one-hot at ROI voxels even where d says far (an unsigned or
    another class's distance map): the numpy oracle and the twin agree with the kernel at full
    resolution and pooled."""
    c, t = 3, 3
    o, y, d = make_inputs(2, t, c, S, dtype, seed=21, far_roi=True)
    assert (d[y > 0] >= 30).all() and torch.isinf(d[y > 0]).any()
    o.requires_grad_(True)
    outs, masks = context_labels(o, y, d, c, levels=[1, 2], return_mask=True)
    assert (masks[0][y > 0] == 1).all()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for level, stride in enumerate([(1,) * len(S), (2,) * len(S)]):
        ref_out, ref_mask = _numpy_oracle(o.detach().to(acc), y, d.to(acc), c, stride)
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        np.testing.assert_allclose(outs[level].detach().numpy(), ref_out, atol=tol)
        np.testing.assert_allclose(masks[level].numpy(), ref_mask, atol=tol)
    rlabs, rmasks = context_labels_twin(o, y, d, c, levels=[1, 2], return_mask=True)
    grads = [torch.randn_like(a) for a in outs]
    (ga,) = torch.autograd.grad(outs, [o], grads)
    (gb,) = torch.autograd.grad(rlabs, [o], grads)
    for a, b in zip([*outs, *masks], [*rlabs, *rmasks], strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), **FP_TOL[dtype])
    tol = FP_TOL[dtype] if dtype != torch.float16 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(ga, gb, **tol)


def test_unused_level_gradient_and_determinism():
    o, y, d = make_inputs(2, 3, 2, (12, 12, 12), seed=17)
    o.requires_grad_(True)
    outs = context_labels(o, y, d, 2, levels=3)
    (ga,) = torch.autograd.grad(outs[1].pow(2).sum(), [o])
    ref = context_labels_twin(o, y, d, 2, levels=3)
    (gb,) = torch.autograd.grad(ref[1].pow(2).sum(), [o])
    torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-5)
    for _ in range(2):
        again = context_labels(o, y, d, 2, levels=3)
        for a, b in zip(outs, again, strict=True):
            assert torch.equal(a, b)
    # thread count does not change the result
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = context_labels(o, y, d, 2, levels=3)
    finally:
        torch.set_num_threads(n)
    for a, b in zip(outs, one, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_extremes(dtype):
    o, y, d = make_inputs(2, 3, 3, (6, 7, 9), seed=8)
    big = torch.finfo(dtype).max
    o = (o * 3e4).clamp(-big, big).to(dtype)
    o.view(-1)[:5] = torch.tensor([big, -big, 0.0, 6e-8, -6e-8]).to(dtype)
    o.requires_grad_(True)
    a = context_labels(o, y, d, 3, levels=2)
    b = context_labels_twin(o, y, d, 3, levels=2)
    grads = [torch.randn_like(x) for x in a]
    (ga,) = torch.autograd.grad(a, [o], grads)
    (gb,) = torch.autograd.grad(b, [o], grads)
    for x, z in zip(a, b, strict=True):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, z.detach(), atol=2e-6, rtol=2e-6)
    assert torch.isfinite(ga.float()).all()
    torch.testing.assert_close(ga.float(), gb.float(), atol=1e-2, rtol=1e-2)


def test_empty_batch():
    o = torch.zeros(0, 2, 4, 4)
    out = context_labels(o, torch.zeros(0, 4, 4, dtype=torch.long), torch.zeros(0, 4, 4), 2)
    assert out.shape == (0, 3, 4, 4)


def _good():
    return make_inputs(2, 2, 3, (6, 6, 6), seed=1)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(gen_logits=a["gen_logits"][:, :0]), ValueError, "gen_logits"),
        (lambda a: a.update(num_classes=1), ValueError, "num_classes"),
        (lambda a: a.update(num_classes=2.0), TypeError, "num_classes"),
        (lambda a: a.update(labels=a["labels"] + 3), ValueError, "labels"),
        (lambda a: a.update(labels=a["labels"] - 1), ValueError, "labels"),
        (lambda a: a.update(labels=a["labels"][:, :5]), ValueError, "labels"),
        (lambda a: a.update(distance=a["distance"][:1]), ValueError, "distance"),
        (lambda a: a.update(distance=a["distance"][0]), ValueError, "distance"),
        (lambda a: a.update(gen_logits=a["gen_logits"][0]), ValueError, "gen_logits"),
        (lambda a: a.update(gen_logits=a["gen_logits"].long()), TypeError, "gen_logits"),
        (lambda a: a.update(distance=a["distance"].long()), TypeError, "distance"),
        (lambda a: a.update(labels=a["labels"].float()), TypeError, "labels"),
        (lambda a: a.update(gen_logits=a["gen_logits"].numpy()), TypeError, "gen_logits"),
        (lambda a: a.update(margin=float("nan")), ValueError, "margin"),
        (lambda a: a.update(tau=0.0), ValueError, "tau"),
        (lambda a: a.update(tau=float("inf")), ValueError, "tau"),
        (lambda a: a.update(tau=1e-50), ValueError, r"tau must be > 0 in float32.*rounds to 0"),
        (lambda a: a.update(tau=np.True_), TypeError, "tau must be a real number"),
        (lambda a: a["distance"].view(-1).__setitem__(3, float("nan")), ValueError, "distance"),
        (lambda a: a.update(levels=0), ValueError, "levels"),
        (lambda a: a.update(levels=[2, 1]), ValueError, "levels"),
        (lambda a: a.update(levels=[2, 3]), ValueError, "levels"),
        (lambda a: a.update(levels=[(1, 1)]), ValueError, "levels"),
        (lambda a: a.update(levels=[8]), ValueError, "levels"),
        (lambda a: a.update(levels="2"), TypeError, "levels"),
        (lambda a: a.update(levels=[(1, 2.0, 2)]), TypeError, "levels"),
    ],
)
def test_bad_arguments(mutate, exc, match):
    o, y, d = _good()
    args = dict(gen_logits=o, labels=y, distance=d, num_classes=3)
    mutate(args)
    with pytest.raises(exc, match=match):
        context_labels(**args)


def test_numpy_scalars_for_margin_and_tau():
    o, y, d = _good()
    want = context_labels(o, y, d, 3, margin=12.5, tau=4.0, return_mask=True)
    got = context_labels(o, y, d, 3, margin=np.float32(12.5), tau=np.float64(4.0),
                         return_mask=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_validate_false_skips_data_checks():
    o, y, d = _good()
    d.view(-1)[0] = float("nan")
    out = context_labels(o, y, d, 3, validate=False)
    assert out.shape == (2, 4, 6, 6, 6)


def test_mixed_devices():
    o, y, d = _good()
    with pytest.raises(ValueError, match="device"):
        context_labels(o, y.to("meta"), d, 3)


def test_torch_compile_fullgraph():
    o, y, d = make_inputs(2, 2, 2, (8, 8), seed=4)
    o.requires_grad_(True)

    def f(x):
        outs = context_labels(x, y, d, 2, levels=2, validate=False)
        return outs[0].square().sum() + outs[1].sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    val = compiled(o)
    (g,) = torch.autograd.grad(val, [o])
    val_ref = f(o)
    (g_ref,) = torch.autograd.grad(val_ref, [o])
    torch.testing.assert_close(val, val_ref)
    torch.testing.assert_close(g, g_ref)


# ----------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_cuda_matches_twin_and_cpu(case, dtype):
    B, t, c, S, lev = case
    o, y, d = make_inputs(B, t, c, S, dtype, seed=21)
    oc, yc, dc = o.cuda().requires_grad_(True), y.cuda(), d.cuda()
    labs, masks = context_labels(oc, yc, dc, c, levels=lev, return_mask=True)
    rlabs, rmasks = context_labels_twin(oc, yc, dc, c, levels=lev, return_mask=True)
    clabs, cmasks = context_labels(o, y, d, c, levels=lev, return_mask=True)
    for a, b, cpu in zip(as_list(labs), as_list(rlabs), as_list(clabs), strict=True):
        torch.testing.assert_close(a, b.detach(), **FP_TOL[dtype])
        torch.testing.assert_close(a.cpu(), cpu, **FP_TOL[dtype])
    for a, b in zip(as_list(masks), as_list(rmasks), strict=True):
        torch.testing.assert_close(a, b, **FP_TOL[dtype])
    grads = [torch.randn_like(a) for a in as_list(labs)]
    (ga,) = torch.autograd.grad(as_list(labs), [oc], grads)
    (gb,) = torch.autograd.grad(as_list(rlabs), [oc], grads)
    o_cpu = o.clone().requires_grad_(True)
    (gcpu,) = torch.autograd.grad(
        as_list(context_labels(o_cpu, y, d, c, levels=lev)), [o_cpu], [g.cpu() for g in grads]
    )
    tol = FP_TOL[dtype] if dtype in (torch.float32, torch.float64) else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(ga, gb, **tol)
    torch.testing.assert_close(ga.cpu(), gcpu, **tol)


@pytest.mark.cuda
def test_cuda_fp16_extremes_and_determinism():
    B, t, c, S = 2, 3, 3, (16, 20, 36)
    o, y, d = make_inputs(B, t, c, S, torch.float32, seed=8)
    o = (o * 3e4).clamp(-65504, 65504).half()
    o.view(-1)[:5] = torch.tensor([65504.0, -65504.0, 0.0, 6e-8, -6e-8], dtype=torch.half)
    oc, yc, dc = o.cuda().requires_grad_(True), y.cuda(), d.cuda()
    first = context_labels(oc, yc, dc, c, levels=3)
    ref = context_labels_twin(oc, yc, dc, c, levels=3)
    for a, b in zip(first, ref, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b.detach(), atol=2e-6, rtol=2e-6)
    grads = [torch.randn_like(a) for a in first]
    (g1,) = torch.autograd.grad(first, [oc], grads)
    assert torch.isfinite(g1.float()).all()
    for _ in range(3):
        again = context_labels(oc, yc, dc, c, levels=3)
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)
        (g2,) = torch.autograd.grad(again, [oc], grads)
        assert torch.equal(g1, g2)


@pytest.mark.cuda
def test_cuda_large_t_and_big_strides_fall_back_or_run():
    # t beyond the register limit falls back to the twin; coarse strides use a large tile.
    o, y, d = make_inputs(1, 18, 2, (8, 9, 10), seed=9)
    a = context_labels(o.cuda(), y.cuda(), d.cuda(), 2, levels=2)
    for x, z in zip(a, context_labels(o, y, d, 2, levels=2), strict=True):
        torch.testing.assert_close(x.cpu(), z, **FP_TOL[torch.float32])
    o, y, d = make_inputs(1, 3, 2, (40, 36, 70), seed=10)
    a = context_labels(o.cuda(), y.cuda(), d.cuda(), 2, levels=[1, 2, 4, 8, (16, 16, 32)])
    b = context_labels(o, y, d, 2, levels=[1, 2, 4, 8, (16, 16, 32)])
    for x, z in zip(a, b, strict=True):
        torch.testing.assert_close(x.cpu(), z, **FP_TOL[torch.float32])


# Geometries of the coalesced tiled kernels: partial tiles along every axis, 2D tiles stacked
# along y, P1 x strides 1 / 2 / 4 (lane groups), level 0 pooled, anisotropic coarsest levels; and
# strides whose P1 x stride does not divide 32 (the older tiled kernels).
TILED_CASES = [
    (2, 2, 2, (20, 40, 70), 4),
    (1, 3, 3, (70, 100), 4),
    (2, 2, 2, (9, 37, 45), [1, 2, 4, (8, 8, 16)]),
    (1, 4, 2, (5, 24, 40), [1, (1, 2, 4), (1, 4, 8)]),
    (1, 2, 3, (12, 18, 66), [(1, 1, 1), (1, 1, 1), (3, 3, 3)]),
    (2, 2, 2, (10, 20, 36), [2, 4]),
    (1, 2, 2, (9, 21, 50), [1, (1, 1, 3), (2, 2, 6)]),
]


@pytest.mark.cuda
@pytest.mark.parametrize("case", TILED_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_cuda_tiled_geometries(case, dtype):
    B, t, c, S, lev = case
    o, y, d = make_inputs(B, t, c, S, dtype, seed=31)
    oc, yc, dc = o.cuda().requires_grad_(True), y.cuda(), d.cuda()
    labs, masks = context_labels(oc, yc, dc, c, levels=lev, return_mask=True)
    rlabs, rmasks = context_labels_twin(oc, yc, dc, c, levels=lev, return_mask=True)
    for a, b in zip(as_list(labs), as_list(rlabs), strict=True):
        torch.testing.assert_close(a, b.detach(), **FP_TOL[dtype])
    for a, b in zip(as_list(masks), as_list(rmasks), strict=True):
        torch.testing.assert_close(a, b, **FP_TOL[dtype])
    tol = FP_TOL[dtype] if dtype in (torch.float32, torch.float64) else dict(atol=1e-2, rtol=1e-2)
    grads = [torch.randn_like(a) for a in as_list(labs)]
    (ga,) = torch.autograd.grad(as_list(labs), [oc], grads)
    (gb,) = torch.autograd.grad(as_list(rlabs), [oc], grads)
    torch.testing.assert_close(ga, gb, **tol)
    # Only some levels used: the unused ones' gradients arrive as None.
    for keep in ([0], [len(grads) - 1], list(range(1, len(grads)))):
        labs = as_list(context_labels(oc, yc, dc, c, levels=lev))
        rlabs = as_list(context_labels_twin(oc, yc, dc, c, levels=lev))
        (ga,) = torch.autograd.grad([labs[i] for i in keep], [oc], [grads[i] for i in keep])
        (gb,) = torch.autograd.grad([rlabs[i] for i in keep], [oc], [grads[i] for i in keep])
        torch.testing.assert_close(ga, gb, **tol)
    # Deterministic run to run.
    again = as_list(context_labels(oc, yc, dc, c, levels=lev))
    for a, b in zip(as_list(context_labels(oc, yc, dc, c, levels=lev)), again, strict=True):
        assert torch.equal(a, b)

"""colabx.dice_ce_loss / colabx.roi_bce_loss vs the pure-PyTorch twin, independent oracles,
gradcheck, argument errors, torch.compile, and (marked cuda) the CUDA kernels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import colabx
from colabx.twins import dice_ce_loss as ref
from colabx.twins import roi_bce_loss as bce_ref

TOL = {
    torch.float32: dict(rtol=2e-5, atol=1e-7),
    torch.float64: dict(rtol=1e-10, atol=1e-14),
    torch.float16: dict(rtol=2e-3, atol=1e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=1e-5),
}
# gradients are compared after dividing by their max magnitude (cancellation noise near zero)
GTOL = {
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.float64: dict(rtol=1e-10, atol=1e-13),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def _soft(shape, dtype=torch.float32, device="cpu", gen=None):
    return torch.softmax(2 * torch.randn(shape, generator=gen, dtype=torch.float64), 1).to(
        device=device, dtype=dtype)


def _run(fn, logits, targets, **kw):
    """Loss and grads (w.r.t. logits and soft targets) of fn on fresh leaf copies."""
    zs = [z.detach().clone().requires_grad_() for z in logits]
    ts = [t.detach().clone().requires_grad_() if t.dtype.is_floating_point else t for t in targets]
    loss = fn(zs, ts, **kw)
    wrt = zs + [t for t in ts if t.requires_grad]
    grads = torch.autograd.grad(loss, wrt)
    return loss.detach(), list(grads)


def _compare(logits, targets, tol_dtype, **kw):
    lo, go = _run(colabx.dice_ce_loss, logits, targets, **kw)
    lr, gr = _run(ref.dice_ce_loss, logits, targets, **kw)
    assert lo.dtype == lr.dtype
    torch.testing.assert_close(lo, lr, **TOL[tol_dtype])
    for a, b in zip(go, gr, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        scale = b.abs().max().clamp_min(1e-30)
        torch.testing.assert_close(a / scale, b / scale, **GTOL[tol_dtype])
    return lo, go


CASES = [  # (B, K, spatial)
    (1, 2, (5, 7)),
    (2, 3, (9, 13)),
    (3, 4, (3, 5, 7)),
    (2, 5, (6, 5, 9)),
    (1, 7, (4, 11, 3)),
    (2, 6, (33, 65)),  # several tiles, odd sizes
]


@pytest.mark.parametrize("b,k,spatial", CASES)
@pytest.mark.parametrize("hard", [False, True])
def test_single_level_vs_twin_fp32(b, k, spatial, hard):
    g = torch.Generator().manual_seed(b * 100 + k)
    z = 3 * torch.randn((b, k, *spatial), generator=g)
    t = (torch.randint(0, k, (b, *spatial), generator=g) if hard
         else _soft((b, k, *spatial), gen=g))
    _compare([z], [t], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_vs_twin(dtype):
    g = torch.Generator().manual_seed(1)
    z = (2 * torch.randn((2, 3, 7, 6, 5), generator=g)).to(dtype)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    t = _soft((2, 3, 7, 6, 5), dtype=cdt, gen=g)
    loss, grads = _compare([z], [t], dtype)
    assert loss.dtype == cdt and grads[0].dtype == dtype and grads[1].dtype == cdt


def test_bf16_targets_cast_and_grad_dtype():
    z = torch.randn(2, 3, 8, 9).bfloat16().requires_grad_()
    t = _soft((2, 3, 8, 9), dtype=torch.bfloat16).requires_grad_()
    colabx.dice_ce_loss(z, t).backward()
    assert z.grad.dtype == torch.bfloat16 and t.grad.dtype == torch.bfloat16
    z2, t2 = z.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    ref.dice_ce_loss(z2, t2).backward()
    torch.testing.assert_close(t.grad.float(), t2.grad.float(), rtol=1e-2, atol=1e-6)


def test_hard_equals_onehot_soft():
    z = torch.randn(2, 4, 6, 7, 5)
    lab = torch.randint(0, 4, (2, 6, 7, 5))
    soft = torch.nn.functional.one_hot(lab, 4).movedim(-1, 1).float()
    zh = z.clone().requires_grad_()
    zs = z.clone().requires_grad_()
    lh = colabx.dice_ce_loss(zh, lab)
    ls = colabx.dice_ce_loss(zs, soft)
    torch.testing.assert_close(lh, ls, rtol=1e-6, atol=1e-7)
    lh.backward()
    ls.backward()
    torch.testing.assert_close(zh.grad, zs.grad, rtol=1e-6, atol=1e-10)
    # [B, 1, *S] labels and every integer dtype give the same loss
    for lab2 in (lab[:, None], lab.int(), lab.to(torch.uint8)):
        torch.testing.assert_close(colabx.dice_ce_loss(z, lab2), lh.detach())




@pytest.mark.parametrize("b,spatial", [(1, (1, 4, 5)), (2, (1, 6, 3)), (1, (1, 7)), (2, (1, 9))])
@pytest.mark.parametrize("channel_axis", [False, True])
def test_hard_labels_with_first_spatial_size_one(b, spatial, channel_axis):
    """A depth (3D) or height (2D) of 1 is a spatial axis, not the labels' channel axis: the
    op, its twin and the one-hot soft targets agree, for both losses."""
    gen = torch.Generator().manual_seed(len(spatial) * 10 + b)
    z = torch.randn((b, 3, *spatial), generator=gen)
    lab = torch.randint(0, 3, (b, *spatial), generator=gen)
    onehot = torch.nn.functional.one_hot(lab, 3).movedim(-1, 1).float()
    hard = lab[:, None] if channel_axis else lab
    for op, twin, kw in ((colabx.dice_ce_loss, ref.dice_ce_loss, {}),
                         (colabx.roi_bce_loss, bce_ref.roi_bce_loss, {"roi_channels": [1, 2]})):
        expected = twin(z, onehot, **kw)
        torch.testing.assert_close(op(z, hard, **kw), expected, rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(twin(z, hard, **kw), expected, rtol=1e-7, atol=0.0)
@pytest.mark.parametrize("weights", [None, [0.5, 0.3, 0.2], [1.0, 0.0, 2.0]])
@pytest.mark.parametrize("channels", [None, [0, 2], [3]])
def test_deep_supervision_levels(weights, channels):
    g = torch.Generator().manual_seed(7)
    shapes = [(2, 4, 16, 12, 10), (2, 4, 8, 6, 5), (2, 4, 4, 3, 3)]
    zs = [torch.randn(s, generator=g) for s in shapes]
    ts = [_soft(shapes[0], gen=g), torch.randint(0, 4, (2, 8, 6, 5), generator=g),
          _soft(shapes[2], gen=g)]
    _compare(zs, ts, torch.float32, level_weights=weights, dice_channels=channels)


# Default deep-supervision weights, written out: 1/2^i with the coarsest level 0, over their sum.
EXPECTED_LEVEL_WEIGHTS = {
    1: [1.0],
    2: [1.0, 0.0],
    3: [1 / 1.5, 0.5 / 1.5, 0.0],
    4: [1 / 1.75, 0.5 / 1.75, 0.25 / 1.75, 0.0],
    5: [1 / 1.875, 0.5 / 1.875, 0.25 / 1.875, 0.125 / 1.875, 0.0],
    6: [1 / 1.9375, 0.5 / 1.9375, 0.25 / 1.9375, 0.125 / 1.9375, 0.0625 / 1.9375, 0.0],
}


@pytest.mark.parametrize("n", sorted(EXPECTED_LEVEL_WEIGHTS))
def test_default_level_weights(n):
    want = EXPECTED_LEVEL_WEIGHTS[n]
    assert ref.default_level_weights(n) == pytest.approx(want, rel=1e-15, abs=0)
    assert list(ref.LEVEL_WEIGHTS[n]) == pytest.approx(want, rel=1e-15, abs=0)
    # the fused op's and the twin's default weighting, against the levels weighted by hand
    g = torch.Generator().manual_seed(30 + n)
    sizes = [(2 ** (n - i), 2 ** (n - i) + 1) for i in range(n)]
    zs = [torch.randn(2, 3, *s, generator=g, dtype=torch.float64) for s in sizes]
    ts = [_soft((2, 3, *s), dtype=torch.float64, gen=g) for s in sizes]
    terms = [ref.dice_ce_level(z, t, [1, 2]) for z, t in zip(zs, ts, strict=True)]
    expect = sum(w * term for w, term in zip(want, terms, strict=True))
    torch.testing.assert_close(colabx.dice_ce_loss(zs, ts), expect, rtol=1e-12, atol=0)
    torch.testing.assert_close(ref.dice_ce_loss(zs, ts), expect, rtol=1e-13, atol=0)


def test_twin_level_weights_are_the_rule_up_to_eight_levels():
    for n, w in ref.LEVEL_WEIGHTS.items():
        assert list(w) == pytest.approx(ref.default_level_weights(n), rel=1e-15, abs=0)
    with pytest.raises(ValueError, match="no default level weights for 9 levels"):
        ref.dice_ce_loss([torch.randn(1, 2, 2, 2)] * 9,
                         [torch.zeros(1, 2, 2, dtype=torch.long)] * 9)


def _oracle_f64(z, y, channels, smooth=1e-5):
    """Independent float64 recomputation with explicit loops over (b, channel)."""
    z, y = z.double(), y.double()
    b, k = z.shape[:2]
    zf, yf = z.reshape(b, k, -1), y.reshape(b, k, -1)
    p = torch.exp(zf - zf.max(1, keepdim=True).values)
    p = p / p.sum(1, keepdim=True)
    ce = -(yf * torch.log(p + 1e-32)).sum() / (b * zf.shape[2])
    ratios = []
    for bi in range(b):
        for j in channels:
            tp = float((p[bi, j] * yf[bi, j]).sum())
            fp = float((p[bi, j] * (1 - yf[bi, j])).sum())
            fn = float(((1 - p[bi, j]) * yf[bi, j]).sum())
            ratios.append((2 * tp + smooth) / (2 * tp + fp + fn + smooth))
    return float(ce) - sum(ratios) / len(ratios)


@pytest.mark.parametrize("shape", [(2, 3, 40, 41, 17), (3, 5, 129, 67)])
def test_float64_oracle_fp32_inputs(shape):
    g = torch.Generator().manual_seed(3)
    z = 4 * torch.randn(shape, generator=g)
    y = _soft(shape, gen=g)
    got = float(colabx.dice_ce_loss(z, y, dice_channels=[0, 1, 2]))
    want = _oracle_f64(z, y, [0, 1, 2])
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_gradcheck_float64_logits_and_targets():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g).requires_grad_()
    y = _soft((2, 3, 4, 5), dtype=torch.float64, gen=g).requires_grad_()
    z2 = torch.randn(2, 3, 2, 3, dtype=torch.float64, generator=g).requires_grad_()
    lab = torch.randint(0, 3, (2, 2, 3), generator=g)

    def f(a, b, c):
        return colabx.dice_ce_loss([a, c], [b, lab], dice_channels=[0, 2], level_weights=[1, 0.5])

    assert torch.autograd.gradcheck(f, (z, y, z2), eps=1e-6, atol=1e-8)
    z3 = torch.randn(1, 4, 3, 3, 2, dtype=torch.float64, generator=g).requires_grad_()
    y3 = _soft((1, 4, 3, 3, 2), dtype=torch.float64, gen=g).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: colabx.dice_ce_loss(a, b), (z3, y3))


@pytest.mark.parametrize("mag", [1e4, 6e4])
def test_fp16_extreme_logits_finite(mag):
    g = torch.Generator().manual_seed(11)
    z = (mag * torch.randn(2, 3, 9, 8, 7, generator=g).sign()).half().requires_grad_()
    y = _soft((2, 3, 9, 8, 7), gen=g).requires_grad_()
    loss = colabx.dice_ce_loss(z, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all() and torch.isfinite(y.grad).all()
    _compare([z.detach()], [y.detach()], torch.float16)
    lab = torch.randint(0, 3, (2, 9, 8, 7), generator=g)
    zb = z.detach().clone().requires_grad_()
    lb = colabx.roi_bce_loss(zb, lab, [1, 2])
    lb.backward()
    assert torch.isfinite(lb) and torch.isfinite(zb.grad).all()


def test_non_contiguous_inputs():
    base = torch.randn(2, 5, 12, 10, 3)
    z = base.permute(0, 1, 4, 3, 2)[:, 1:4]  # [2, 3, 3, 10, 12], non-contiguous
    assert not z.is_contiguous()
    y = _soft((2, 3, 12, 10, 3)).permute(0, 1, 4, 3, 2)
    _compare([z], [y], torch.float32)
    lab = torch.randint(0, 3, (2, 10, 12)).transpose(1, 2)
    _compare([torch.randn(2, 3, 10, 12).transpose(2, 3)], [lab], torch.float32)


def test_targets_without_grad_and_compiled_path_agree():
    """The eager calls (∂targets skipped when not needed) == the same autograd Function under
    torch.compile, where it reaches the kernels through the kernel-only custom ops."""
    z = torch.randn(2, 3, 9, 10, 11)
    y = _soft((2, 3, 9, 10, 11))
    za = z.clone().requires_grad_()
    la = colabx.dice_ce_loss(za, y)  # y does not require grad
    la.backward()
    zb, yb = z.clone().requires_grad_(), y.clone().requires_grad_()
    compiled = torch.compile(colabx.dice_ce_loss, backend="aot_eager", fullgraph=True)
    lb = compiled(zb, yb)
    lb.backward()
    assert yb.grad is not None
    assert torch.equal(la, lb) and torch.equal(za.grad, zb.grad)
    lab = torch.randint(0, 3, (2, 9, 10, 11))
    zc, zd = z.clone().requires_grad_(), z.clone().requires_grad_()
    colabx.roi_bce_loss(zc, lab, [1]).backward()
    bce = torch.compile(lambda z_, y_: colabx.roi_bce_loss(z_, y_, [1], validate=False),
                        backend="aot_eager", fullgraph=True)
    bce(zd, lab).backward()
    assert torch.equal(zc.grad, zd.grad)


def test_thread_count_does_not_change_result():
    z = torch.randn(2, 3, 40, 40, 20)
    y = _soft((2, 3, 40, 40, 20))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = colabx.dice_ce_loss(z, y)
        torch.set_num_threads(2)
        b = colabx.dice_ce_loss(z, y)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, b)


# ---- roi_bce_loss ----

@pytest.mark.parametrize("b,k,spatial", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_roi_bce_vs_twin(b, k, spatial, dtype):
    g = torch.Generator().manual_seed(k + 17)
    z = (3 * torch.randn((b, k, *spatial), generator=g)).to(dtype)
    lab = torch.randint(0, k, (b, *spatial), generator=g)
    roi = list(range(1, k)) if k < 4 else [1, k - 1]
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    la, lb = colabx.roi_bce_loss(za, lab, roi), bce_ref.roi_bce_loss(zb, lab, roi)
    torch.testing.assert_close(la, lb, **TOL[dtype])
    la.backward()
    lb.backward()
    s = zb.grad.abs().max().float()
    torch.testing.assert_close(za.grad.float() / s, zb.grad.float() / s, **GTOL[dtype])


def test_roi_bce_independent_oracle_and_gradcheck():
    z = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    lab = torch.randint(0, 3, (2, 5, 6))
    p = torch.softmax(z, 1)
    want = 0.0
    for j in (1, 2):
        y = (lab == j).double()
        pj = p[:, j]
        want -= float((y * torch.log(pj + 1e-6) + (1 - y) * torch.log(1 - pj + 1e-6)).sum())
    want /= 2 * 30
    assert float(colabx.roi_bce_loss(z, lab, [1, 2])) == pytest.approx(want, rel=1e-12)
    zg = z.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: colabx.roi_bce_loss(a, lab[:, None], [2, 0]), (zg,))


# ---- errors ----

def test_errors():
    z = torch.randn(2, 3, 4, 5)
    y = _soft((2, 3, 4, 5))
    lab = torch.randint(0, 3, (2, 4, 5))
    with pytest.raises(ValueError, match=r"targets.*\(2, 3, 4, 6\).*logits.*\(2, 3, 4, 5\)"):
        colabx.dice_ce_loss(z, _soft((2, 3, 4, 6)))
    with pytest.raises(ValueError, match="number of levels"):
        colabx.dice_ce_loss([z, z], [y])
    with pytest.raises(ValueError, match="logits must have 4 or 5 dimensions"):
        colabx.dice_ce_loss(z[0], y[0])
    with pytest.raises(ValueError, match="K >= 2"):
        colabx.dice_ce_loss(z[:, :1], y[:, :1])
    with pytest.raises(ValueError, match="logits must not be empty"):
        colabx.dice_ce_loss(z[:, :, :0], y[:, :, :0])
    with pytest.raises(ValueError, match=r"targets values must be in 0\.\.2"):
        colabx.dice_ce_loss(z, lab + 1)
    with pytest.raises(ValueError, match="targets values"):
        colabx.dice_ce_loss(z, lab - 1)
    colabx.dice_ce_loss(z, lab, validate=True)
    with pytest.raises(ValueError, match="dice_channels entry 3 is out of range"):
        colabx.dice_ce_loss(z, y, dice_channels=[1, 3])
    with pytest.raises(ValueError, match="dice_channels contains duplicate"):
        colabx.dice_ce_loss(z, y, dice_channels=[1, 1])
    with pytest.raises(TypeError, match="dice_channels"):
        colabx.dice_ce_loss(z, y, dice_channels=[1.0])
    with pytest.raises(TypeError, match=r"targets must be soft targets \(float32, .*\) or integer "
                                        r"labels \(.*\), got torch.complex64"):
        colabx.dice_ce_loss(z, y.to(torch.complex64))
    with pytest.raises(TypeError, match="roi_channels must be a sequence of ints, got Tensor"):
        colabx.roi_bce_loss(z, lab, torch.tensor(1))
    # channel lists as NumPy arrays or tensors are sequences too
    for channels in (np.array([1, 2]), torch.tensor([1, 2])):
        assert colabx.dice_ce_loss(z, y, dice_channels=channels) == \
            colabx.dice_ce_loss(z, y, dice_channels=[1, 2])
        assert colabx.roi_bce_loss(z, lab, channels) == colabx.roi_bce_loss(z, lab, [1, 2])
    with pytest.raises(ValueError, match="level_weights has 2 entries"):
        colabx.dice_ce_loss(z, y, level_weights=[1, 2])
    with pytest.raises(ValueError, match="level_weights must be finite and >= 0"):
        colabx.dice_ce_loss(z, y, level_weights=[-1])
    with pytest.raises(ValueError, match="level_weights must not all be zero"):
        colabx.dice_ce_loss(z, y, level_weights=[0])
    with pytest.raises(ValueError, match="smooth"):
        colabx.dice_ce_loss(z, y, smooth=0)
    with pytest.raises(TypeError, match="smooth"):
        colabx.dice_ce_loss(z, y, smooth="1")
    with pytest.raises(TypeError, match="logits must be float32"):
        colabx.dice_ce_loss(z.int(), y)
    with pytest.raises(TypeError, match=r"targets\[1\] must be soft targets .* or integer labels"):
        colabx.dice_ce_loss([z, z], [y, torch.zeros(2, 4, 5, dtype=torch.complex64)])
    with pytest.raises(TypeError, match=r"logits\[1\] has dtype"):
        colabx.dice_ce_loss([z, z.double()], [y, y])
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        colabx.dice_ce_loss("z", y)
    with pytest.raises(ValueError, match="one device"):
        colabx.dice_ce_loss(z, y.to("meta"))
    # roi_bce_loss
    with pytest.raises(ValueError, match="roi_channels entry 5"):
        colabx.roi_bce_loss(z, lab, [5])
    with pytest.raises(ValueError, match="roi_channels contains duplicate"):
        colabx.roi_bce_loss(z, lab, [1, 1])
    with pytest.raises(ValueError, match="roi_channels must name at least one"):
        colabx.roi_bce_loss(z, lab, [])
    with pytest.raises(ValueError, match=r"labels has shape \(2, 4, 4\)"):
        colabx.roi_bce_loss(z, lab[:, :, :4], [1])
    with pytest.raises(TypeError, match="labels must be an integer"):
        colabx.roi_bce_loss(z, y, [1])
    with pytest.raises(ValueError, match="labels values"):
        colabx.roi_bce_loss(z, lab + 3, [1])


def test_torch_compile_fullgraph():
    def f(z, y, lab):
        return colabx.dice_ce_loss(z, y) + colabx.roi_bce_loss(z, lab, [1, 2], validate=False)

    z = torch.randn(2, 3, 6, 7, requires_grad=True)
    y = _soft((2, 3, 6, 7)).requires_grad_()
    lab = torch.randint(0, 3, (2, 6, 7))
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = cf(z, y, lab)
    out.backward()
    z2, y2 = z.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    want = ref.dice_ce_loss(z2, y2) + bce_ref.roi_bce_loss(z2, lab, [1, 2])
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(y.grad, y2.grad, rtol=1e-5, atol=1e-9)


def test_opcheck():
    z = torch.randn(2, 3, 4, 5)
    y = _soft((2, 3, 4, 5))
    op = torch.ops.colabx.dice_ce_loss_fwd.default
    torch.library.opcheck(op, ([z], [y], [1, 2], [1.0], 1e-5))
    loss, stats = op([z], [y], [1, 2], [1.0], 1e-5)
    grad = torch.ones_like(loss)
    torch.library.opcheck(torch.ops.colabx.dice_ce_loss_bwd.default,
                          (grad, [z], [y], stats, [1, 2], [1.0], 1e-5, True))
    lab = torch.randint(0, 3, (2, 4, 5))
    torch.library.opcheck(torch.ops.colabx.roi_bce_loss_fwd.default, (z, lab, [1]))
    torch.library.opcheck(torch.ops.colabx.roi_bce_loss_bwd.default, (grad, z, lab, [1]))


# ---- CUDA ----

def _cuda_pair(fn, logits, targets, **kw):
    lo, go = _run(fn, [z.cuda() for z in logits], [t.cuda() for t in targets], **kw)
    return lo.cpu(), [g.cpu() for g in go]


# within the kernels' limits (K <= 16): beyond them colabx runs the twin (next test)
CUDA_CASES = CASES + [(2, 3, (80, 80, 80)), (1, 12, (17, 9, 5)), (2, 16, (9, 7))]


@pytest.mark.cuda
def test_cuda_beyond_the_kernel_limits_runs_the_twin(monkeypatch):
    """K = 20 > 16 channels, 17 > 16 levels: the GPU twin's results, without entering the
    kernels; and the CPU kernels' within fp32 rounding of log(1 - p + 1e-6) near p = 1."""
    from colabx.ops import dice_ce_loss as dce_op
    from colabx.ops import roi_bce_loss as bce_op

    def no_kernels(*args, **kwargs):
        raise AssertionError("the CUDA kernels were entered beyond their limits")

    monkeypatch.setattr(dce_op, "_forward_kernels", no_kernels)
    monkeypatch.setattr(bce_op, "_forward_kernels", no_kernels)
    g = torch.Generator().manual_seed(20)
    for zs in ([3 * torch.randn((2, 20, 9, 7), generator=g)],
               [torch.randn((1, 3, 4, 3), generator=g) for _ in range(17)]):
        ts = [_soft(tuple(z.shape), gen=g) for z in zs]
        kw = {} if len(zs) == 1 else dict(level_weights=[1.0] * 17)
        lc, gc = _cuda_pair(colabx.dice_ce_loss, zs, ts, **kw)
        lr, gr = _cuda_pair(ref.dice_ce_loss, zs, ts, **kw)
        assert torch.equal(lc, lr) and all(torch.equal(a, b) for a, b in zip(gc, gr, strict=True))
    z = 3 * torch.randn((2, 20, 9, 7), generator=g)
    lab = torch.randint(0, 20, (2, 9, 7), generator=g)
    roi = list(range(1, 20))
    zc, zt = z.cuda().requires_grad_(), z.cuda().requires_grad_()
    colabx.roi_bce_loss(zc, lab.cuda(), roi).backward()
    bce_ref.roi_bce_loss(zt, lab.cuda(), roi).backward()
    assert torch.equal(zc.grad, zt.grad)
    monkeypatch.undo()
    zp = z.clone().requires_grad_()
    colabx.roi_bce_loss(zp, lab, roi).backward()
    s = zp.grad.abs().max()
    torch.testing.assert_close(zc.grad.cpu() / s, zp.grad / s, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("b,k,spatial", CUDA_CASES)
@pytest.mark.parametrize("hard", [False, True])
def test_cuda_vs_twin_and_cpu(b, k, spatial, hard):
    g = torch.Generator().manual_seed(b * 10 + k)
    z = 3 * torch.randn((b, k, *spatial), generator=g)
    t = (torch.randint(0, k, (b, *spatial), generator=g) if hard
         else _soft((b, k, *spatial), gen=g))
    lc, gc = _cuda_pair(colabx.dice_ce_loss, [z], [t])
    lr, gr = _cuda_pair(ref.dice_ce_loss, [z], [t])
    lp, gp = _run(colabx.dice_ce_loss, [z], [t])
    for want in ((lr, gr), (lp, gp)):
        torch.testing.assert_close(lc, want[0], rtol=2e-5, atol=1e-7)
        for a, w in zip(gc, want[1], strict=True):
            s = w.abs().max()
            torch.testing.assert_close(a / s, w / s, **GTOL[torch.float32])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("spatial", [(7, 6, 5), (33, 64)])
@pytest.mark.parametrize("k", [2, 3, 4])  # the kernels' exact-K buckets
def test_cuda_dtypes_and_levels(dtype, spatial, k):
    g = torch.Generator().manual_seed(2)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    z = [(2 * torch.randn((2, k, *spatial), generator=g)).to(dtype),
         torch.randn((2, k, *[max(1, s // 2) for s in spatial]), generator=g).to(dtype)]
    t = [_soft(tuple(z[0].shape), dtype=cdt, gen=g),
         torch.randint(0, k, (2, *z[1].shape[2:]), generator=g)]
    kw = dict(level_weights=[0.7, 0.3], dice_channels=[0, k - 1])
    lc, gc = _cuda_pair(colabx.dice_ce_loss, z, t, **kw)
    lr, gr = _run(ref.dice_ce_loss, z, t, **kw)
    torch.testing.assert_close(lc, lr, **TOL[dtype])
    for a, w in zip(gc, gr, strict=True):
        s = w.abs().max()
        torch.testing.assert_close(a / s, w / s, **GTOL[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("k", [3, 6])
def test_cuda_levels_in_one_launch_vs_twin_and_cpu(k, hard):
    """Four levels with one target dtype (one launch per direction, the trainer's case), at the
    sizes of a 3D U-Net's outputs: coarse levels of a few tiles beside a level of hundreds."""
    g = torch.Generator().manual_seed(40 + k)
    sizes = [(48, 40, 33), (24, 20, 17), (12, 10, 9), (6, 5, 5)]
    z = [3 * torch.randn((2, k, *s), generator=g) for s in sizes]
    t = [torch.randint(0, k, (2, *s), generator=g) if hard else _soft((2, k, *s), gen=g)
         for s in sizes]
    kw = dict(level_weights=[0.4, 0.3, 0.2, 0.1])  # no zero weight: every gradient is tested
    lc, gc = _cuda_pair(colabx.dice_ce_loss, z, t, **kw)
    for want in (_run(ref.dice_ce_loss, z, t, **kw), _run(colabx.dice_ce_loss, z, t, **kw)):
        torch.testing.assert_close(lc, want[0], rtol=2e-5, atol=1e-7)
        for a, w in zip(gc, want[1], strict=True):
            s = w.abs().max()
            torch.testing.assert_close(a / s, w / s, **GTOL[torch.float32])


@pytest.mark.cuda
@pytest.mark.parametrize("k", [3, 7, 16])
@pytest.mark.parametrize("hard", [False, True])
def test_cuda_wide_logit_range_vs_twin_and_cpu(k, hard):
    """Logit gaps of ~0..150 put p on both sides of 2^-80, where the fp32 CUDA kernels switch
    between log-softmax and the exact log(p + 1e-32) (CE term and ∂ŷ)."""
    g = torch.Generator().manual_seed(100 + k)
    shape = (2, k, 23, 19, 7)
    z = 25 * torch.randn(shape, generator=g)
    t = (torch.randint(0, k, (2, *shape[2:]), generator=g) if hard else _soft(shape, gen=g))
    lc, gc = _cuda_pair(colabx.dice_ce_loss, [z], [t])
    lr, gr = _run(ref.dice_ce_loss, [z], [t])
    lp, gp = _run(colabx.dice_ce_loss, [z], [t])
    for want in ((lr, gr), (lp, gp)):
        torch.testing.assert_close(lc, want[0], rtol=2e-5, atol=1e-7)
        for a, w in zip(gc, want[1], strict=True):
            s = w.abs().max()
            torch.testing.assert_close(a / s, w / s, **GTOL[torch.float32])


@pytest.mark.cuda
@pytest.mark.parametrize("mag", [1e4, 6e4])
def test_cuda_fp16_extremes(mag):
    z = (mag * torch.randn(2, 3, 17, 9, 8).sign()).half().cuda()
    z.requires_grad_()
    y = _soft((2, 3, 17, 9, 8), device="cuda").requires_grad_()
    loss = colabx.dice_ce_loss(z, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all() and torch.isfinite(y.grad).all()
    lab = torch.randint(0, 3, (2, 17, 9, 8), device="cuda")
    zb = z.detach().clone().requires_grad_()
    lb = colabx.roi_bce_loss(zb, lab, [1, 2])
    lb.backward()
    assert torch.isfinite(lb) and torch.isfinite(zb.grad).all()


@pytest.mark.cuda
def test_cuda_determinism():
    z = torch.randn(2, 3, 80, 80, 80, device="cuda")
    y = _soft((2, 3, 80, 80, 80), device="cuda")
    lab = torch.randint(0, 3, (2, 80, 80, 80), device="cuda")
    outs = []
    for _ in range(3):
        zz, yy = z.clone().requires_grad_(), y.clone().requires_grad_()
        loss = colabx.dice_ce_loss(zz, yy)
        loss.backward()
        zb = z.clone().requires_grad_()
        lb = colabx.roi_bce_loss(zb, lab, [1, 2])
        lb.backward()
        outs.append((loss.detach(), zz.grad, yy.grad, lb.detach(), zb.grad))
    for o in outs[1:]:
        for a, b in zip(outs[0], o, strict=True):
            assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("k,side", [(3, 160), (16, 128)])
def test_cuda_sums_hold_when_blocks_walk_many_tiles(k, side):
    # One item of 2-4M voxels: every block of the grid-stride forward walks tens of tiles
    # (K = 16 fits one block per SM). Near-uniform logits make each Σp a long sum of nearly
    # equal terms, where long running fp32 sums drift; the kernels flush to float64 every 16
    # voxels per thread, so the loss matches the float64 twin at fp32 tolerance. The logit
    # gradient p_k (g_k - Σ_j p_j g_j) cancels to ~1e-3 of its terms here, so per-voxel fp32
    # rounding alone costs the float32 twin 1.5e-5 of max|grad| at K = 16 (the CPU kernel the
    # same): the gradients must stay within twice the float32 twin's own error (a relative
    # drift of 1e-6 in a sum would cost ~1e-4).
    g = torch.Generator().manual_seed(7)
    shape = (1, k, side, side, side)
    z = 1e-3 * torch.randn(shape, generator=g)
    y = torch.softmax(1e-3 * torch.randn(shape, generator=g), 1)
    zc, yc = z.cuda().requires_grad_(), y.cuda().requires_grad_()
    loss = colabx.dice_ce_loss(zc, yc)
    loss.backward()
    z32, y32 = z.cuda().requires_grad_(), y.cuda().requires_grad_()
    ref.dice_ce_loss(z32, y32).backward()
    zd, yd = z.double().requires_grad_(), y.double().requires_grad_()
    want = ref.dice_ce_loss(zd, yd)
    want.backward()
    torch.testing.assert_close(loss.double().cpu(), want.detach(), rtol=2e-5, atol=1e-7)
    for got, fp32, exp in ((zc.grad, z32.grad, zd.grad), (yc.grad, y32.grad, yd.grad)):
        s = exp.abs().max()
        err = float(((got.double().cpu() - exp) / s).abs().max())
        fp32_err = float(((fp32.double().cpu() - exp) / s).abs().max())
        assert err <= max(GTOL[torch.float32]["atol"], 2 * fp32_err), (err, fp32_err)
    lab = y.argmax(1).cuda()
    lb = colabx.roi_bce_loss(z.cuda(), lab, list(range(1, k)))
    torch.testing.assert_close(lb.double().cpu(), bce_ref.roi_bce_loss(z.double(), lab.cpu(),
                                                                    list(range(1, k))),
                               rtol=2e-5, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.parametrize("b,k,spatial", CASES + [(2, 16, (9, 7))])
def test_cuda_roi_bce(b, k, spatial):
    z = 3 * torch.randn((b, k, *spatial))
    lab = torch.randint(0, k, (b, *spatial))
    roi = list(range(1, k))
    zc = z.cuda().requires_grad_()
    lc = colabx.roi_bce_loss(zc, lab.cuda(), roi)
    lc.backward()
    zr = z.clone().requires_grad_()
    lr = bce_ref.roi_bce_loss(zr, lab, roi)
    lr.backward()
    torch.testing.assert_close(lc.cpu(), lr, rtol=2e-5, atol=1e-7)
    s = zr.grad.abs().max()
    torch.testing.assert_close(zc.grad.cpu() / s, zr.grad / s, **GTOL[torch.float32])


def test_math_constants_sane():
    # the twin's default smooth and eps match docs/design.md
    assert ref.CE_EPS == 1e-32 and bce_ref.BCE_EPS == 1e-6
    assert math.isclose(sum(ref.default_level_weights(5)), 1.0)

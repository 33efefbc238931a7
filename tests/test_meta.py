"""CoLab meta step: colabx.method.meta_step against the pure-PyTorch oracles of colabx.twins.meta
(CPU)."""

import copy

import pytest
import torch

import colabx.method.meta_step as cmeta
from colabx import distance_transform
from colabx.method.meta_step import MetaConfig, MetaStep, UpdateCounter
from colabx.models import UNet, task_generator
from colabx.twins.meta import (
    reference_meta_step,
    reference_plain_step,
    restructured_meta_step,
)

LR = 0.01
MARGIN, TAU = 2.0, 2.0  # small patches: a mask that varies inside the patch


def _setup(nd=2, size=16, c=2, t=2, ds=True, dtype=torch.float64, batch=2, roi=True):
    torch.manual_seed(0)
    f = UNet(1, c + t - 1, nd, base_features=4, num_pool=2, deep_supervision=ds).to(dtype)
    g = task_generator(1, t, nd, base_features=4, num_pool=2).to(dtype)
    x = torch.randn(batch, 1, *[size] * nd, dtype=dtype)
    y = torch.zeros(batch, *[size] * nd, dtype=torch.long)
    if roi:
        q = size // 4
        y[(slice(None),) + (slice(q, 2 * q + 1),) * nd] = 1
        if c > 2:
            y[(slice(None),) + (slice(2 * q + 1, 3 * q),) * nd] = c - 1
        if batch > 1:
            y[1] = torch.roll(y[1], 2, dims=0)  # the two items differ
    d = distance_transform(y > 0).to(dtype)
    return f, g, x, y, d


def _ggrad(g):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in g.parameters()])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _flat(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])


@pytest.mark.parametrize("ds", [True, False])
def test_per_sample_generator_grad_equals_reference(ds):
    # float64: colabx per-sample (fused ops, one generator backward per sample) vs the
    # reference-style loop (twin ops, two generator backwards per sample), summed over samples.
    f, g, x, y, d = _setup(ds=ds, c=3, t=2)
    ms = MetaStep(f, g, MetaConfig(3, MARGIN, TAU, mode="per_sample"))
    ms.step(x, y, d, LR)
    ours = _ggrad(g)
    reference_meta_step(f, g, x, y, d, 3, LR, margin=MARGIN, tau=TAU)
    ref = _ggrad(g)
    assert ref.norm() > 0
    assert _rel(ours, ref) < 1e-12  # measured 2.9e-14 (deep supervision on and off)


@pytest.mark.parametrize("nd,size", [(2, 16), (3, 8)])
def test_batched_generator_grad_equals_restructured(nd, size):
    f, g, x, y, d = _setup(nd=nd, size=size)
    ms = MetaStep(f, g, MetaConfig(2, MARGIN, TAU))
    info = ms.step(x, y, d, LR)
    assert len(info) == 1 and not info[0].skipped
    ours = _ggrad(g)
    restructured_meta_step(f, g, x, y, d, 2, LR, margin=MARGIN, tau=TAU)
    ref = _ggrad(g)
    assert ref.norm() > 0
    assert _rel(ours, ref) < 1e-12  # measured 2.3e-14 (2D) / 4.9e-14 (3D)


def test_batch_of_one_equals_reference():
    f, g, x, y, d = _setup(batch=1)
    MetaStep(f, g, MetaConfig(2, MARGIN, TAU)).step(x, y, d, LR)
    ours = _ggrad(g)
    reference_meta_step(f, g, x, y, d, 2, LR, margin=MARGIN, tau=TAU)
    assert _rel(ours, _ggrad(g)) < 1e-12  # measured 2.0e-14


@pytest.mark.parametrize("variant", ["grouped"])
# measured: float64 0, float32 1.3e-5
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
@pytest.mark.parametrize("nd,size,ds", [(2, 16, True), (3, 8, False)])
def test_batched_theta_pm_equals_sequential(variant, dtype, tol, nd, size, ds):
    f, g, x, y, d = _setup(nd=nd, size=size, ds=ds, dtype=dtype)
    ms = MetaStep(f, g, MetaConfig(2, MARGIN, TAU, theta_pm="sequential"))
    params = {n: p.detach() for n, p in f.named_parameters()}
    v = {n: torch.randn_like(p) for n, p in params.items()}
    eps = torch.tensor(1e-3, dtype=dtype)
    zs = ms._theta_pm_logits(params, v, eps, x)
    ms.config.theta_pm = variant
    zv = ms._theta_pm_logits(params, v, eps, x)
    assert len(zv) == len(zs) == (2 if ds else 1)
    for a, b in zip(zv, zs, strict=True):
        assert a.shape == b.shape and not a.requires_grad
        torch.testing.assert_close(a, b, rtol=1e-12 if dtype == torch.float64 else 1e-5,
                                   atol=1e-12 if dtype == torch.float64 else 1e-5)
    # and the whole generator gradient
    ms.step(x, y, d, LR)
    gv = _ggrad(g)
    ms.config.theta_pm = "sequential"
    ms.step(x, y, d, LR)
    assert _rel(gv, _ggrad(g)) < tol


def _fd_exact(nd, size, ds, eps_list):
    f, g, x, y, d = _setup(nd=nd, size=size, ds=ds)
    ms = MetaStep(f, g, MetaConfig(2, MARGIN, TAU, meta_grad="exact"))
    ms.step(x, y, d, LR)
    ex = _ggrad(g)
    out = []
    for e in eps_list:
        ms.config.meta_grad, ms.config.fd_eps = "fd", e
        ms.step(x, y, d, LR)
        fd = _ggrad(g)
        out.append((torch.nn.functional.cosine_similarity(fd, ex, dim=0).item(), _rel(fd, ex)))
    return out


@pytest.mark.parametrize("nd,size,min_cos,max_rel", [(2, 16, 0.99, 0.13), (3, 8, 0.995, 0.07)])
def test_fd_matches_exact_at_default_eps(nd, size, min_cos, max_rel):
    # Default ε = 0.01/‖v‖, deep supervision (the reference configuration). Measured: cosine
    # 0.9935 (2D) / 0.9981 (3D), relative error 11.8% / 6.3%: the finite difference's own error,
    # not rounding. At this tiny net the perturbation moves pre-activations across LeakyReLU
    # kinks (without deep supervision: cosine 0.992 / 0.988); the error falls to ~1e-8 once ε
    # is small enough that no kink is crossed (next test). Against an independent oracle:
    # tests/test_meta_oracle.py.
    ((cos, rel),) = _fd_exact(nd, size, True, [0.01])
    assert cos >= min_cos
    assert rel < max_rel


def test_fd_error_is_second_order_in_eps():
    # Between kinks the central difference is O(ε²): measured, 2D, deep supervision, float64,
    # relative error 1.21e-7, 3.04e-8, 4.85e-9 at ε·‖v‖ = 1e-4, 5e-5, 2e-5 (ratios 4.0 and 25;
    # the rounding floor is ~2e-10). At 1e-3 a kink is crossed and the error is 1.3e-2.
    (c1, e1), (c2, e2), (c3, e3) = _fd_exact(2, 16, True, [1e-4, 5e-5, 2e-5])
    assert min(c1, c2, c3) > 0.999999
    assert e1 < 1e-6
    assert 3.5 < e1 / e2 < 4.5
    assert 20 < e1 / e3 < 30


def _train(f, g, x, y, d, meta_fn, plain_fn, iters=3):
    gopt = torch.optim.Adam(g.parameters(), lr=1e-3)
    fopt = torch.optim.SGD(f.parameters(), lr=LR)
    for _ in range(iters):
        meta_fn(f, g, gopt)
        plain_fn(f, g, fopt)
    return _flat(f), _flat(g)


@pytest.mark.parametrize("mode", ["per_sample", "batched"])
def test_three_iterations_equal_twin(mode):
    f, g, x, y, d = _setup()
    f0, g0 = _flat(f), _flat(g)
    f2, g2 = copy.deepcopy(f), copy.deepcopy(g)

    def ours_meta(f, g, opt):
        MetaStep(f, g, MetaConfig(2, MARGIN, TAU, mode=mode)).step(x, y, d, LR, opt)

    def ours_plain(f, g, opt):
        MetaStep(f, g, MetaConfig(2, MARGIN, TAU)).plain_step(x, y, d, opt)

    twin = reference_meta_step if mode == "per_sample" else restructured_meta_step

    def ref_meta(f, g, opt):
        twin(f, g, x, y, d, 2, LR, opt, margin=MARGIN, tau=TAU)

    def ref_plain(f, g, opt):
        reference_plain_step(f, g, x, y, d, 2, opt, margin=MARGIN, tau=TAU)

    fa, ga = _train(f, g, x, y, d, ours_meta, ours_plain)
    fb, gb = _train(f2, g2, x, y, d, ref_meta, ref_plain)
    assert (ga - g0).norm() > 1e-4 and (fa - f0).norm() > 1e-4  # both networks moved
    # measured: θ 1.0e-14 / 1.1e-14, ω 2.2e-11 / 1.1e-12 (per-sample / batched; Adam divides
    # by the root of tiny second moments, which amplifies rounding)
    assert _rel(fa - f0, fb - f0) < 1e-12
    assert _rel(ga - g0, gb - g0) < 1e-9


def test_t1_is_plain_training():
    # t = 1: q = softmax of one channel = 1, so ŷ = one-hot(y) whatever ω is: zero generator
    # gradient, and the updates of θ are those of training on the hard labels.
    f, g, x, y, d = _setup(t=1, ds=True)
    f2 = copy.deepcopy(f)
    ms = MetaStep(f, g, MetaConfig(2, MARGIN, TAU))
    gopt = torch.optim.Adam(g.parameters(), lr=1e-3)
    fopt = torch.optim.SGD(f.parameters(), lr=LR)
    fopt2 = torch.optim.SGD(f2.parameters(), lr=LR)
    g0 = _flat(g)
    hard = [y[(slice(None),) + tuple(slice(s // 2, None, s) for s in st)]
            for st in f.output_strides]
    from colabx import dice_ce_loss
    for _ in range(3):
        info = ms.step(x, y, d, LR)
        assert not info[0].skipped
        assert float(_ggrad(g).abs().max()) == 0.0
        ms.plain_step(x, y, d, fopt)
        fopt2.zero_grad()
        dice_ce_loss(f2(x), hard).backward()
        fopt2.step()
    ms.step(x, y, d, LR, gopt)
    assert torch.equal(_flat(g), g0)  # Adam with exact-zero gradients does not move
    torch.testing.assert_close(_flat(f), _flat(f2), rtol=1e-10, atol=1e-12)


def test_no_roi_skips_without_nan():
    f, g, x, y, d = _setup(roi=False)
    assert torch.isinf(d).all()
    g0 = _flat(g)
    opt = torch.optim.Adam(g.parameters(), lr=1e-3)
    for mode in ("batched", "per_sample"):
        info = MetaStep(f, g, MetaConfig(2, MARGIN, TAU, mode=mode)).step(x, y, d, LR, opt)
        assert all(i.skipped for i in info)
        assert all(p.grad is None for p in g.parameters())
    assert torch.equal(_flat(g), g0)
    # without the shortcut the whole step runs: v ≠ 0 but ŷ does not depend on ω (M = 0)
    info = MetaStep(f, g, MetaConfig(2, MARGIN, TAU, skip_without_roi=False)).step(x, y, d, LR)
    assert not info[0].skipped and info[0].v_norm > 0
    gr = _ggrad(g)
    assert torch.isfinite(gr).all() and float(gr.abs().max()) == 0.0


def test_patch_without_roi_voxels_of_a_case_with_one_is_not_skipped():
    """A patch whose case has an ROI outside it (finite distances, M > 0) carries a real
    meta-gradient (L_ROI's false positives): it updates ω, as in the published code and the
    twin; only all-+inf distances (no ROI in the case) skip."""
    f, g, x, y, d = _setup(roi=False)
    d = 5.0 + torch.rand(d.shape, dtype=d.dtype, generator=torch.Generator().manual_seed(3)) * 20
    assert not (y > 0).any() and torch.isfinite(d).all()
    for mode in ("batched", "per_sample"):
        for p in g.parameters():
            p.grad = None
        info = MetaStep(f, g, MetaConfig(2, MARGIN, TAU, mode=mode)).step(x, y, d, LR)
        assert not any(i.skipped for i in info) and all(i.v_norm > 0 for i in info)
        ours = _ggrad(g)
        assert float(ours.abs().max()) > 0
        for p in g.parameters():
            p.grad = None
        twin = reference_meta_step if mode == "per_sample" else restructured_meta_step
        twin(f, g, x, y, d, 2, LR, margin=MARGIN, tau=TAU)
        assert _rel(ours, _ggrad(g)) < 1e-9


def test_zero_v_skips_without_nan(monkeypatch):
    f, g, x, y, d = _setup()
    monkeypatch.setattr(cmeta, "roi_bce_loss", lambda z, *a, **k: 0.0 * z.sum())
    g0 = _flat(g)
    opt = torch.optim.Adam(g.parameters(), lr=1e-3)
    info = MetaStep(f, g, MetaConfig(2, MARGIN, TAU)).step(x, y, d, LR, opt)
    assert info[0].skipped and info[0].v_norm == 0.0
    assert torch.isfinite(_flat(g)).all() and torch.equal(_flat(g), g0)
    for p in g.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


def test_amp_runs_on_cpu():
    # bf16 autocast for the generator, inner-step and L_ROI forwards; θ± stay fp32. Measured vs
    # the float64 step (2D / 3D): fp32 1.4e-5 / 4.1e-5 relative error; amp 24% / 36% (cosine
    # 0.971 / 0.932) at this tiny net, from both the generator and f in bf16 (13-29% each).
    # Here (2D, against the fp32 step): relative error 27.5 %, cosine 0.963.
    f, g, x, y, d = _setup(dtype=torch.float32)
    ms = MetaStep(f, g, MetaConfig(2, MARGIN, TAU))
    ms.step(x, y, d, LR)
    ref = _ggrad(g)
    ms.config.amp = True
    info = ms.step(x, y, d, LR)
    amp = _ggrad(g)
    assert not info[0].skipped and torch.isfinite(amp).all()
    assert torch.nn.functional.cosine_similarity(amp, ref, dim=0) > 0.95
    assert _rel(amp, ref) < 0.35
    assert ms.plain_step(x, y, d, torch.optim.SGD(f.parameters(), lr=LR)) > 0


def test_exact_mode_per_sample_is_the_sum_of_single_sample_steps():
    # (against the unrolled step's hypergradient: tests/test_meta_oracle.py) measured, float32
    # 3D: 0 (bit-identical)
    f, g, x, y, d = _setup(nd=3, size=8, dtype=torch.float32)
    cfg = MetaConfig(2, MARGIN, TAU, meta_grad="exact")
    info = MetaStep(f, g, MetaConfig(2, MARGIN, TAU, meta_grad="exact", mode="per_sample")).step(
        x, y, d, LR)
    assert len(info) == 2 and not any(i.skipped for i in info)
    ours = _ggrad(g)
    want = 0
    for b in range(2):
        MetaStep(f, g, cfg).step(x[b:b + 1], y[b:b + 1], d[b:b + 1], LR)
        want = want + _ggrad(g)
    assert want.norm() > 0
    assert _rel(ours, want) < 1e-6


def test_instance_norm_train_and_eval_mode_agree():
    # The functional calls run the modules' own forward; InstanceNorm without running stats
    # normalises per sample in both modes, so the step does not depend on f.train()/f.eval().
    f, g, x, y, d = _setup()
    ms = MetaStep(f, g, MetaConfig(2, MARGIN, TAU))
    f.train()
    ms.step(x, y, d, LR)
    a = _ggrad(g)
    f.eval()
    ms.step(x, y, d, LR)
    assert torch.equal(a, _ggrad(g))


def test_update_counter_and_config_errors():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.03)
    assert cmeta.current_lr(opt) == 0.03
    c = UpdateCounter(3)
    assert [c.tick() for _ in range(7)] == [True, False, False, True, False, False, True]
    with pytest.raises(ValueError):
        UpdateCounter(0)
    with pytest.raises(ValueError, match="mode"):
        MetaConfig(2, mode="loop")
    with pytest.raises(ValueError, match="meta_grad"):
        MetaConfig(2, meta_grad="hvp")
    with pytest.raises(ValueError, match="num_classes"):
        MetaConfig(1)


def test_amp_autocasts_the_same_passes_as_the_restructured_twin():
    # bf16 autocast of the generator, inner-step and L_ROI forwards (θ± in fp32) moves the
    # generator gradient by ~25 % on this tiny net (measured 25.7-27.5 %); colabx and the twin,
    # autocasting the same passes, agree to the bf16 rounding of their different pass
    # structure: bit-identical on the Intel CPU of 2026-11, 5.2e-3 on an AMD EPYC with
    # avx512_bf16 (2026-12-04); their fp32 steps differ by 1.2e-5 (fused vs twin losses).
    f, g, x, y, d = _setup(nd=2, size=16, dtype=torch.float32)
    MetaStep(f, g, MetaConfig(2, MARGIN, TAU, amp=True)).step(x, y, d, LR)
    ours = _ggrad(g)
    restructured_meta_step(f, g, x, y, d, 2, LR, margin=MARGIN, tau=TAU, amp=True)
    twin = _ggrad(g)
    restructured_meta_step(f, g, x, y, d, 2, LR, margin=MARGIN, tau=TAU)
    fp32 = _ggrad(g)
    assert _rel(ours, twin) < 2e-2
    assert _rel(twin, fp32) > 5e-2


@pytest.mark.parametrize("fd_tf32", [False, True])
def test_theta_pm_forwards_run_without_tf32_unless_asked(fd_tf32, monkeypatch):
    # The θ± forwards are the ones under no_grad; record cuDNN's TF32 flag there, with torch's
    # setting switched on around the step.
    f, g, x, y, d = _setup(nd=2, size=16, dtype=torch.float32)
    seen = []
    forward = type(f).forward

    def spy(self, inp):
        if not torch.is_grad_enabled():
            seen.append(torch.backends.cudnn.allow_tf32)
        return forward(self, inp)

    monkeypatch.setattr(type(f), "forward", spy)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        MetaStep(f, g, MetaConfig(2, MARGIN, TAU, fd_tf32=fd_tf32)).step(x, y, d, LR)
        assert torch.backends.cudnn.allow_tf32  # restored after the step
        seen_twin = len(seen)
        restructured_meta_step(f, g, x, y, d, 2, LR, margin=MARGIN, tau=TAU, fd_tf32=fd_tf32)
    assert seen[:seen_twin] == [fd_tf32] * 2 and seen[seen_twin:] == [fd_tf32] * 2


@pytest.mark.parametrize("mode,meta_grad", [("batched", "fd"), ("per_sample", "fd"),
                                            ("batched", "exact")])
def test_recomputed_generator_gives_the_same_gradient(mode, meta_grad):
    f, g, x, y, d = _setup(nd=2, size=16)
    grads = []
    for recompute in (False, True):
        cfg = MetaConfig(2, MARGIN, TAU, mode=mode, meta_grad=meta_grad,
                         recompute_generator=recompute)
        MetaStep(f, g, cfg).step(x, y, d, LR)
        grads.append(_ggrad(g))
    assert grads[0].norm() > 0
    assert _rel(grads[1], grads[0]) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tensor_scale", [False, True])
def test_shifted_parameters_round_as_per_tensor_arithmetic(dtype, tensor_scale):
    """The multi-tensor θ* / θ± arithmetic of the meta step gives p + s·d bit for bit."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 1, 3, 3, 3), (8,), (3, 8, 1, 1, 1), (5, 7)]
    params = {f"p{i}": torch.randn(s, generator=gen, dtype=dtype) for i, s in enumerate(shapes)}
    direction = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    for scale in (0.013, -0.013, -3e-4):
        s = torch.tensor(scale, dtype=dtype) if tensor_scale else scale
        got = cmeta._shifted(params, direction, s)
        assert list(got) == list(params)
        for (name, p), d in zip(params.items(), direction, strict=True):
            assert torch.equal(got[name], p + s * d), (name, scale)

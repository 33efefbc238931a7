"""The meta step's iteration orders (reference vs shared) and finite differences (central vs
one-sided), on the CPU in float64."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from colabx import distance_transform
from colabx.method.meta_step import MetaConfig, MetaStep
from colabx.models import UNet, task_generator

LR = 0.01
MARGIN, TAU = 2.0, 2.0  # small patches: a mask that varies inside the patch


def _setup(nd=3, size=8, ds=True, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    f = UNet(1, 3, nd, base_features=4, num_pool=2, deep_supervision=ds).to(dtype)
    g = task_generator(1, 2, nd, base_features=4, num_pool=2).to(dtype)
    x = torch.randn(2, 1, *[size] * nd, dtype=dtype)
    y = torch.zeros(2, *[size] * nd, dtype=torch.long)
    q = size // 4
    y[(slice(None),) + (slice(q, 2 * q + 1),) * nd] = 1
    y[1] = torch.roll(y[1], 2, dims=0)
    d = distance_transform(y > 0).to(dtype)
    return f, g, x, y, d


def _ggrad(g) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in g.parameters()])


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _reference(f, g, x, y, d, **cfg) -> torch.Tensor:
    MetaStep(f, g, MetaConfig(2, MARGIN, TAU, **cfg)).step(x, y, d, LR)
    return _ggrad(g)


def _shared(f, g, x, y, d, **cfg) -> torch.Tensor:
    ms = MetaStep(f, g, MetaConfig(2, MARGIN, TAU, order="shared", **cfg))
    f.zero_grad(set_to_none=True)
    g.zero_grad(set_to_none=True)
    inner = ms.shared_forward(x, y, d)
    inner.loss.backward()
    assert all(p.grad is None for p in g.parameters())  # the loss saw detached labels
    ms.step(x, y, d, LR, inner=inner)
    return _ggrad(g)


@pytest.mark.parametrize("meta_grad,difference", [("fd", "central"), ("fd", "one_sided"),
                                                   ("exact", "central")])
@pytest.mark.parametrize("nd,size,ds", [(3, 8, True), (2, 16, False)])
def test_shared_order_gives_the_reference_orders_generator_gradient(meta_grad, difference, nd,
                                                                   size, ds):
    f, g, x, y, d = _setup(nd, size, ds)
    ref = _reference(f, g, x, y, d, meta_grad=meta_grad, difference=difference)
    theta = [p.detach().clone() for p in f.parameters()]
    ours = _shared(f, g, x, y, d, meta_grad=meta_grad, difference=difference)
    assert ref.norm() > 0
    assert _rel(ours, ref) < 1e-9  # measured ~1e-15: the same quantity, same float64 ops
    for p, t in zip(f.parameters(), theta, strict=True):
        assert torch.equal(p, t)  # θ is stepped by the caller, after the meta step


def test_one_sided_difference_is_within_twice_the_central_ones_error():
    """At the default ε = 0.01/‖v‖ on this LeakyReLU U-Net (3D 8³, deep supervision) both
    differences are O(ε) away from the exact meta-gradient (kinks are crossed): measured
    relative errors, seeds 0-2, central 6.3e-2 / 1.07e-1 / 1.31e-1, one-sided 7.9e-2 / 1.43e-1 /
    1.28e-1 (ratios 1.26, 1.34, 0.98; in 2D 16² the ratio reaches 1.97)."""
    for seed in range(3):
        f, g, x, y, d = _setup(seed=seed)
        exact = _reference(f, g, x, y, d, meta_grad="exact")
        central = _rel(_reference(f, g, x, y, d), exact)
        one_sided = _rel(_reference(f, g, x, y, d, difference="one_sided"), exact)
        assert 0 < one_sided < 2 * central, (seed, one_sided, central)
        assert central < 0.15


def test_one_sided_needs_fp32_inner_forward_and_shared_needs_batched():
    with pytest.raises(ValueError, match="difference: one_sided reuses G"):
        MetaConfig(2, difference="one_sided", amp=True)
    with pytest.raises(ValueError, match="order: shared needs mode batched"):
        MetaConfig(2, order="shared", mode="per_sample")
    from colabx.train.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="meta_difference: one_sided needs the inner forward"):
        TrainConfig(meta_difference="one_sided", amp="bf16")
    with pytest.raises(ConfigError, match="meta_order: shared needs meta_mode batched"):
        TrainConfig(meta_order="shared", meta_mode="per_sample")
    # the exact meta-gradient has no difference: one_sided neither applies nor is refused, and
    # leaves the inner forward's precision alone (autocast and TF32 as configured)
    MetaConfig(2, difference="one_sided", meta_grad="exact", amp=True)
    TrainConfig(meta_difference="one_sided", meta_grad="exact", amp="bf16")
    f, g, x, *_ = _setup()
    ms = MetaStep(f, g, MetaConfig(2, difference="one_sided", meta_grad="exact", amp=True,
                                   amp_dtype=torch.bfloat16))
    autocast, tf32 = ms._inner_precision(x.float())
    assert isinstance(autocast, torch.autocast) and isinstance(tf32, contextlib.nullcontext)


def test_default_order_is_shared_when_batched_and_reference_per_sample():
    from colabx.train.config import TrainConfig, resolved_meta_order, saved_options

    assert TrainConfig().meta_order == "auto"
    assert resolved_meta_order(TrainConfig()) == "shared"
    assert resolved_meta_order(TrainConfig(meta_mode="per_sample")) == "reference"
    assert resolved_meta_order(TrainConfig(meta_order="reference")) == "reference"
    assert TrainConfig().meta_difference == "auto"
    # a run saved before the options existed trained in the reference order, central difference
    saved = saved_options({"mode": "colab"})
    assert (saved["meta_order"], saved["meta_difference"]) == ("reference", "central")


def test_trainer_shared_iteration_equals_a_hand_written_one(tmp_path, monkeypatch):
    """One Trainer iteration in the shared order = shared_forward, backward, meta step on that
    gradient, Adam step of ω, clipping, the optimizer step of θ, by hand."""
    import copy

    from colabx.device import optimizer_options
    from colabx.models import onednn_convolutions
    from colabx.train.config import TrainConfig
    from colabx.train.trainer import Trainer

    monkeypatch.setenv("COLABX_CACHE", str(tmp_path / "cache"))
    cfg = TrainConfig(phantom_preset="tiny", mode="colab", meta_order="shared", epochs=1,
                      iterations=1, base_features=4, max_features=16, num_pool=2,
                      patch_size=[16, 16, 8], num_workers=0, progress=False, threads=1,
                      device="cpu", grad_clip=0.05, snapshot_every=0)
    tr = Trainer(cfg, tmp_path / "run", echo=lambda s: None)
    assert tr.meta.config.difference == "one_sided"  # auto: the network runs in fp32 on the CPU
    batch = tr.batches[0]
    f, g = copy.deepcopy(tr.f), copy.deepcopy(tr.g)
    fused = optimizer_options(torch.device("cpu"))  # the trainer's optimizers on the CPU
    fopt = torch.optim.SGD(f.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                           weight_decay=cfg.weight_decay, **fused)
    gopt = torch.optim.Adam(g.parameters(), lr=cfg.gen_lr, **fused)
    fopt.load_state_dict(tr.opt.state_dict())
    ms = MetaStep(f, g, tr.meta.config)
    x, y, d = batch["image"], batch["label"], batch["distance"]
    with onednn_convolutions():  # as the Trainer runs on the CPU
        inner = ms.shared_forward(x, y, d)
        inner.loss.backward()
        ms.step(x, y, d, cfg.lr, inner=inner)
    gopt.step()
    norm = torch.nn.utils.clip_grad_norm_(f.parameters(), cfg.grad_clip)
    assert norm > cfg.grad_clip  # clipping is active
    fopt.step()

    tr.train_iteration(0, batch)
    for a, b in zip(tr.f.parameters(), f.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(tr.g.parameters(), g.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["per_sample", "batched"])
@pytest.mark.parametrize("meta_grad,difference", [("fd", "central"), ("fd", "one_sided"),
                                                   ("exact", "central")])
def test_given_logits_give_the_same_generator_update_and_keep_their_graph(mode, meta_grad,
                                                                          difference):
    """``step(..., logits=f(x))``: the inner steps backpropagate through the caller's forward
    (per sample through its rows) instead of running f; the generator's updates are the same
    (float64: 1e-9), and the forward's graph is left for the plain update's backward."""
    f, g, x, y, d = _setup()
    cfg = MetaConfig(2, MARGIN, TAU, mode=mode, meta_grad=meta_grad, difference=difference)
    g0 = [p.detach().clone() for p in g.parameters()]

    def updates(**kw):
        for p, p0 in zip(g.parameters(), g0, strict=True):
            p.data.copy_(p0)
        opt = torch.optim.Adam(g.parameters(), lr=1e-3)
        MetaStep(f, g, cfg).step(x, y, d, LR, opt, **kw)
        return torch.cat([p.detach().flatten() for p in g.parameters()]) - \
            torch.cat([p.flatten() for p in g0])

    ref = updates()
    z = f(x)
    ours = updates(logits=z)
    assert ref.norm() > 0 and _rel(ours, ref) < 1e-9
    sum(t.sum() for t in z).backward()  # the graph is still there
    assert all(p.grad is not None for p in f.parameters())
    with pytest.raises(ValueError, match="inner and logits"):
        MetaStep(f, g, MetaConfig(2, order="shared")).step(x, y, d, LR, inner=object(),
                                                           logits=z)


@pytest.mark.slow
@pytest.mark.parametrize("order,difference", [("shared", "one_sided"), ("reference", "central")])
def test_compiled_networks_give_the_meta_gradient(order, difference):
    """MetaStep on ``torch.compile``d f and g (its θ*, θ± passes through functional_call of
    the compiled wrapper): the float32 generator gradient is as close to the float64 eager one
    as the float32 eager gradient is (finite differences amplify rounding: both ~1e-3)."""
    f, g, x, y, d = _setup(size=16, dtype=torch.float32)
    def ggrad(f, g, x, d):
        g.zero_grad(set_to_none=True)
        if order == "shared":
            return _shared(f, g, x, y, d, difference=difference)
        return _reference(f, g, x, y, d, difference=difference)

    exact = ggrad(copy.deepcopy(f).double(), copy.deepcopy(g).double(), x.double(), d.double())
    eager = ggrad(f, g, x, d)
    compiled = ggrad(torch.compile(f), torch.compile(g), x, d)
    e_eager, e_compiled = _rel(eager.double(), exact), _rel(compiled.double(), exact)
    assert e_compiled < 2e-2 and e_compiled <= 3 * e_eager + 1e-4, (e_compiled, e_eager)

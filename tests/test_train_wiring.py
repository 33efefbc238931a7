"""The trainer's wiring against a hand-written loop of the same iterations: the poly learning
rates of θ and ω, the inner learning rate the meta step gets, gradient clipping and the
optimizers' settings. Both sides start from the same weights and see the same batches; after a
few iterations their weights must be equal."""

from __future__ import annotations

import copy

import pytest
import torch

from colabx import dice_ce_loss
from colabx.device import optimizer_options
from colabx.method.meta_step import MetaConfig, MetaStep
from colabx.models import onednn_convolutions
from colabx.train.config import TrainConfig
from colabx.train.trainer import Trainer

# Not the defaults, so that a setting the trainer ignores shows: lr 0.02, gen_lr 1e-3,
# momentum 0.9, weight decay 1e-3, poly exponent 2 (not 1: a linear decay would also pass).
LR, GEN_LR, MOMENTUM, WD, POLY = 0.02, 1e-3, 0.9, 1e-3, 2.0
EPOCHS, ITERS = 3, 1  # 3 iterations in all; two run, so the schedule is neither 1 nor 0


def _cfg(**kw) -> TrainConfig:
    base = dict(phantom_preset="tiny", mode="colab", epochs=EPOCHS, iterations=ITERS,
                batch_size=2, base_features=4, max_features=16, num_pool=2,
                patch_size=[16, 16, 8], val_fraction=0.0, num_workers=0, progress=False,
                threads=1, snapshot_every=0, device="cpu", lr=LR, gen_lr=GEN_LR,
                momentum=MOMENTUM, weight_decay=WD, poly_exponent=POLY, margin=4.0, tau=4.0,
                meta_period=1, meta_order="reference",  # the shared order: test_meta_order.py
                meta_difference="central")
    return TrainConfig(**{**base, **kw})


def _poly(base, it):
    return base * (1 - it / (EPOCHS * ITERS)) ** POLY


def _hand_loop(tr, f, g, n, clip, meta_amp):
    """The iterations the trainer should run, written out; returns per iteration the inner
    learning rate given to the meta step and the gradient norm before clipping."""
    cfg = tr.cfg
    ms = MetaStep(f, g, MetaConfig(tr.num_classes, cfg.margin, cfg.tau, mode=cfg.meta_mode,
                                   meta_amp=meta_amp == "bf16", amp_dtype=torch.bfloat16))
    fused = optimizer_options(torch.device("cpu"))  # the trainer's optimizers on the CPU
    opt = torch.optim.SGD(f.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True,
                          weight_decay=WD, **fused)
    gopt = torch.optim.Adam(g.parameters(), lr=GEN_LR, **fused)
    seen = []
    for it in range(n):
        batch = tr.batches[it]
        x, y, d = batch["image"], batch["label"], batch["distance"]
        alpha = _poly(LR, it)
        for group in opt.param_groups:
            group["lr"] = alpha
        for group in gopt.param_groups:
            group["lr"] = _poly(GEN_LR, it)
        with onednn_convolutions():  # the trainer's convolutions on the CPU
            if cfg.meta_mode == "per_sample":
                ms.step(x, y, d, alpha, gopt)
            else:
                ms.step(x, y, d, alpha)
                gopt.step()
            with torch.no_grad():
                targets = ms.labels(x, y, d)
            opt.zero_grad(set_to_none=True)
            dice_ce_loss(f(x), targets).backward()
        norm = torch.nn.utils.clip_grad_norm_(f.parameters(), clip)
        opt.step()
        seen.append((alpha, float(norm)))
    return seen


def _spy_meta(tr):
    """Record (α given to the meta step, θ's LR, ω's LR) at each meta update of ``tr``."""
    calls = []
    step = tr.meta.step

    def spy(x, y, d, lr, *args, **kw):
        calls.append((lr, tr.opt.param_groups[0]["lr"], tr.gen_opt.param_groups[0]["lr"]))
        return step(x, y, d, lr, *args, **kw)

    tr.meta.step = spy
    return calls


@pytest.mark.parametrize("meta_mode,clip,meta_amp", [
    ("batched", 12.0, "amp"), ("batched", 0.05, "amp"), ("per_sample", 0.05, "amp"),
    ("batched", 12.0, "bf16"),  # the generator and L_ROI passes under CPU bf16 autocast
])
def test_trainer_equals_the_hand_written_loop(cache, tmp_path, meta_mode, clip, meta_amp):
    tr = Trainer(_cfg(meta_mode=meta_mode, grad_clip=clip, meta_amp=meta_amp), tmp_path,
                 echo=lambda s: None)
    f, g = copy.deepcopy(tr.f), copy.deepcopy(tr.g)
    f0 = [p.detach().clone() for p in f.parameters()]
    calls = _spy_meta(tr)
    assert tr.run(max_epochs=2) is None  # iterations 0 and 1 of 3
    seen = _hand_loop(tr, f, g, 2, clip, meta_amp)
    # equal, not close: the same operations in the same order, in one process
    for mine, hand in ((tr.f, f), (tr.g, g)):
        want = dict(hand.named_parameters())
        for name, p in mine.named_parameters():
            torch.testing.assert_close(p, want[name], rtol=0, atol=0, msg=name)
    moved = max(float((p.detach() - q).abs().max())
                for p, q in zip(f.parameters(), f0, strict=True))
    assert moved > 1e-3
    # the poly schedule of both networks at iterations 0 and 1, α = θ's learning rate
    assert len(calls) == 2
    for it, (alpha, lr, gen_lr) in enumerate(calls):
        assert alpha == pytest.approx(_poly(LR, it), rel=1e-12)
        assert lr == pytest.approx(_poly(LR, it), rel=1e-12)
        assert gen_lr == pytest.approx(_poly(GEN_LR, it), rel=1e-12)
    assert [a for a, _ in seen] == pytest.approx([LR, LR * (2 / 3) ** 2], rel=1e-12)
    norms = [n for _, n in seen]
    if clip < 1:
        assert min(norms) > 2 * clip  # clipping active in every iteration (measured 1.19-1.24)
    else:
        assert max(norms) < clip  # not clipped (measured 1.19-1.24)


def test_optimizer_settings_are_the_configured_ones(cache, tmp_path):
    tr = Trainer(_cfg(), tmp_path, echo=lambda s: None)
    (group,) = tr.opt.param_groups
    assert isinstance(tr.opt, torch.optim.SGD)
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (MOMENTUM, True, WD)
    assert group["lr"] == LR
    assert isinstance(tr.gen_opt, torch.optim.Adam)
    assert tr.gen_opt.param_groups[0]["lr"] == GEN_LR
    assert {id(p) for p in group["params"]} == {id(p) for p in tr.f.parameters()}
    assert {id(p) for p in tr.gen_opt.param_groups[0]["params"]} == \
        {id(p) for p in tr.g.parameters()}


def test_meta_amp_reaches_the_meta_step_and_warns_without_amx(cache, tmp_path, monkeypatch):
    import colabx.train.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "cpu_has_amx", lambda: False)
    lines: list[str] = []
    tr = Trainer(_cfg(meta_amp="bf16"), tmp_path / "bf16", echo=lines.append)
    c = tr.meta.config
    assert (c.amp, c.meta_amp, c.amp_dtype) == (False, True, torch.bfloat16)
    assert any("meta_amp bf16 on a CPU without AMX" in line for line in lines)
    lines.clear()
    tr = Trainer(_cfg(), tmp_path / "default", echo=lines.append)
    assert (tr.meta.config.amp, tr.meta.config.meta_amp) == (False, False)
    Trainer(_cfg(mode="vanilla", meta_amp="bf16"), tmp_path / "vanilla", echo=lines.append)
    assert not any("AMX" in line for line in lines)  # no meta step, nothing to warn about

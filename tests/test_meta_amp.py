"""``MetaConfig.meta_amp`` / ``colabx train --meta-amp``: the meta step's own passes (generator,
L_ROI at θ*) under autocast while f's passes at θ and θ± keep their precision."""

from __future__ import annotations

import pytest
import torch
from test_meta_order import MARGIN, TAU, _ggrad, _rel, _setup

from colabx.method.meta_step import MetaConfig, MetaStep

LR = 0.01


def _recorded_dtypes(f, g, cfg: MetaConfig, x, y, d) -> tuple[list, list]:
    """The output dtype of every forward of f (full-resolution head) and g during one meta
    update in ``cfg``'s order."""
    seen_f, seen_g = [], []
    hooks = [f.register_forward_hook(lambda m, i, o: seen_f.append(
                 (o[0] if isinstance(o, (list, tuple)) else o).dtype)),
             g.register_forward_hook(lambda m, i, o: seen_g.append(o.dtype))]
    try:
        ms = MetaStep(f, g, cfg)
        if cfg.order == "shared":
            inner = ms.shared_forward(x, y, d)
            inner.loss.backward()
            ms.step(x, y, d, LR, inner=inner)
        else:
            ms.step(x, y, d, LR)
    finally:
        for h in hooks:
            h.remove()
    return seen_f, seen_g


@pytest.mark.parametrize("order,difference,f_calls", [
    ("shared", "one_sided", ["inner", "roi", "theta+"]),
    ("reference", "central", ["inner", "roi", "theta+", "theta-"]),
])
@pytest.mark.parametrize("meta_amp", [True, False, None])
def test_only_the_generator_and_the_roi_pass_run_under_autocast(order, difference, f_calls,
                                                                meta_amp):
    """16³ patches: at 8³ the network's deepest stage is 2 voxels deep, where oneDNN 3.12's
    bf16 conv3d weight gradient (torch 2.13's CPU build) came out non-finite in 15-20 % of
    calls on the AMD EPYC development machine (AVX512-BF16, no AMX; 16 channels, input
    [2, 16, 2, 2, 2], 1 or 2 threads; never at depth 3 or more, nor with oneDNN off), so v
    was not finite and the step skipped, as designed, before its θ± forwards."""
    low = torch.bfloat16 if meta_amp else torch.float32
    want = {"inner": torch.float32, "roi": low, "theta+": torch.float32,
            "theta-": torch.float32}
    f, g, x, y, d = _setup(dtype=torch.float32, size=16)
    cfg = MetaConfig(2, MARGIN, TAU, order=order, difference=difference, meta_amp=meta_amp,
                     amp_dtype=torch.bfloat16)
    seen_f, seen_g = _recorded_dtypes(f, g, cfg, x, y, d)
    assert seen_g == [low]
    assert seen_f == [want[c] for c in f_calls]


def test_meta_amp_follows_amp_unless_given():
    """None (default) means as ``amp``; the one-sided difference stays refused with ``amp``
    (its inner forward would run under autocast) but not with ``meta_amp`` alone."""
    assert MetaConfig(2).meta_amp is None
    MetaConfig(2, difference="one_sided", meta_amp=True)
    with pytest.raises(ValueError, match="one_sided reuses G"):
        MetaConfig(2, difference="one_sided", amp=True, meta_amp=False)
    with pytest.raises(ValueError, match="meta_amp must be True, False or None"):
        MetaConfig(2, meta_amp="bf16")


def test_bf16_meta_passes_keep_the_meta_gradients_direction():
    """What bf16 costs in accuracy, measured where the option's help quotes it: the one-sided
    fd meta-gradient with the generator and L_ROI passes in bf16 against the same in float32,
    3D 16³ and 2D 32² test networks, seeds 0-2: 16-38 % of its norm apart (the float32 one is
    2-18 % from the exact meta-gradient), still pointing the same way (cosine > 0.9)."""
    for nd, size in ((3, 16), (2, 32)):
        for seed in range(3):
            f, g, x, y, d = _setup(nd=nd, size=size, seed=seed, dtype=torch.float32)
            grads = []
            for meta_amp in (False, True):
                g.zero_grad(set_to_none=True)
                cfg = MetaConfig(2, MARGIN, TAU, difference="one_sided", meta_amp=meta_amp)
                MetaStep(f, g, cfg).step(x, y, d, LR)
                grads.append(_ggrad(g).double())
            fp32, bf16 = grads
            assert 0.05 < _rel(bf16, fp32) < 0.45, (nd, seed, _rel(bf16, fp32))
            cos = float(torch.nn.functional.cosine_similarity(bf16, fp32, dim=0))
            assert cos > 0.9, (nd, seed, cos)

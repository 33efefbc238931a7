"""MetaStep.gradients, the meta step without host reads (what ``colabx train --cuda-graphs``
captures): the generator gradient of :meth:`MetaStep.step`, its skip checks as a device flag,
and no NaN from an unusable update; on the CPU."""

from __future__ import annotations

import math

import pytest
import torch

from colabx.method import meta_step as meta_module
from colabx.method.meta_step import MetaConfig, MetaStep
from tests.test_meta_order import LR, MARGIN, TAU, _ggrad, _setup


def _inner(ms: MetaStep, x, y, d, shared: bool):
    """The shared order's InnerPass (its loss backpropagated), or None."""
    inner = None
    if shared:
        ms.f.zero_grad(set_to_none=True)
        inner = ms.shared_forward(x, y, d)
        inner.loss.backward()
    return inner


def _both(cfg: dict, dtype=torch.float32, mutate=None):
    """(step's info and generator gradient, gradients()' tensors and generator gradient) on
    the same nets and batch; ``mutate(x, y, d)`` may change the batch first."""
    f, g, x, y, d = _setup(dtype=dtype)
    if mutate is not None:
        x, y, d = mutate(x, y, d)
    ms = MetaStep(f, g, MetaConfig(2, MARGIN, TAU, **cfg))
    shared = cfg.get("order") == "shared"
    info = ms.step(x, y, d, LR, inner=_inner(ms, x, y, d, shared))[0]
    want = _ggrad(g)
    for p in g.parameters():  # a stale gradient that gradients() must drop, not add to
        p.grad = torch.ones_like(p)
    lr = torch.tensor(LR, dtype=dtype)
    res = ms.gradients(x, y, d, lr, inner=_inner(ms, x, y, d, shared))
    return info, want, res, _ggrad(g)


@pytest.mark.parametrize("cfg", [
    {},
    {"difference": "one_sided"},
    {"order": "shared"},
    {"order": "shared", "difference": "one_sided"},
    {"meta_grad": "exact"},
    {"order": "shared", "recompute_generator": True},
    {"theta_pm": "grouped"},
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_equal_steps_generator_gradient(cfg, dtype):
    info, want, res, got = _both(cfg, dtype)
    assert not info.skipped and want.norm() > 0
    assert torch.equal(got, want)  # the same operations on the same values
    back = res.info()
    assert back == info
    assert (back.eps > 0) == (cfg.get("meta_grad", "fd") == "fd")


def _no_roi(x, y, d):
    return x, torch.zeros_like(y), torch.full_like(d, math.inf)


@pytest.mark.parametrize("order", ["reference", "shared"])
def test_a_batch_without_roi_is_unusable_with_a_zero_gradient(order):
    info, want, res, got = _both({"order": order}, mutate=_no_roi)
    assert info.skipped and want.abs().max() == 0
    assert res.info().skipped and not bool(res.usable)
    assert got.abs().max() == 0  # the context labels do not depend on ω without an ROI


def test_without_the_roi_skip_such_a_batch_is_usable():
    info, _, res, got = _both({"skip_without_roi": False}, mutate=_no_roi)
    assert not info.skipped and not res.info().skipped
    assert torch.isfinite(got).all()


def test_a_zero_v_is_unusable_and_leaves_no_nan(monkeypatch):
    """‖v‖ = 0 makes ε infinite and θ± NaN: step returns before the θ± passes, gradients()
    runs them and must keep their NaN out of the generator's gradient."""
    real = meta_module.roi_bce_loss
    monkeypatch.setattr(meta_module, "roi_bce_loss",
                        lambda z, *a, **k: real(z, *a, **k) * 0.0)
    info, want, res, got = _both({})
    assert info.skipped and info.v_norm == 0.0
    back = res.info()
    assert back.skipped and back.v_norm == 0.0 and back.eps == 0.0
    assert torch.isfinite(got).all() and got.abs().max() == 0


def test_gradients_refuses_per_sample_and_a_reducer():
    f, g, x, y, d = _setup(dtype=torch.float32)
    lr = torch.tensor(LR)
    with pytest.raises(ValueError, match="batched mode only"):
        MetaStep(f, g, MetaConfig(2, mode="per_sample")).gradients(x, y, d, lr)

    class Reducer:
        def mean_(self, tensors):
            pass

        def any(self, flag):
            return flag

    with pytest.raises(ValueError, match="not with a reducer"):
        MetaStep(f, g, MetaConfig(2), reducer=Reducer()).gradients(x, y, d, lr)

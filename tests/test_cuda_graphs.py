"""The ops under CUDA-graph capture (what ``bench_ops`` times as ``@graph``, and what a training
step captured with ``torch.cuda.graph`` runs): after capture, the inputs get new values in place
and a replay must give what an eager call gives on those values. Catches host syncs, workspaces
or launch tables fixed at capture time to stale data, and kernels reading the capture-time
inputs."""

from __future__ import annotations

import pytest
import torch

import colabx
from colabx.bench.harness import capture_graph

pytestmark = pytest.mark.cuda


def _replay_matches_eager(fn, refill, tol):
    graph, static_out = capture_graph(fn)  # the capture bench_ops times
    refill()
    graph.replay()
    torch.cuda.synchronize()
    got = [x.clone() for x in static_out]
    want = fn()
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol)


def _refill_normal(*tensors, scale=2.0):
    def refill():
        with torch.no_grad():
            for t in tensors:
                t.copy_(scale * torch.randn_like(t))
    return refill


@pytest.mark.parametrize("hard", [False, True])
def test_dice_ce_loss_levels_replay(hard):
    g = torch.Generator(device="cuda").manual_seed(0)
    sizes = [(40, 36, 33), (20, 18, 17), (10, 9, 9), (5, 5, 5)]
    zs = [torch.randn((2, 4, *s), device="cuda", generator=g).requires_grad_() for s in sizes]
    if hard:
        ts = [torch.randint(0, 4, (2, *s), device="cuda", generator=g) for s in sizes]
        wrt = zs
    else:
        ts = [torch.softmax(torch.randn((2, 4, *s), device="cuda", generator=g), 1)
              .requires_grad_() for s in sizes]
        wrt = zs + ts
    weights = [0.4, 0.3, 0.2, 0.1]

    def fn():
        loss = colabx.dice_ce_loss(zs, ts, level_weights=weights, validate=False)
        return (loss.detach(), *torch.autograd.grad(loss, wrt))

    def refill():
        _refill_normal(*zs)()
        if not hard:
            with torch.no_grad():
                for t in ts:
                    t.copy_(torch.softmax(torch.randn_like(t), 1))

    _replay_matches_eager(fn, refill, dict(rtol=1e-5, atol=1e-6))


def test_roi_bce_loss_replay():
    g = torch.Generator(device="cuda").manual_seed(1)
    z = torch.randn((2, 3, 33, 31, 29), device="cuda", generator=g).requires_grad_()
    lab = torch.randint(0, 3, (2, 33, 31, 29), device="cuda", generator=g)

    def fn():
        loss = colabx.roi_bce_loss(z, lab, [1, 2], validate=False)
        return (loss.detach(), *torch.autograd.grad(loss, [z]))

    _replay_matches_eager(fn, _refill_normal(z), dict(rtol=1e-5, atol=1e-6))


@pytest.mark.parametrize("levels", [1, 4])
def test_context_labels_replay(levels):
    g = torch.Generator(device="cuda").manual_seed(2)
    n = 40
    o = torch.randn((2, 3, n, n, n), device="cuda", generator=g).requires_grad_()
    y = (torch.rand((2, n, n, n), device="cuda", generator=g) > 0.9).long()
    d = 40 * torch.rand((2, n, n, n), device="cuda", generator=g)

    def fn():
        outs = colabx.context_labels(o, y, d, 2, levels=levels, validate=False)
        outs = outs if isinstance(outs, list) else [outs]
        grads = [torch.full_like(x, 0.5) for x in outs]
        return (*[x.detach() for x in outs], *torch.autograd.grad(outs, [o], grads))

    _replay_matches_eager(fn, _refill_normal(o), dict(rtol=1e-5, atol=1e-6))


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("shape", [(3, 37, 41, 300), (2, 700, 7, 33)],
                         ids=["shared-memory", "global-workspace"])
def test_distance_transform_replay(signed, shape):
    # a strided axis over distance_transform_cuda_smem_max_n takes the workspace path
    g = torch.Generator(device="cuda").manual_seed(3)
    mask = torch.rand(shape, device="cuda", generator=g) > 0.995

    def fn():
        return (colabx.distance_transform(mask, spacing=(1.0, 0.8, 2.5), signed=signed),)

    def refill():
        mask.copy_(torch.rand(mask.shape, device="cuda") > 0.99)

    _replay_matches_eager(fn, refill, dict(rtol=0, atol=0))

"""The fused ops are differentiable once: with ``create_graph=True`` their first-order gradients
are the ordinary ones, and differentiating those again raises an error that names the op and its
twin (before, the gradients came back as constants and a gradient penalty through the op was
silently dropped). Their twins differentiate twice, which the exact meta-gradient uses."""

from __future__ import annotations

import pytest
import torch

import colabx
from colabx.twins import context_labels as cl_twin
from colabx.twins import dice_ce_loss as dce_twin
from colabx.twins import roi_bce_loss as bce_twin


def _inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 3, 5, 6, 4, generator=gen, dtype=torch.float64)
    soft = torch.softmax(torch.randn(2, 3, 5, 6, 4, generator=gen, dtype=torch.float64), 1)
    lab = torch.randint(0, 3, (2, 5, 6, 4), generator=gen)
    gen_logits = torch.randn(2, 2, 5, 6, 4, generator=gen, dtype=torch.float64)
    dist = 40 * torch.rand(2, 5, 6, 4, generator=gen, dtype=torch.float64)
    return z, soft, lab, gen_logits, dist


def _weighted(out, seed: int):
    """A scalar with a non-trivial gradient from an op's output (a tensor or a list of them)."""
    outs = out if isinstance(out, (list, tuple)) else [out]
    gen = torch.Generator().manual_seed(seed)
    return sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)


# per op: its scalar objective and its twin's; WRT: the differentiated inputs' indices
CASES = {
    "dice_ce_loss": (lambda a: colabx.dice_ce_loss(a[0], a[1]),
                     lambda a: dce_twin.dice_ce_loss(a[0], a[1])),
    "roi_bce_loss": (lambda a: colabx.roi_bce_loss(a[0], a[2], [1, 2]),
                     lambda a: bce_twin.roi_bce_loss(a[0], a[2], [1, 2])),
    "context_labels": (lambda a: _weighted(colabx.context_labels(a[3], a[2], a[4], 3), 7),
                       lambda a: _weighted(cl_twin.context_labels_twin(a[3], a[2], a[4], 3), 7)),
}
WRT = {"dice_ce_loss": (0, 1), "roi_bce_loss": (0,), "context_labels": (3,)}


def _leaves(seed: int, wrt):
    return [t.clone().requires_grad_(i in wrt) for i, t in enumerate(_inputs(seed))]


@pytest.mark.parametrize("name", sorted(CASES))
def test_create_graph_keeps_first_order_gradients(name):
    op, _ = CASES[name]
    wrt = WRT[name]
    a = _leaves(0, wrt)
    plain = torch.autograd.grad(op(a), [a[i] for i in wrt])
    b = _leaves(0, wrt)
    graphed = torch.autograd.grad(op(b), [b[i] for i in wrt], create_graph=True)
    for p, g in zip(plain, graphed, strict=True):
        assert g.requires_grad
        torch.testing.assert_close(g.detach(), p, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_second_derivative_raises_naming_the_twin(name):
    op, _ = CASES[name]
    wrt = WRT[name]
    a = _leaves(1, wrt)
    value = op(a)
    grads = torch.autograd.grad(value, [a[i] for i in wrt], create_graph=True)
    penalised = value + 100 * sum(g.pow(2).sum() for g in grads)
    with pytest.raises(RuntimeError, match=rf"colabx\.{name} is differentiable once.*"
                                           rf"colabx\.twins\.{name}\.{name}"):
        penalised.backward()


@pytest.mark.parametrize("name", sorted(CASES))
def test_twin_differentiates_twice(name):
    """The twin's gradient penalty has a gradient, and it differs from the first-order one: the
    penalty the op refuses is not a no-op."""
    _, twin = CASES[name]
    wrt = WRT[name]
    a = _leaves(2, wrt)
    value = twin(a)
    grads = torch.autograd.grad(value, [a[i] for i in wrt], create_graph=True)
    penalty = sum(g.pow(2).sum() for g in grads)
    second = torch.autograd.grad(penalty, [a[i] for i in wrt])
    assert all(torch.isfinite(s).all() and s.abs().max() > 1e-8 for s in second)

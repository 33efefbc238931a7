"""The meta-gradient against an oracle that shares no code with colabx.method or its twins.

The oracle differentiates the unrolled inner step itself, in float64, by plain double backprop:

    dω = d/dω L_ROI(θ − α ∇θ L_seg(f_θ(x), ŷ(ω)))

with ŷ(ω) the context labels of the generator's logits at the U-Net's deep-supervision levels,
L_seg the CE + soft Dice loss over all K channels (Dice over channels 1..K−1) weighted per level
by literal weights, L_ROI the one-vs-all BCE on channels 1..c−1 of the full-resolution output and
α the inner learning rate (the module docstring of colabx/method/meta_step.py). The losses are
written out here from their formulas; only the U-Net, the generator and the context labels
(tested on their own against scipy and hand-made cases) are colabx's.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from colabx import distance_transform
from colabx.method.meta_step import MetaConfig, MetaStep
from colabx.models import UNet, task_generator
from colabx.twins.context_labels import context_labels_twin

LR = 0.01
MARGIN, TAU = 2.0, 2.0
# deep-supervision weights of three levels (strides 1, 2, 4): 1, 1/2, 0 normalised to sum 1
WEIGHTS3 = (2 / 3, 1 / 3, 0.0)


def _setup(nd=2, size=16, c=3, t=2, batch=2, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    f = UNet(1, c + t - 1, nd, base_features=4, num_pool=3, deep_supervision=True).to(dtype)
    g = task_generator(1, t, nd, base_features=4, num_pool=2).to(dtype)
    x = torch.randn(batch, 1, *[size] * nd, dtype=dtype)
    y = torch.zeros(batch, *[size] * nd, dtype=torch.long)
    q = size // 4
    y[(slice(None),) + (slice(q, 2 * q + 1),) * nd] = 1
    y[(slice(None),) + (slice(2 * q + 1, 3 * q),) * nd] = c - 1
    for b in range(1, batch):
        y[b] = torch.roll(y[b], 2 * b, dims=0)  # the items differ
    d = distance_transform(y > 0).to(dtype)
    return f, g, x, y, d


def _ce_dice(z, yhat, smooth=1e-5):
    """CE + soft Dice (channels 1..K−1) of one level, from the formulas."""
    b, k = z.shape[:2]
    vox = z[0, 0].numel()
    p = torch.softmax(z, 1)
    ce = -(yhat * torch.log(p + 1e-32)).sum() / (b * vox)
    dims = tuple(range(2, z.dim()))
    tp = (p * yhat).sum(dims)
    fp = (p * (1 - yhat)).sum(dims)
    fn = ((1 - p) * yhat).sum(dims)
    dice = (2 * tp + smooth) / (2 * tp + fp + fn + smooth)
    return ce - dice[:, 1:].mean()


def _l_seg(zs, yhats):
    assert len(zs) == len(WEIGHTS3)
    return sum(w * _ce_dice(z, t) for w, z, t in zip(WEIGHTS3, zs, yhats, strict=True))


def _l_roi(z, y, c):
    b = z.shape[0]
    p = torch.softmax(z, 1)
    total = 0.0
    for j in range(1, c):
        yj = (y == j).to(z.dtype)
        pj = p[:, j]
        total = total + (yj * torch.log(pj + 1e-6) + (1 - yj) * torch.log(1 - pj + 1e-6)).sum()
    return -total / (b * z[0, 0].numel())


def oracle_hypergradient(f, g, x, y, d, c, lr):
    """dL_ROI(θ − α ∇θ L_seg(θ, ŷ(ω)))/dω by double backprop, flattened over g's parameters."""
    theta = {n: p.detach().requires_grad_() for n, p in f.named_parameters()}
    omega = dict(g.named_parameters())
    yhat = context_labels_twin(functional_call(g, omega, (x,)), y, d, c, MARGIN, TAU,
                                    f.output_strides)
    l_seg = _l_seg(functional_call(f, theta, (x,)), yhat)
    grads = torch.autograd.grad(l_seg, list(theta.values()), create_graph=True)
    star = {n: p - lr * gr for (n, p), gr in zip(theta.items(), grads, strict=True)}
    l_roi = _l_roi(functional_call(f, star, (x,))[0], y, c)
    dw = torch.autograd.grad(l_roi, list(omega.values()), allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if gr is None else gr).flatten()
                      for p, gr in zip(omega.values(), dw, strict=True)])


def _ggrad(g):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in g.parameters()])


def _colabx(f, g, x, y, d, c, **cfg):
    MetaStep(f, g, MetaConfig(c, MARGIN, TAU, **cfg)).step(x, y, d, LR)
    return _ggrad(g)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def _per_sample_oracle(f, g, x, y, d, c):
    """The per-sample mode without an optimizer: ω fixed, the samples' hypergradients summed."""
    return sum(oracle_hypergradient(f, g, x[b:b + 1], y[b:b + 1], d[b:b + 1], c, LR)
               for b in range(x.shape[0]))


@pytest.mark.parametrize("nd,size", [(2, 16), (3, 16)])
def test_exact_mode_is_the_hypergradient_of_the_unrolled_step(nd, size):
    # Measured (float64): relative error 2.9e-15 (2D) / 3.6e-15 (3D).
    f, g, x, y, d = _setup(nd=nd, size=size)
    want = oracle_hypergradient(f, g, x, y, d, 3, LR)
    assert want.norm() > 0
    got = _colabx(f, g, x, y, d, 3, meta_grad="exact")
    assert _rel(got, want) < 1e-12


def test_exact_per_sample_mode_sums_the_per_sample_hypergradients():
    # Measured (float64): relative error 5.2e-15; the batched hypergradient differs by 96 %.
    f, g, x, y, d = _setup(batch=3)
    want = _per_sample_oracle(f, g, x, y, d, 3)
    got = _colabx(f, g, x, y, d, 3, meta_grad="exact", mode="per_sample")
    assert _rel(got, want) < 1e-12
    assert _rel(oracle_hypergradient(f, g, x, y, d, 3, LR), want) > 1e-2


def test_exact_per_sample_mode_float32_3d():
    # float32 colabx against the float64 oracle of the same networks: measured relative error
    # 4.2e-6, 1 − cosine 8e-12.
    f, g, x, y, d = _setup(nd=3, size=16)
    want = _per_sample_oracle(f, g, x, y, d, 3)
    f32, g32 = f.float(), g.float()
    got = _colabx(f32, g32, x.float(), y, d.float(), 3, meta_grad="exact", mode="per_sample")
    assert _rel(got.double(), want) < 5e-5
    assert _cos(got.double(), want) > 1 - 1e-8


@pytest.mark.parametrize("mode", ["batched", "per_sample"])
def test_fd_mode_has_the_sign_and_scale_of_the_hypergradient(mode):
    # Central difference with ε = fd_eps/‖v‖; its error here is set by the LeakyReLU kinks the
    # θ± forwards cross, not by ε². Measured (3D 16³, float64, 3 levels, c = 3, t = 2), relative
    # error / cosine / norm ratio, batched and per-sample:
    #   fd_eps 1e-2: 8.7e-2 / 0.9964 / 0.977   and 1.35e-1 / 0.9918 / 0.950
    #   fd_eps 1e-3: 3.5e-2 / 0.9994 / 0.996   and 4.8e-2 / 0.9989 / 0.992
    #   fd_eps 1e-6: 1.9e-9                    and 1.2e-9 (no kink crossed)
    # (2D 16² is rougher: 41 % / 0.938 at fd_eps 1e-2.)
    f, g, x, y, d = _setup(nd=3, size=16)
    want = (oracle_hypergradient(f, g, x, y, d, 3, LR) if mode == "batched"
            else _per_sample_oracle(f, g, x, y, d, 3))
    errors = []
    for fd_eps in (1e-2, 1e-3):  # the default first
        got = _colabx(f, g, x, y, d, 3, mode=mode, fd_eps=fd_eps)
        assert _cos(got, want) > 0.99
        assert 0.9 < float(got.norm() / want.norm()) < 1.1
        errors.append(_rel(got, want))
    assert errors[0] < 0.15 and errors[1] < 0.06
    assert errors[1] < errors[0] / 2
    fine = _colabx(f, g, x, y, d, 3, mode=mode, fd_eps=1e-6)
    assert _rel(fine, want) < 1e-7


def _colabx_shared(f, g, x, y, d, c, **cfg):
    """The shared iteration order: f's forward+backward by the caller, then the meta step."""
    ms = MetaStep(f, g, MetaConfig(c, MARGIN, TAU, order="shared", **cfg))
    f.zero_grad(set_to_none=True)
    for p in g.parameters():
        p.grad = None
    inner = ms.shared_forward(x, y, d)
    inner.loss.backward()
    ms.step(x, y, d, LR, inner=inner)
    return _ggrad(g)


@pytest.mark.parametrize("difference", ["central", "one_sided"])
def test_shared_order_against_the_oracle(difference):
    # Measured (3D 16³, float64): exact 3.6e-15; fd at fd_eps 1e-6 (no kink crossed) central
    # 1.8e-9, one-sided (first order in ε) 9.0e-7; at the default fd_eps 1e-2 central 8.7e-2
    # (cosine 0.9964), one-sided 1.06e-1 (cosine 0.9944).
    f, g, x, y, d = _setup(nd=3, size=16)
    want = oracle_hypergradient(f, g, x, y, d, 3, LR)
    assert _rel(_colabx_shared(f, g, x, y, d, 3, meta_grad="exact"), want) < 1e-12
    fine = _colabx_shared(f, g, x, y, d, 3, fd_eps=1e-6, difference=difference)
    assert _rel(fine, want) < (1e-7 if difference == "central" else 1e-5)
    assert _cos(_colabx_shared(f, g, x, y, d, 3, difference=difference), want) > 0.99

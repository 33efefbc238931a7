"""Tests for colabx.models: the generic U-Net and the task generator (CPU, tiny feature counts)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from colabx import context_labels
from colabx.models import DEFAULT_MAX_FEATURES, UNet, reference_pool_kernel_sizes, task_generator

ANISO = [(2, 2, 1), (2, 2, 2), (2, 2, 2)]


def tiny(in_ch=1, out_ch=3, nd=3, **kw):
    kw.setdefault("base_features", 4)
    kw.setdefault("max_features", 16)
    return UNet(in_ch, out_ch, nd, **kw)


def cumulative(pools, n):
    out = [(1,) * len(pools[0])]
    for p in pools[: n - 1]:
        out.append(tuple(a * b for a, b in zip(out[-1], p, strict=True)))
    return out


CASES = [
    # spatial_dims, pools, input size
    (2, [(2, 2)] * 4, (32, 48)),
    (2, [(2, 1), (2, 2), (2, 2)], (24, 20)),
    (3, [(2, 2, 2)] * 3, (16, 16, 16)),
    (3, ANISO, (16, 24, 8)),
]


@pytest.mark.parametrize("nd,pools,size", CASES)
@pytest.mark.parametrize("ds", [True, False])
def test_output_shapes(nd, pools, size, ds):
    m = tiny(2, 3, nd, pool_kernel_sizes=pools, deep_supervision=ds)
    x = torch.randn(2, 2, *size)
    out = m(x)
    strides = cumulative(pools, len(pools))
    assert m.input_divisor == tuple(math.prod(p[a] for p in pools) for a in range(nd))
    if ds:
        assert isinstance(out, list) and len(out) == len(pools) == m.num_pool
        assert m.output_strides == strides
        for o, s in zip(out, strides, strict=True):
            assert o.shape == (2, 3, *(n // v for n, v in zip(size, s, strict=True)))
    else:
        assert isinstance(out, torch.Tensor) and out.shape == (2, 3, *size)
        assert m.output_strides == [(1,) * nd]


def test_default_configuration():
    m = UNet(1, 3)  # 3D, 30 features, 4 poolings, deep supervision
    assert m.spatial_dims == 3 and m.num_pool == 4
    assert m.stage_features == [30, 60, 120, 240, 320]
    assert m.pool_kernel_sizes == [(2, 2, 2)] * 4
    assert m.conv_kernel_sizes == [(3, 3, 3)] * 5
    assert m.output_strides == [(1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8)]
    assert UNet(1, 3, 2).stage_features == [30, 60, 120, 240, 480]
    assert DEFAULT_MAX_FEATURES == {2: 480, 3: 320}


def test_reference_parameter_layout():
    """Parameter names and order as the reference Generic_UNet (its functional forward indexes
    them: 80 tensors at 4 poolings with DS, localization 0-31, context 32-71, tu 72-75, heads)."""
    m = UNet(1, 3)
    names = [n for n, _ in m.named_parameters()]
    assert len(names) == 80
    assert all(n.startswith("conv_blocks_localization.") for n in names[:32])
    assert all(n.startswith("conv_blocks_context.") for n in names[32:72])
    assert names[72:76] == [f"tu.{i}.weight" for i in range(4)]
    assert names[76:] == [f"seg_outputs.{i}.weight" for i in range(4)]
    assert names[:4] == [
        "conv_blocks_localization.0.0.blocks.0.conv.weight",
        "conv_blocks_localization.0.0.blocks.0.conv.bias",
        "conv_blocks_localization.0.0.blocks.0.instnorm.weight",
        "conv_blocks_localization.0.0.blocks.0.instnorm.bias",
    ]
    assert "conv_blocks_context.4.1.blocks.0.conv.weight" in names  # bottleneck: 2 stacks
    assert len(list(UNet(1, 3, num_pool=3, deep_supervision=False).parameters())) == 60


def test_layers_follow_the_reference():
    m = tiny(1, 3, 3, pool_kernel_sizes=ANISO)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv3d)]
    assert all(c.bias is None for c in m.seg_outputs)
    assert all(c.kernel_size == (1, 1, 1) for c in m.seg_outputs)
    body = [c for c in convs if all(c is not h for h in m.seg_outputs)]
    assert all(c.kernel_size == (3, 3, 3) and c.padding == (1, 1, 1) for c in body)
    assert all(c.bias is not None for c in body)
    # strided first conv of every stage after the first, stride = previous stage's pooling
    firsts = [m.conv_blocks_context[d].blocks[0].conv for d in range(3)]
    firsts.append(m.conv_blocks_context[3][0].blocks[0].conv)
    assert [c.stride for c in firsts] == [(1, 1, 1), *ANISO]
    assert len(m.td) == 0
    for u, t in enumerate(m.tu):
        assert isinstance(t, nn.ConvTranspose3d) and t.bias is None
        assert t.kernel_size == t.stride == ANISO[-(u + 1)]
    lrelus = [mod for mod in m.modules() if isinstance(mod, nn.LeakyReLU)]
    assert lrelus and all(r.negative_slope == 0.01 for r in lrelus)


def test_max_pool_variant():
    m = tiny(1, 2, 3, pool_kernel_sizes=ANISO, convolutional_pooling=False)
    assert [p.kernel_size for p in m.td] == ANISO
    assert all(c.stride == (1, 1, 1) for c in m.modules() if isinstance(c, nn.Conv3d))
    out = m(torch.randn(1, 1, 16, 16, 8))
    assert [o.shape[2:] for o in out] == [(16, 16, 8), (8, 8, 8), (4, 4, 4)]


def test_feature_cap():
    m = tiny(1, 2, 2, base_features=6, max_features=20, num_pool=4)
    assert m.stage_features == [6, 12, 20, 20, 20]
    ctx_out = [m.conv_blocks_context[d].blocks[-1].conv.out_channels for d in range(4)]
    ctx_out.append(m.conv_blocks_context[4][-1].blocks[-1].conv.out_channels)
    assert ctx_out == [6, 12, 20, 20, 20]
    assert [t.out_channels for t in m.tu] == [20, 20, 12, 6]
    assert [h.in_channels for h in m.seg_outputs] == [20, 20, 12, 6]
    assert max(p.shape[0] for p in m.parameters()) <= 20


def test_he_init_statistics():
    torch.manual_seed(1)
    m = UNet(2, 3, 3, base_features=8, max_features=32, num_pool=2)
    gain = math.sqrt(2.0 / (1 + 0.01**2))
    checked = 0
    for mod in m.modules():
        if isinstance(mod, (nn.Conv3d, nn.ConvTranspose3d)):
            w = mod.weight.detach()
            fan_in = w.shape[1] * math.prod(w.shape[2:])  # torch's fan_in, as kaiming_normal_
            if w.numel() >= 2000:
                assert abs(w.mean().item()) < 0.1 * gain / math.sqrt(fan_in)
                assert w.std().item() == pytest.approx(gain / math.sqrt(fan_in), rel=0.1)
                checked += 1
            if mod.bias is not None:
                assert torch.all(mod.bias == 0)
    assert checked >= 8


def test_instance_norm_affine():
    m = tiny(1, 2, 3, num_pool=2)
    norms = [mod for mod in m.modules() if isinstance(mod, nn.InstanceNorm3d)]
    convs = [c for c in m.modules() if isinstance(c, nn.Conv3d)]
    assert len(norms) == len(convs) - len(m.seg_outputs)  # one per body conv
    for n in norms:
        assert n.affine and n.eps == 1e-5 and not n.track_running_stats
        assert torch.all(n.weight == 1) and torch.all(n.bias == 0)
    m2 = tiny(1, 2, 2, num_pool=2)
    assert any(isinstance(mod, nn.InstanceNorm2d) and mod.affine for mod in m2.modules())


@pytest.mark.parametrize("nd,ds,conv_pool", [(3, True, True), (2, False, True), (3, True, False)])
def test_gradients_reach_every_parameter(nd, ds, conv_pool):
    m = tiny(1, 3, nd, num_pool=3, deep_supervision=ds, convolutional_pooling=conv_pool)
    x = torch.randn(2, 1, *([16] * nd))
    out = m(x)
    out = out if isinstance(out, list) else [out]
    loss = sum((o * torch.randn_like(o)).sum() for o in out)
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_odd_but_divisible_sizes():
    m2 = tiny(1, 2, 2, num_pool=4)
    out = m2(torch.randn(1, 1, 48, 80))  # bottleneck 3 x 5
    assert [tuple(o.shape[2:]) for o in out] == [(48, 80), (24, 40), (12, 20), (6, 10)]
    m3 = tiny(1, 2, 3, pool_kernel_sizes=[(2, 2, 1), (2, 2, 1)])
    out = m3(torch.randn(1, 1, 12, 20, 5))  # odd, unpooled last axis
    assert [tuple(o.shape[2:]) for o in out] == [(12, 20, 5), (6, 10, 5)]
    m4 = tiny(1, 2, 2, pool_kernel_sizes=[3, 2])
    out = m4(torch.randn(1, 1, 18, 30))
    assert [tuple(o.shape[2:]) for o in out] == [(18, 30), (6, 10)]


def test_indivisible_input_raises():
    m = tiny(1, 2, 3, pool_kernel_sizes=ANISO)  # divisor (8, 8, 4)
    assert m.input_divisor == (8, 8, 4)
    with pytest.raises(ValueError, match=r"\(16, 20, 8\).*\(8, 8, 4\).*axis 1.*20.*multiple of 8"):
        m(torch.randn(1, 1, 16, 20, 8))
    with pytest.raises(ValueError, match=r"axis 2 has size 6, which must be a multiple of 4"):
        m(torch.randn(1, 1, 16, 16, 6))
    with pytest.raises(ValueError, match="5-D input"):
        m(torch.randn(1, 16, 16, 8))
    with pytest.raises(ValueError, match="1 input channels"):
        m(torch.randn(1, 2, 16, 16, 8))


def test_bad_arguments():
    with pytest.raises(ValueError, match="spatial_dims"):
        UNet(1, 2, 4)
    with pytest.raises(ValueError, match="num_pool=3 disagrees"):
        UNet(1, 2, 3, num_pool=3, pool_kernel_sizes=[2, 2])
    with pytest.raises(ValueError, match=r"pool_kernel_sizes\[1\].*one entry per spatial axis"):
        UNet(1, 2, 3, pool_kernel_sizes=[2, (2, 2)])
    with pytest.raises(ValueError, match="must be odd"):
        UNet(1, 2, 2, num_pool=1, conv_kernel_sizes=[3, 4])
    with pytest.raises(ValueError, match="num_pool \\+ 1"):
        UNet(1, 2, 2, num_pool=2, conv_kernel_sizes=[3, 3])
    with pytest.raises(ValueError, match="num_convs_per_stage"):
        UNet(1, 2, 2, num_convs_per_stage=1)
    with pytest.raises(TypeError, match="deep_supervision"):
        task_generator(1, 2, 3, deep_supervision=True)
    with pytest.raises(ValueError, match="t must be"):
        task_generator(1, 0, 3)


def test_deep_supervision_switch():
    m = tiny(1, 3, 2, num_pool=3)
    x = torch.randn(1, 1, 16, 16)
    full = m(x)
    m.deep_supervision = False
    single = m(x)
    assert torch.equal(single, full[0])
    assert m.output_strides == [(1, 1)]
    g = task_generator(1, 2, 2, num_pool=3, base_features=4)
    g.deep_supervision = True
    with pytest.raises(RuntimeError, match="built without it"):
        g(x)


def test_task_generator():
    g = task_generator(2, 3, 3, base_features=4, max_features=16, pool_kernel_sizes=ANISO)
    assert isinstance(g, UNet) and len(g.seg_outputs) == 1
    out = g(torch.randn(2, 2, 16, 16, 8))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 16, 16, 8)


def test_reference_pool_rule():
    assert reference_pool_kernel_sizes([80, 80, 80]) == [(2, 2, 2)] * 4
    assert reference_pool_kernel_sizes([160, 160, 32], 3) == [(2, 2, 1), (2, 2, 2), (2, 2, 2)]


@pytest.mark.parametrize("nd,pools,size", [CASES[1], CASES[3]])
def test_output_strides_drive_context_labels(nd, pools, size):
    """The DS outputs and context_labels(levels=model.output_strides) have matching shapes, and
    the whole chain (generator -> labels -> loss on the seg net's outputs) is differentiable."""
    c, t, B = 2, 3, 2
    seg = tiny(1, c + t - 1, nd, pool_kernel_sizes=pools)
    gen = task_generator(1, t, nd, base_features=4, max_features=16, pool_kernel_sizes=pools)
    x = torch.randn(B, 1, *size)
    y = (torch.rand(B, *size) < 0.1).long()
    d = torch.rand(B, *size) * 50
    d[y > 0] = 0
    outs = seg(x)
    targets = context_labels(gen(x), y, d, num_classes=c, levels=seg.output_strides)
    assert len(targets) == len(outs) == len(pools)
    for o, tgt in zip(outs, targets, strict=True):
        assert tgt.shape == o.shape
    loss = sum(-(tgt * torch.log_softmax(o, 1)).mean() for o, tgt in zip(outs, targets,
                                                                       strict=True))
    loss.backward()
    assert all(p.grad is not None for p in gen.parameters())


def test_matches_functional_forward_by_parameter_index():
    """A functional forward that indexes the parameters by position, as the reference's
    ``functional_forward_trmode`` does (4 poolings of 2, DS): localization blocks 0-31, context
    32-71, transposed convs 72-75, heads 76-79; stride-2 first convs; outputs finest first."""
    import torch.nn.functional as F

    m = tiny(1, 3, 3, num_pool=4, inplace_nonlin=False)
    with torch.no_grad():  # non-trivial norm parameters
        for mod in m.modules():
            if isinstance(mod, nn.InstanceNorm3d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    P = [p for _, p in m.named_parameters()]

    def block(x, i, stride=1):
        x = F.conv3d(x, P[i], P[i + 1], stride=stride, padding=1)
        x = F.instance_norm(x, weight=P[i + 2], bias=P[i + 3], eps=1e-5)
        return F.leaky_relu(x, 0.01)

    x0 = torch.randn(2, 1, 32, 32, 16)
    x, skips = x0, []
    for s in range(5):  # 4 stages + bottleneck, 2 blocks each
        x = block(x, 32 + 8 * s, stride=1 if s == 0 else 2)
        x = block(x, 32 + 8 * s + 4)
        skips.append(x)
    outs = []
    for u in range(4):
        x = F.conv_transpose3d(x, P[72 + u], stride=2)
        x = torch.cat((x, skips[3 - u]), dim=1)
        x = block(x, 8 * u)
        x = block(x, 8 * u + 4)
        outs.append(F.conv3d(x, P[76 + u]))
    expected = outs[::-1]
    got = m(x0)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)

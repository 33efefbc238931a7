"""Targets of the baseline modes and the network plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from colabx.method.targets import FixedTargets, fit_intensity_clusters
from colabx.models.plan import auto_patch_size, pool_kernel_sizes


def _batch(shape=(2, 12, 10, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(shape, dtype=torch.long)
    y[:, 4:7, 3:6, 2:5] = 1
    d = torch.rand(shape, generator=g) * 60
    d[y > 0] = 0
    x = torch.randn((shape[0], 1, *shape[1:]), generator=g)
    return x, y, d


def test_vanilla_is_one_hot():
    x, y, d = _batch()
    (t,) = FixedTargets("vanilla", 2, 1, 1, 30.0, 20.0).targets(x, y, d)
    assert torch.equal(t, torch.nn.functional.one_hot(y, 2).movedim(-1, 1).float())


def test_dilation_is_one_minus_m_and_m():
    x, y, d = _batch()
    (t,) = FixedTargets("dilation", 2, 2, 1, 30.0, 20.0).targets(x, y, d)
    m = torch.where(d < 30, torch.ones_like(d), torch.exp((30 - d) / 20))
    bg = y == 0
    torch.testing.assert_close(t[:, 0][bg], (1 - m)[bg], atol=1e-6, rtol=0)
    torch.testing.assert_close(t[:, 2][bg], m[bg], atol=1e-6, rtol=0)
    assert torch.all(t[:, 1][~bg] == 1)


def test_manual_context_channels_and_levels():
    x, y, d = _batch((1, 8, 8, 8))
    ctx = torch.zeros_like(y)
    ctx[:, :4] = 1
    ctx[:, 6:] = 2
    out = FixedTargets("manual", 2, 3, [(1, 1, 1), (2, 2, 2)], 30.0, 20.0).targets(
        x, y, d, ctx)
    t = out[0]
    bg = y == 0
    assert torch.allclose(t[:, 2][bg], (ctx == 1)[bg].float(), atol=1e-6)
    assert torch.allclose(t[:, 3][bg], (ctx == 2)[bg].float(), atol=1e-6)
    assert torch.allclose(t[:, 0][bg], (ctx == 0)[bg].float(), atol=1e-6)
    assert out[1].shape == (1, 4, 4, 4, 4)
    with pytest.raises(ValueError, match="context"):
        FixedTargets("manual", 2, 3, 1, 30.0, 20.0).targets(x, y, d)


def test_manual_context_values_select_and_order_the_contexts():
    """``context_values=[3, 1]``: map value 3 is context 1, value 1 context 2, values 2 and 4
    (and any value beyond the table) context 0."""
    x, y, d = _batch((1, 10, 8, 8))
    ctx = torch.zeros_like(y)
    for v in range(1, 6):
        ctx[:, 2 * (v - 1):2 * v] = v  # 5 lies beyond the lookup table of values 1..3
    (t,) = FixedTargets("manual", 2, 3, 1, 30.0, 20.0, context_values=[3, 1]).targets(
        x, y, d, ctx)
    bg = y == 0
    want = {0: (ctx == 0) | (ctx == 2) | (ctx >= 4), 2: ctx == 3, 3: ctx == 1}
    for channel, mask in want.items():
        torch.testing.assert_close(t[:, channel][bg], mask[bg].float(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="context_values"):
        FixedTargets("manual", 2, 3, 1, 30.0, 20.0, context_values=[1])


def test_kmeans_clusters_by_intensity_inside_body():
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(-1, 0.05, 500), rng.normal(1, 0.05, 500)])
    centres = fit_intensity_clusters(v, 2)
    assert centres[0] == pytest.approx(-1, abs=0.02) and centres[1] == pytest.approx(1, abs=0.02)
    ft = FixedTargets("kmeans", 2, 2, 1, 30.0, 20.0, cluster_centres=centres,
                      body_threshold=-3.0)
    x = torch.tensor([[-5.0, -1.1, 0.9, 1.2]]).reshape(1, 1, 2, 2)
    assert ft.clusters(x[:, 0]).flatten().tolist() == [0, 0, 1, 1]
    y = torch.zeros((1, 2, 2), dtype=torch.long)
    (t,) = ft.targets(x, y, torch.full((1, 2, 2), 100.0))
    assert t[0, 2].flatten().round().tolist() == [0, 0, 1, 1]   # M = 1 everywhere
    with pytest.raises(ValueError, match="cluster_centres"):
        FixedTargets("kmeans", 2, 3, 1, 30.0, 20.0, cluster_centres=centres)


def test_pooling_plan_follows_spacing():
    k = pool_kernel_sizes([64, 64, 16], [1.5, 1.5, 4.0], num_pool=3)
    assert k == [[2, 2, 1], [2, 2, 2], [2, 2, 2]]
    assert pool_kernel_sizes([48, 48, 16], [1.5, 1.5, 3.0], num_pool=3) == \
        [[2, 2, 1], [2, 2, 2], [2, 2, 2]]
    assert pool_kernel_sizes([32, 32, 32], [1, 1, 1]) == [[2, 2, 2]] * 3
    assert pool_kernel_sizes([64, 48], [1.0, 1.0], num_pool=2) == [[2, 2], [2, 2]]
    with pytest.raises(ValueError, match="num_pool"):
        pool_kernel_sizes([16, 16, 16], [1, 1, 1], num_pool=4)


def test_auto_patch_size_fits_budget():
    p = auto_patch_size([200, 200, 60], [0.8, 0.8, 2.5], 64 ** 3)
    assert all(v % 8 == 0 for v in p) and np.prod(p) <= 64 ** 3
    assert auto_patch_size([20, 30, 10], [1, 1, 1], 64 ** 3) == [24, 32, 16]

"""The task generator's decoder upsampling: shapes, the checkerboard a kernel-2 stride-2
transposed conv leaves at initialisation (and linear upsampling does not), and checkpoints of
runs saved before the option existed."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from colabx.inference.analysis import neighbour_ratio
from colabx.models import task_generator
from colabx.models.plan import NetworkPlan, build_networks
from colabx.models.unet import LinearUpsampling

POOLS = [(2, 2, 1), (2, 2, 2), (2, 2, 2)]


@pytest.mark.parametrize("nd,pools,size", [(3, POOLS, (32, 24, 16)), (2, [(2, 2)] * 3,
                                                                      (24, 40))])
def test_linear_upsampling_shapes_and_gradients(nd, pools, size):
    g = task_generator(1, 3, nd, base_features=4, pool_kernel_sizes=pools, upsampling="linear")
    x = torch.randn(2, 1, *size, requires_grad=True)
    out = g(x)
    assert out.shape == (2, 3, *size)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.parameters())
    with pytest.raises(ValueError, match="upsampling must be one of"):
        task_generator(1, 2, nd, upsampling="cubic")


@pytest.mark.parametrize("nd,cin,cout,scale", [(3, 16, 8, (2, 2, 1)), (3, 8, 16, (2, 2, 2)),
                                                (2, 12, 5, (2, 2)), (3, 6, 6, (1, 2, 2))])
def test_linear_upsampling_is_interpolation_then_conv(nd, cin, cout, scale):
    """Whichever order it runs in (the 1x1 conv first when it narrows the channels), the module
    computes conv1x1(interpolate(x)), values and gradients, against float64."""
    torch.manual_seed(0)
    up = LinearUpsampling(cin, cout, scale, nd).double()
    x = torch.randn(2, cin, *[5 + i for i in range(nd)], dtype=torch.float64,
                    requires_grad=True)
    size = [n * k for n, k in zip(x.shape[2:], scale, strict=True)]
    mode = "trilinear" if nd == 3 else "bilinear"
    want = up.conv(torch.nn.functional.interpolate(x, size=size, mode=mode,
                                                   align_corners=False))
    got = up(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (x, up.conv.weight), w),
                    torch.autograd.grad(want, (x, up.conv.weight), w), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_transposed_generator_starts_as_a_checkerboard_and_linear_does_not():
    """On a smooth image, the softmax of a freshly initialised generator: with transposed convs
    neighbouring voxels differ more than voxels two apart along the axes pooled at every stage
    (mean ratio over seeds 0-2 measured 1.16 / 1.04, and 0.91 along the axis pooled twice), with
    linear upsampling they do not (0.62 / 0.63 / 0.77)."""
    rng = np.random.default_rng(0)
    image = ndi.gaussian_filter(rng.normal(size=(48, 48, 16)), 3.0).astype(np.float32)
    x = torch.from_numpy(image / image.std())[None, None]
    ratios = {}
    for mode in ("transposed", "linear"):
        per_seed = []
        for seed in range(3):
            torch.manual_seed(seed)
            g = task_generator(1, 2, 3, base_features=8, max_features=64,
                               pool_kernel_sizes=POOLS, upsampling=mode).eval()
            with torch.no_grad():
                per_seed.append(neighbour_ratio(torch.softmax(g(x)[0], 0)))
        ratios[mode] = np.mean(per_seed, axis=0)
    assert (ratios["transposed"][:2] > 1.0).all(), ratios
    assert (ratios["linear"] < 0.8).all() and (ratios["linear"] < ratios["transposed"]).all()


def test_plans_saved_before_the_option_build_transposed_generators():
    plan = dict(in_channels=1, num_classes=2, t=2, spatial_dims=3, patch_size=[16, 16, 8],
                pool_kernel_sizes=[[2, 2, 1], [2, 2, 2]], base_features=4, max_features=16,
                deep_supervision=True, with_generator=True)
    _, g = build_networks(NetworkPlan(**plan), torch.device("cpu"))
    assert isinstance(g.tu[0], torch.nn.ConvTranspose3d)
    _, g = build_networks(NetworkPlan(**plan, generator_upsampling="linear"),
                          torch.device("cpu"))
    assert not isinstance(g.tu[0], torch.nn.ConvTranspose3d)

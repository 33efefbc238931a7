"""onednn_convolutions: the same results as PyTorch's default dispatch, on oneDNN's kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from colabx.models import UNet, onednn_convolutions

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="PyTorch built without oneDNN")

# (batch, in channels, out channels, spatial, kernel, stride, groups, transposed)
CASES = [
    (1, 8, 8, (32, 32, 32), 3, 1, 1, False),   # batch 1 below ATen's threshold: padded
    (1, 1, 8, (17, 19, 21), 3, 1, 1, False),   # odd sizes, one input channel
    (2, 8, 16, (16, 15, 13), 3, 2, 1, False),  # strided, channels_last only
    (1, 16, 16, (8, 8, 8), 3, 1, 1, False),    # padded, 16 channels: no layout change
    (2, 32, 32, (8, 8, 8), 3, 1, 1, False),    # passes through unchanged
    (2, 16, 8, (12, 11, 10), 3, 1, 1, False),  # 16 -> 8: channels_last for the output's sake
    (1, 6, 4, (9, 10, 11), 1, 1, 1, False),    # 1x1x1: channels_last, no padding
    (1, 8, 8, (12, 12, 12), 3, 1, 2, False),   # grouped: ATen already uses oneDNN
    (1, 16, 8, (8, 8, 8), 2, 2, 1, True),      # the U-Net's upsampling
    (2, 30, 15, (5, 6, 7), 2, 2, 1, True),
]


def _conv(case, x, w, b):
    _, _, _, _, k, stride, groups, transposed = case
    if transposed:
        return F.conv_transpose3d(x, w, b, stride, 0, 0, groups)
    return F.conv3d(x, w, b, stride, k // 2, 1, groups)


def _inputs(case, seed):
    n, cin, cout, size, k, _, groups, transposed = case
    g = torch.Generator().manual_seed(seed)
    shape = (cin, cout // groups, k, k, k) if transposed else (cout, cin // groups, k, k, k)
    x = torch.randn(n, cin, *size, generator=g).requires_grad_()
    w = (torch.randn(shape, generator=g) * 0.2).requires_grad_()
    b = torch.randn(cout, generator=g).requires_grad_()
    return x, w, b


def _grads(case, x, w, b, routed: bool):
    with onednn_convolutions(routed):
        out = _conv(case, x, w, b)
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    return (out, *torch.autograd.grad(out, (x, w, b), up))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c}")
def test_same_output_and_gradients(case):
    x, w, b = _inputs(case, 0)
    ref = _grads(case, x, w, b, routed=False)
    got = _grads(case, x, w, b, routed=True)
    assert got[0].is_contiguous()
    for name, r, o in zip(("output", "grad x", "grad w", "grad b"), ref, got, strict=True):
        assert o.shape == r.shape, name
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4 * float(r.detach().abs().max()),
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_against_float64():
    """Both dispatches agree with a float64 recomputation (the routed one is no worse)."""
    case = CASES[0]
    x, w, b = _inputs(case, 1)
    exact = _conv(case, x.double(), w.double(), b.double())
    for routed in (False, True):
        with onednn_convolutions(routed):
            out = _conv(case, x, w, b)
        err = float((out.double() - exact).abs().max() / exact.abs().max())
        assert err < 1e-5, (routed, err)


def _profiled_kernels(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_batch1_runs_on_onednn():
    x, w, b = _inputs(CASES[0], 2)

    def step():
        with onednn_convolutions():
            F.conv3d(x, w, b, 1, 1).sum().backward()

    names = _profiled_kernels(step)
    assert "aten::mkldnn_convolution" in names
    assert not any(n.startswith("aten::slow_conv3d") for n in names), sorted(names)


@pytest.mark.parametrize(("cin", "cout", "relaid"), [(16, 8, True), (8, 16, True),
                                                    (16, 32, False), (32, 32, False)])
def test_layout_follows_both_channel_counts(cin, cout, relaid):
    """A batch-2 convolution is copied to channels_last_3d when its input or its output channel
    count is off oneDNN's 16-channel block, and passes through untouched otherwise."""
    x = torch.randn(2, cin, 6, 6, 6)
    w = torch.randn(cout, cin, 3, 3, 3)

    def run():
        with onednn_convolutions():
            F.conv3d(x, w, None, 1, 1)

    assert ("aten::clone" in _profiled_kernels(run)) == relaid


def test_double_backward():
    """The exact meta-gradient differentiates through the inner step's gradient."""
    case = CASES[0]
    x, w, b = _inputs(case, 3)

    def hvp(routed):
        with onednn_convolutions(routed):
            out = _conv(case, x, w, b)
            (gw,) = torch.autograd.grad(out.square().mean(), w, create_graph=True)
            return torch.autograd.grad(gw.sum(), (x, b))

    for r, o in zip(hvp(False), hvp(True), strict=True):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4 * float(r.detach().abs().max()))


@pytest.mark.parametrize("batch", [1, 2])
def test_unet_forward_backward(batch):
    """A whole U-Net forward + backward against a float64 recomputation. Outputs agree to
    float32 rounding. Weight gradients carry oneDNN's float32 summation order: PyTorch's own
    dispatch at batch 2 (oneDNN already) is 2e-3 of a tensor's largest entry from float64 here,
    its batch-1 unfold + GEMM kernel 5e-6; routed, batch 1 lands at 6e-4."""
    torch.manual_seed(0)
    net = UNet(1, 3, 3, base_features=8, num_pool=3)
    x = torch.randn(batch, 1, 32, 32, 32)

    def run(routed, dtype=torch.float32):
        net.to(dtype).zero_grad(set_to_none=True)
        with onednn_convolutions(routed):
            out = net(x.to(dtype))
        sum(o.square().mean() for o in out).backward()
        return [o.detach().double() for o in out] + [p.grad.double() for p in net.parameters()]

    exact = run(False, torch.float64)

    def errors(values):
        """Worst entry relative to its tensor's largest magnitude: (outputs, parameter
        gradients); the conv biases ahead of instance norms have zero gradient, left out."""
        rel = [float((v - e).abs().max() / e.abs().max())
               for v, e in zip(values, exact, strict=True) if float(e.abs().max()) > 1e-9]
        return max(rel[:3]), max(rel[3:])

    default, routed = errors(run(False)), errors(run(True))
    assert routed[0] < 1e-5, (routed, default)
    assert routed[1] < 5e-3, (routed, default)
    if batch == 2:
        assert routed[1] <= 2 * default[1], (routed, default)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_pass_through(dtype):
    x = torch.randn(1, 8, 8, 8, 8, dtype=dtype)
    w = torch.randn(8, 8, 3, 3, 3, dtype=dtype)
    with onednn_convolutions():
        got = F.conv3d(x, w, padding=1)
    assert torch.equal(got, F.conv3d(x, w, padding=1))


def test_nested_and_2d_untouched():
    x2 = torch.randn(1, 3, 20, 20)
    w2 = torch.randn(4, 3, 3, 3)
    with onednn_convolutions(), onednn_convolutions():
        got = F.conv2d(x2, w2, padding=1)
    assert torch.equal(got, F.conv2d(x2, w2, padding=1))


def test_decorator_scopes_the_mode():
    x, w, b = _inputs(CASES[0], 4)

    @onednn_convolutions()
    def forward():
        return F.conv3d(x, w, b, 1, 1)

    assert "aten::mkldnn_convolution" in _profiled_kernels(forward)
    after = _profiled_kernels(lambda: F.conv3d(x, w, b, 1, 1))
    assert "aten::mkldnn_convolution" not in after  # ATen's own choice again outside


def test_environment_variable_keeps_pytorchs_dispatch(monkeypatch):
    x, w, b = _inputs(CASES[0], 5)

    def routed():
        with onednn_convolutions():
            F.conv3d(x, w, b, 1, 1)

    monkeypatch.setenv("COLABX_CPU_CONVOLUTIONS", "pytorch")
    assert "aten::mkldnn_convolution" not in _profiled_kernels(routed)
    monkeypatch.setenv("COLABX_CPU_CONVOLUTIONS", "fast")
    with pytest.raises(ValueError, match="COLABX_CPU_CONVOLUTIONS='fast'"):
        routed()


# (module, input shape, affine): InstanceNorm without running statistics, 1D to 3D, odd sizes
NORM_CASES = [
    (torch.nn.InstanceNorm3d, (2, 8, 9, 10, 11), True),
    (torch.nn.InstanceNorm3d, (1, 3, 5, 4, 7), False),
    (torch.nn.InstanceNorm2d, (3, 5, 17, 13), True),
    (torch.nn.InstanceNorm1d, (2, 4, 19), True),
]


def _norm_grads(case, dtype, routed: bool, seed: int = 0):
    module, shape, affine = case
    g = torch.Generator().manual_seed(seed)
    norm = module(shape[1], affine=affine).to(dtype)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(torch.rand(shape[1], generator=g) + 0.5)
            norm.bias.copy_(torch.randn(shape[1], generator=g))
    x = (torch.randn(shape, generator=g) * 3 + 2).to(dtype).requires_grad_()
    with onednn_convolutions(routed):
        out = norm(x)
    up = torch.randn(shape, generator=g).to(dtype)
    return (out, *torch.autograd.grad(out, (x, *norm.parameters()), up))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", NORM_CASES, ids=lambda c: f"{c[0].__name__}{c[1]}")
def test_instance_norm_as_group_norm(case, dtype):
    """InstanceNorm inside the block: the outputs and the gradients of input, weight and bias
    of PyTorch's instance_norm (to rounding), computed by group_norm's kernels."""
    ref = _norm_grads(case, dtype, routed=False)
    got = _norm_grads(case, dtype, routed=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for r, o in zip(ref, got, strict=True):
        torch.testing.assert_close(o, r, rtol=tol, atol=tol * float(r.detach().abs().max()))
    kernels = _profiled_kernels(lambda: _norm_grads(case, dtype, routed=True))
    assert "aten::native_group_norm" in kernels
    assert "aten::native_batch_norm" not in kernels, sorted(kernels)


def test_instance_norm_double_backward():
    """The exact meta-gradient differentiates through the routed norm's backward."""
    x = torch.randn(2, 4, 6, 5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, dtype=torch.float64).add(0.5).requires_grad_()

    def second(routed):
        with onednn_convolutions(routed):
            out = F.instance_norm(x, weight=w, bias=None, eps=1e-5)
            (gx,) = torch.autograd.grad(out.pow(3).mean(), x, create_graph=True)
            return torch.autograd.grad(gx.square().sum(), (x, w))

    for r, o in zip(second(False), second(True), strict=True):
        torch.testing.assert_close(o, r, rtol=1e-9, atol=1e-12)


def test_instance_norm_with_running_stats_untouched():
    """Running statistics (updated in training, used in eval), a single voxel per channel
    (instance_norm's error) and other dtypes stay with PyTorch's instance_norm."""
    x = torch.randn(2, 3, 4, 5, 6)
    plain, routed = (torch.nn.InstanceNorm3d(3, track_running_stats=True) for _ in range(2))
    with onednn_convolutions():
        kernels = _profiled_kernels(lambda: routed(x))
        out = routed(x)
    assert "aten::native_group_norm" not in kernels
    plain(x)
    assert torch.equal(out, plain(x))
    torch.testing.assert_close(routed.running_mean, plain.running_mean)
    routed.eval()
    plain.eval()
    with onednn_convolutions():
        assert torch.equal(routed(x), plain(x))
    with onednn_convolutions(), pytest.raises(ValueError, match="more than 1 spatial element"):
        torch.nn.InstanceNorm3d(3)(torch.randn(2, 3, 1, 1, 1))
    xb = x.to(torch.bfloat16)  # dtypes other than float32/float64: PyTorch's own kernels
    with onednn_convolutions():
        assert "aten::native_group_norm" not in _profiled_kernels(lambda: F.instance_norm(xb))
        inside = F.instance_norm(xb)
    assert torch.equal(inside, F.instance_norm(xb))

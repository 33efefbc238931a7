"""The CUDA path's fallback to the pure-PyTorch twins, on any machine: without CUDA kernels the
ops route CUDA tensors to the twins and say so once per op."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from colabx import _backend
from colabx.ops import context_labels as ctx_op
from colabx.ops import dice_ce_loss as dce_op
from colabx.ops import roi_bce_loss as bce_op


def _fake_cuda(shape):
    """What the routing functions read of a CUDA tensor: its device, shape and dtype."""
    return SimpleNamespace(device=torch.device("cuda", 0), shape=torch.Size(shape),
                           dtype=torch.float32)


@pytest.fixture
def fresh_warnings():
    caches = (_backend._warn_fallback, _backend._cuda_unavailable_reason,
              _backend.cuda_kernels_available)
    for cached in caches:
        cached.cache_clear()
    yield
    for cached in caches:
        cached.cache_clear()


def test_without_kernels_cuda_tensors_go_to_the_twins_with_one_warning(monkeypatch,
                                                                       fresh_warnings):
    monkeypatch.setattr(_backend, "ext", lambda: SimpleNamespace(built_with_cuda=False,
                                                                 cuda_device_count=lambda: 0))
    z = _fake_cuda((2, 3, 8, 8))
    with pytest.warns(RuntimeWarning, match=r"colabx\.dice_ce_loss: colabx was built without "
                      r"CUDA kernels; rebuild .* Running the pure-PyTorch twin"):
        assert not dce_op._kernels_for(z, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per op
        assert not dce_op._kernels_for(z, 3)
    with pytest.warns(RuntimeWarning, match=r"colabx\.context_labels: "):
        assert not ctx_op._kernels_for(z, [1, 1, 1], 2)
    with pytest.warns(RuntimeWarning, match=r"colabx\.roi_bce_loss: "):
        assert not bce_op._kernels_for(z, 3)
    # CPU tensors always run the CPU kernels, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dce_op._kernels_for(torch.zeros(2, 3, 8, 8), 3)
        assert ctx_op._kernels_for(torch.zeros(2, 3, 8, 8), [1, 1, 1], 2)


def test_a_gpu_older_than_the_built_architectures_goes_to_the_twins(monkeypatch, fresh_warnings):
    built = SimpleNamespace(built_with_cuda=True, cuda_device_count=lambda: 2,
                            cuda_kernels_run_on=lambda device: device == 1,
                            cuda_architectures="80,90")
    monkeypatch.setattr(_backend, "ext", lambda: built)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 5))
    with pytest.warns(RuntimeWarning, match=r"colabx\.dice_ce_loss: colabx's CUDA kernels were "
                      r"built for architectures 80,90, none of which cuda:0 \(compute capability "
                      r"7\.5\) can run; rebuild from source with COLABX_CUDA_ARCHS=75"):
        assert not dce_op._kernels_for(_fake_cuda((2, 3, 8, 8)), 3)
    assert not _backend.cuda_kernels_available(0)
    # the device that can run them does
    on_1 = SimpleNamespace(device=torch.device("cuda", 1), shape=torch.Size((2, 3, 8, 8)),
                           dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.use_cuda_kernels(on_1, "dice_ce_loss")
    assert _backend.cuda_kernels_available(1) and _backend.cuda_kernels_available()


def test_a_driver_too_old_for_the_runtime_is_named(monkeypatch, fresh_warnings):
    built = SimpleNamespace(
        built_with_cuda=True, cuda_device_count=lambda: 0, cuda_runtime_version=13000,
        cuda_device_count_error=lambda: "CUDA driver version is insufficient for CUDA runtime "
                                        "version")
    monkeypatch.setattr(_backend, "ext", lambda: built)
    with pytest.warns(RuntimeWarning, match=r"colabx's CUDA runtime sees no device \(CUDA driver "
                      r"version is insufficient .*\); its kernels were built with CUDA 13\.0, "
                      r".* update the NVIDIA driver"):
        assert not dce_op._kernels_for(_fake_cuda((2, 3, 8, 8)), 3)


def test_with_kernels_no_warning(monkeypatch, fresh_warnings):
    monkeypatch.setattr(_backend, "_cuda_unavailable_reason", lambda device: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.use_cuda_kernels(torch.zeros(1), "dice_ce_loss")
        assert ctx_op._kernels_for(_fake_cuda((2, 3, 8, 8)), [1, 1, 1, 2, 2, 2], 2)


def test_the_extension_names_the_architectures_it_was_built_for():
    ext = _backend.ext()
    archs = ext.cuda_architectures.split(",") if ext.cuda_architectures else []
    assert bool(archs) == ext.built_with_cuda
    assert all(a.split("-")[0].isdigit() for a in archs)


def test_sizes_past_the_cuda_limits_go_to_the_twins(monkeypatch, fresh_warnings):
    """A batch over 65535 (the kernels run items along gridDim.y) or an EDT axis past the
    kernels' limits runs the twin instead of failing at launch; the limits come from the
    extension, which reports them in every build."""
    from colabx.ops import distance_transform as edt_op

    monkeypatch.setattr(_backend, "_cuda_unavailable_reason", lambda device: None)
    for b, expected in ((65535, True), (65536, False)):
        assert dce_op._kernels_for(_fake_cuda((b, 3, 4, 4)), 3, 2) is expected
        assert bce_op._kernels_for(_fake_cuda((b, 3, 4, 4)), 3) is expected
        assert ctx_op._kernels_for(_fake_cuda((b, 2, 4, 4)), [1, 1, 1], 2) is expected
    for spatial, expected in (((65535, 8), True), ((65536, 8), False), ((8, 2**28), True),
                              ((8, 2**28 + 1), False), ((65535, 4, 4), True),
                              ((4, 65536, 4), False), ((65536, 4, 4), False)):
        assert edt_op._cuda_kernels_for(_fake_cuda((1, *spatial))) is expected, spatial

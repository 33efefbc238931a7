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
    _backend._warn_fallback.cache_clear()
    yield
    _backend._warn_fallback.cache_clear()


def test_without_kernels_cuda_tensors_go_to_the_twins_with_one_warning(monkeypatch,
                                                                       fresh_warnings):
    monkeypatch.setattr(_backend, "cuda_kernels_available", lambda: False)
    z = _fake_cuda((2, 3, 8, 8))
    with pytest.warns(RuntimeWarning, match=r"colabx\.dice_ce_loss: colabx was built without "
                      r"CUDA kernels .* running the pure-PyTorch twin"):
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


def test_with_kernels_no_warning(monkeypatch, fresh_warnings):
    monkeypatch.setattr(_backend, "cuda_kernels_available", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.use_cuda_kernels(torch.zeros(1), "dice_ce_loss")
        assert ctx_op._kernels_for(_fake_cuda((2, 3, 8, 8)), [1, 1, 1, 2, 2, 2], 2)

"""Faster U-Net layers on the CPU: :func:`onednn_convolutions` (3D convolutions on oneDNN's fast
paths, and InstanceNorm computed as GroupNorm).

PyTorch's CPU dispatch (ATen's ``ConvParams::use_mkldnn``) sends a float32 convolution with
batch 1, one group and a kernel of at most 3 on its last two axes to oneDNN only when
``N·C·D·H > 20480``, a threshold chosen for 2D images. Below it, which is every layer of a
CoLab U-Net on per-sample patches (8 features at 32³: 8·32·32 = 8192), the convolution runs
the unfold + GEMM kernel ``slow_conv3d``. And oneDNN's plain ``ncdhw`` kernels are slow when the
input or output channel count is not a multiple of its 16-channel blocks, where its ``ndhwc``
(``channels_last_3d``) kernels are not (a decoder's 16 → 8 convolution included: routing on the
output channels as well took the CPU preset's U-Net from 35.3 to 33.7 ms forward + backward at
batch 2, and its task generator from 40.2 to 36.7 ms; 2 threads, medians of 8 interleaved
rounds).

Measured on this project's 2-core AVX-512 VM, torch 2.13, one thread, process CPU time (the
numbers are in ``benchmarks/RESULTS.md``): a 3×3×3 convolution 8 → 8 channels at 32³ takes
47 ms forward + backward at batch 1, 40 ms at batch 2 and 9.7 ms at batch 2 in
``channels_last_3d``; the U-Net of ``colabx train``'s CPU preset (8 features, 3 pools) 310 ms
forward + backward at batch 1 and 132 ms at batch 2 by default, 96 ms and 100 ms inside
:func:`onednn_convolutions`.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["disable_onednn_convolutions", "enable_onednn_convolutions", "onednn_convolutions"]

# ATen's batch-1 threshold on N·C·D·H below which use_mkldnn() declines a float32 convolution.
_ATEN_BATCH1_ELEMENTS = 20480
_ONEDNN_CHANNEL_BLOCK = 16
_GROUPS_ARG = 6  # position of ``groups`` in both conv3d and conv_transpose3d
_active = threading.local()


def _routed(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 5
            and not x.is_mkldnn and not torch.is_autocast_enabled("cpu"))


def _instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                   use_input_stats=True, momentum=0.1, eps=1e-5):
    """``F.instance_norm`` (same signature); on a float32 or float64 CPU input normalised by its
    own statistics, with no running statistics to update, as ``F.group_norm`` with one group
    per channel (module docstring)."""
    if (isinstance(input, torch.Tensor) and input.device.type == "cpu"
            and input.dtype in (torch.float32, torch.float64) and input.dim() >= 3
            and use_input_stats
            and running_mean is None and running_var is None
            and math.prod(input.shape[2:]) > 1  # instance_norm's own error for one voxel
            and not torch.is_autocast_enabled("cpu")):
        return F.group_norm(input, input.shape[1], weight, bias, eps)
    return F.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats,
                           momentum, eps)


class _OneDNNConvolutions(TorchFunctionMode):
    """Rewrites ``conv3d`` / ``conv_transpose3d`` calls on CPU float32 inputs: a batch-1 input
    that ATen would send to ``slow_conv3d`` is run as batch 2 with a zero second sample (its
    output and gradients discarded, so the first sample's are unchanged), and a convolution
    whose input or output channel count is not a multiple of 16 runs in ``channels_last_3d``
    (the output is returned contiguous). ``F.instance_norm`` calls (``nn.InstanceNorm*d``) go
    through :func:`_instance_norm`. Anything else passes through unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.instance_norm and not torch.compiler.is_compiling():
            return _instance_norm(*args, **kwargs)
        if (func not in (torch.conv3d, torch.conv_transpose3d) or len(args) < 2
                or torch.compiler.is_compiling()):  # (input and weight by keyword: left alone)
            return func(*args, **kwargs)
        x, weight = args[0], args[1]
        if not isinstance(x, torch.Tensor) or not _routed(x):
            return func(*args, **kwargs)
        groups = args[_GROUPS_ARG] if len(args) > _GROUPS_ARG else kwargs.get("groups", 1)
        kernel = weight.shape[-3:]
        pad = (x.shape[0] == 1 and groups == 1 and any(k != 1 for k in kernel)
               and not (kernel[-1] > 3 and kernel[-2] > 3)
               and x.shape[1] * x.shape[2] * x.shape[3] <= _ATEN_BATCH1_ELEMENTS)
        out_channels = (weight.shape[1] * groups if func is torch.conv_transpose3d
                        else weight.shape[0])
        channels_last = (x.shape[1] % _ONEDNN_CHANNEL_BLOCK != 0
                         or out_channels % _ONEDNN_CHANNEL_BLOCK != 0)
        if not (pad or channels_last):
            return func(*args, **kwargs)
        if pad:
            x = torch.cat([x, x.new_zeros(()).expand_as(x)])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        out = func(x, *args[1:], **kwargs)
        if pad:
            out = out[:1]
        return out.contiguous()


#: Environment variable that chooses the CPU convolution dispatch everywhere colabx would
#: route it: ``onednn`` (default) or ``pytorch`` (PyTorch's own choice; measured on AVX-512,
#: the routing may not pay on every CPU).
ENV_VAR = "COLABX_CPU_CONVOLUTIONS"


def _available() -> bool:
    choice = os.environ.get(ENV_VAR, "onednn")
    if choice not in ("onednn", "pytorch"):
        raise ValueError(f"{ENV_VAR}={choice!r}: expected onednn or pytorch")
    return (choice == "onednn" and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled)


@contextlib.contextmanager
def onednn_convolutions(enabled: bool = True) -> Iterator[None]:
    """Within the block, 3D convolutions (``conv3d``, ``conv_transpose3d``, and so
    ``nn.Conv3d`` / ``nn.ConvTranspose3d``) of float32 CPU tensors run on oneDNN's fast paths,
    and InstanceNorm of CPU tensors (``nn.InstanceNorm1d/2d/3d`` without running statistics)
    as GroupNorm, as described in the module docstring. Outputs equal the default dispatch's up
    to float32 rounding; weight gradients carry oneDNN's float32 summation order, as PyTorch's own
    dispatch does at batch >= 2; double backward works. GPU tensors, convolutions of other
    dtypes, CPU autocast and code under ``torch.compile`` are left alone.

    Every torch call in the block passes through the mode's Python handler (microseconds),
    so callers enable it for CPU work only (``enabled=device.type == "cpu"``); with
    ``enabled=False``, ``COLABX_CPU_CONVOLUTIONS=pytorch`` in the environment, or PyTorch built
    without oneDNN, the block runs without the mode. It
    applies to the calling thread; nested uses are one. Also usable as a decorator."""
    if not enabled or getattr(_active, "on", False) or not _available():
        yield
        return
    _active.on = True
    try:
        with _OneDNNConvolutions():
            yield
    finally:
        _active.on = False


def enable_onednn_convolutions() -> bool:
    """:func:`onednn_convolutions` for the rest of the calling thread's life, for code whose
    training loop colabx cannot wrap (:func:`colabx.compat.apply_to_reference`). Returns
    whether the mode is now on (False without oneDNN); calling it again changes nothing."""
    if getattr(_active, "on", False):
        return True
    if not _available():
        return False
    _active.mode = _OneDNNConvolutions()
    _active.mode.__enter__()  # exited by disable_onednn_convolutions() only
    _active.on = True
    return True


def disable_onednn_convolutions() -> None:
    """Undo :func:`enable_onednn_convolutions` in the calling thread (nothing if it is off).
    Call it outside any torch function mode entered after the enable."""
    mode = getattr(_active, "mode", None)
    if mode is not None:
        mode.__exit__(None, None, None)
        _active.mode = None
        _active.on = False

"""ROI one-vs-all binary cross-entropy fused with the softmax: CoLab's meta loss L_ROI
(docs/design.md, "Op 3").

One ``torch.autograd.Function`` is the op's autograd path, eager and under ``torch.compile``
(:mod:`colabx.ops._kernels`); under compile it reaches the kernels through the kernel-only
custom ops ``colabx::roi_bce_loss_fwd`` / ``colabx::roi_bce_loss_bwd``. CPU tensors run colabx's
threaded C++ kernels, CUDA tensors its CUDA kernels when the extension says they take the call
(else the pure-PyTorch twin in :mod:`colabx.twins.roi_bce_loss`). The CUDA workspace is sized
by the extension.
"""

import math
from collections.abc import Sequence
from typing import List

import torch
from torch import Tensor

from colabx import _backend
from colabx._precision import accumulation_dtype
from colabx.ops import _checks
from colabx.ops._kernels import first_order_only, kernel_call
from colabx.twins import roi_bce_loss as _twin

__all__ = ["roi_bce_loss"]

_OP = "roi_bce_loss"


def _kernels_for(t: Tensor, k: int) -> bool:
    """Whether colabx's kernels take this call (the CPU kernels take any K; the CUDA kernels'
    limits are the extension's to answer); if not, the public function runs the twin."""
    if t.device.type == "cpu":
        return True
    return (t.device.type == "cuda" and _backend.use_cuda_kernels(t, _OP)
            and bool(_backend.ext().roi_bce_loss_cuda_supported(k, t.shape[0])))


def _forward_kernels(logits: Tensor, labels: Tensor, roi_channels: List[int]) -> Tensor:
    b, k = logits.shape[0], logits.shape[1]
    v = math.prod(logits.shape[2:])
    z, lab = logits.contiguous(), labels.contiguous()
    loss = torch.empty((), dtype=accumulation_dtype(z.dtype), device=z.device)
    _C = _backend.ext()
    args = (z.data_ptr(), lab.data_ptr(), _backend.dtype_code(z), _backend.dtype_code(lab), b, k,
            v, roi_channels, loss.data_ptr())
    if z.device.type == "cpu":
        _C.roi_bce_loss_forward_cpu(*args, _backend.num_threads())
    else:
        work = torch.empty(_C.roi_bce_loss_cuda_workspace_size(b, v), dtype=torch.float64,
                           device=z.device)
        _C.roi_bce_loss_forward_cuda(*args, work.data_ptr(), z.device.index,
                                     _backend.stream_of(z))
    return loss


_forward_op = torch.library.custom_op("colabx::roi_bce_loss_fwd", _forward_kernels,
                                      mutates_args=())


@_forward_op.register_fake
def _(logits, labels, roi_channels):
    return logits.new_empty((), dtype=accumulation_dtype(logits.dtype))


def _backward_kernels(grad: Tensor, logits: Tensor, labels: Tensor,
                      roi_channels: List[int]) -> Tensor:
    b, k = logits.shape[0], logits.shape[1]
    v = math.prod(logits.shape[2:])
    z, lab, grad = logits.contiguous(), labels.contiguous(), grad.contiguous()
    gz = torch.empty_like(z)
    _C = _backend.ext()
    args = (grad.data_ptr(), z.data_ptr(), lab.data_ptr(), _backend.dtype_code(z),
            _backend.dtype_code(lab), b, k, v, roi_channels, gz.data_ptr())
    if z.device.type == "cpu":
        _C.roi_bce_loss_backward_cpu(*args, _backend.num_threads())
    else:
        _C.roi_bce_loss_backward_cuda(*args, z.device.index, _backend.stream_of(z))
    return gz


_backward_op = torch.library.custom_op("colabx::roi_bce_loss_bwd", _backward_kernels,
                                       mutates_args=())


@_backward_op.register_fake
def _(grad, logits, labels, roi_channels):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


class _RoiBCE(torch.autograd.Function):
    """The op's autograd: ``apply(logits, labels, roi_channels)``, differentiable w.r.t.
    ``logits``."""

    @staticmethod
    def forward(ctx, logits, labels, roi_channels):
        ctx.roi = roi_channels
        ctx.save_for_backward(logits, labels)
        return kernel_call(_forward_op, _forward_kernels, logits, labels, roi_channels)

    @staticmethod
    @first_order_only("roi_bce_loss", "colabx.twins.roi_bce_loss.roi_bce_loss")
    def backward(ctx, grad_loss):
        logits, labels = ctx.saved_tensors
        return kernel_call(_backward_op, _backward_kernels, grad_loss, logits, labels,
                           ctx.roi), None, None


def roi_bce_loss(logits: Tensor, labels: Tensor, roi_channels: Sequence[int], *,
                 validate: bool = True) -> Tensor:
    r"""ROI one-vs-all binary cross-entropy (CoLab's meta loss L_ROI), fused with the softmax.

    With ``p = softmax(logits, dim=1)`` over all K channels (float32; float64 for float64 logits)
    and ``y_j = [labels == j]``::

        loss = -(1/(B·V)) Σ_voxels Σ_{j ∈ roi_channels} [y_j log(p_j + 1e-6)
                                                         + (1 - y_j) log(1 - p_j + 1e-6)]

    Parameters
    ----------
    logits : Tensor
        ``[B, K, *S]`` (2D or 3D), float32/float16/bfloat16/float64, ``K >= 2``.
    labels : Tensor
        Integer labels ``[B, *S]`` (or ``[B, 1, *S]``) in ``0..K-1``.
    roi_channels : sequence of int
        Distinct channels in ``0..K-1`` (the ROI classes, ``1..c-1`` in CoLab's layout).
    validate : bool
        Check label values (a pass over the labels and, on CUDA, a host sync).

    Returns
    -------
    Tensor
        0-dim loss, float32 (float64 for float64 logits), differentiable w.r.t. ``logits``.
    """
    _checks.check_tensor(logits, "logits")
    _checks.check_tensor(labels, "labels")
    _checks.check_floating(logits, "logits")
    _checks.check_ndim(logits, "logits", (4, 5), "[B, K, H, W] or [B, K, D, H, W]")
    k = logits.shape[1]
    if k < 2:
        raise ValueError(f"logits must have K >= 2 channels, got shape {tuple(logits.shape)}")
    if logits.numel() == 0:
        raise ValueError(f"logits must not be empty, got shape {tuple(logits.shape)}")
    _checks.check_same_device(logits=logits, labels=labels)
    lab = _checks.prepare_labels(labels, logits, "labels", "logits")
    if validate:
        _checks.check_label_range(lab, k, "labels")
    roi = _checks.check_channels(roi_channels, k, "roi_channels")
    if not _kernels_for(logits, k):
        return _twin.roi_bce_loss(logits, lab, roi)
    return _RoiBCE.apply(logits, lab, roi)

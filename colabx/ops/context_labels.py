"""CoLab context labels: label aggregation + soft distance mask (docs/design.md, "Op 1"), fused.

One ``torch.autograd.Function`` is the op's autograd path, eager and under ``torch.compile``
(:mod:`colabx.ops._kernels`); under compile it reaches the kernels through the kernel-only
custom ops ``colabx::context_labels_fwd`` / ``colabx::context_labels_bwd``. CPU tensors run
colabx's C++ kernels, CUDA tensors its CUDA kernels when the extension says they take the call
(``_C.context_labels_cuda_supported``), else the pure-PyTorch twin.
"""

import math
import numbers
from collections.abc import Sequence
from typing import List, Optional

import numpy as np
import torch

from colabx import _backend
from colabx._precision import accumulation_dtype
from colabx.ops import _checks
from colabx.ops._kernels import first_order_only, kernel_call
from colabx.twins.context_labels import (
    LevelsArg,
    context_labels_twin,
    normalize_levels,
)

_OP = "context_labels"


def level_shapes(shape: Sequence[int], strides: Sequence[int]) -> list[tuple[int, ...]]:
    """Spatial shape of each level: ``shape`` divided (floor) by the level's stride;
    ``strides`` holds 3 values (z, y, x) per level, 2D inputs use the last two."""
    nsp = len(shape)
    out = []
    for i in range(len(strides) // 3):
        s = strides[3 * i + 3 - nsp : 3 * i + 3]
        out.append(tuple(n // v for n, v in zip(shape, s, strict=True)))
    return out


def _kernel_args(o: torch.Tensor, num_classes: int, strides: Sequence[int]) -> tuple:
    return (o.shape[0], o.shape[1], num_classes, list(o.shape[2:]), list(strides))


def _kernels_for(o: torch.Tensor, strides: Sequence[int], num_classes: int) -> bool:
    """Whether colabx's kernels take this call; if not, the public function runs the twin (a
    plain differentiable PyTorch graph). The CUDA kernels' limits (t, tile geometry, shared
    memory) are the extension's to answer."""
    if o.device.type == "cpu":
        return True
    if o.device.type != "cuda" or not _backend.use_cuda_kernels(o, _OP):
        return False
    elem = 8 if o.dtype == torch.float64 else 4
    return bool(_backend.ext().context_labels_cuda_supported(
        *_kernel_args(o, num_classes, strides), elem))


def _forward_kernels(gen_logits: torch.Tensor, labels: torch.Tensor, distance: torch.Tensor,
                     num_classes: int, margin: float, tau: float, strides: List[int],
                     with_mask: bool) -> List[torch.Tensor]:
    """Per-level labels (then per-level masks when ``with_mask``) from the kernels. Inputs
    contiguous; distance already in the accumulation dtype."""
    o = gen_logits
    B, t = o.shape[0], o.shape[1]
    K = num_classes + t - 1
    acc = accumulation_dtype(o.dtype)
    shapes = level_shapes(o.shape[2:], strides)
    outs = [torch.empty((B, K, *s), dtype=acc, device=o.device) for s in shapes]
    masks = [torch.empty((B, *s), dtype=acc, device=o.device) for s in shapes] if with_mask else []
    if B == 0:
        return outs + masks
    _C = _backend.ext()
    args = (
        *_kernel_args(o, num_classes, strides),
        o.data_ptr(), _backend.dtype_code(o), labels.data_ptr(), _backend.dtype_code(labels),
        distance.data_ptr(), [x.data_ptr() for x in outs], [x.data_ptr() for x in masks],
        float(margin), float(tau),
    )
    if o.device.type == "cuda":
        _C.context_labels_forward_cuda(*args, o.device.index, _backend.stream_of(o))
    else:
        _C.context_labels_forward_cpu(*args, _backend.num_threads())
    return outs + masks


_forward_op = torch.library.custom_op("colabx::context_labels_fwd", _forward_kernels,
                                      mutates_args=())


@_forward_op.register_fake
def _(gen_logits, labels, distance, num_classes, margin, tau, strides, with_mask):
    B, t = gen_logits.shape[0], gen_logits.shape[1]
    K = num_classes + t - 1
    acc = accumulation_dtype(gen_logits.dtype)
    shapes = level_shapes(gen_logits.shape[2:], strides)
    outs = [gen_logits.new_empty((B, K, *s), dtype=acc) for s in shapes]
    masks = [gen_logits.new_empty((B, *s), dtype=acc) for s in shapes] if with_mask else []
    return outs + masks


def _backward_kernels(grads: List[Optional[torch.Tensor]], gen_logits: torch.Tensor,
                      labels: torch.Tensor, distance: torch.Tensor, num_classes: int,
                      margin: float, tau: float, strides: List[int]) -> torch.Tensor:
    """Gradient w.r.t. the generator logits from one incoming gradient per level (None = 0)."""
    o = gen_logits
    acc = accumulation_dtype(o.dtype)
    grads = [None if g is None else g.to(acc).contiguous() for g in grads]
    grad_o = torch.empty_like(o)
    if o.shape[0] == 0:
        return grad_o
    _C = _backend.ext()
    args = (
        *_kernel_args(o, num_classes, strides),
        [0 if g is None else g.data_ptr() for g in grads],
        o.data_ptr(), _backend.dtype_code(o), labels.data_ptr(), _backend.dtype_code(labels),
        distance.data_ptr(), grad_o.data_ptr(), float(margin), float(tau),
    )
    if o.device.type == "cuda":
        _C.context_labels_backward_cuda(*args, o.device.index, _backend.stream_of(o))
    else:
        _C.context_labels_backward_cpu(*args, _backend.num_threads())
    return grad_o


_backward_op = torch.library.custom_op("colabx::context_labels_bwd", _backward_kernels,
                                       mutates_args=())


@_backward_op.register_fake
def _(grads, gen_logits, labels, distance, num_classes, margin, tau, strides):
    return torch.empty_like(gen_logits)


class _ContextLabels(torch.autograd.Function):
    """The op's autograd: per-level labels and masks (masks without gradient); the backward
    skips levels whose gradient is None."""

    @staticmethod
    def forward(ctx, o, y, d, num_classes, margin, tau, strides, with_mask):
        res = kernel_call(_forward_op, _forward_kernels, o, y, d, num_classes, margin, tau,
                          strides, with_mask)
        ctx.params = (num_classes, margin, tau, strides)
        ctx.nlev = len(strides) // 3
        ctx.save_for_backward(o, y, d)
        ctx.mark_non_differentiable(*res[ctx.nlev :])
        ctx.set_materialize_grads(False)  # unused levels arrive as None: the kernel skips them
        return tuple(res)

    @staticmethod
    @first_order_only("context_labels", "colabx.twins.context_labels.context_labels_twin")
    def backward(ctx, *grads):
        o, y, d = ctx.saved_tensors
        level_grads = list(grads[: ctx.nlev])
        if all(g is None for g in level_grads):
            return None, None, None, None, None, None, None, None
        grad_o = kernel_call(_backward_op, _backward_kernels, level_grads, o, y, d, *ctx.params)
        return grad_o, None, None, None, None, None, None, None


def context_labels(
    gen_logits: torch.Tensor,
    labels: torch.Tensor,
    distance: torch.Tensor,
    num_classes: int,
    margin: float = 30.0,
    tau: float = 20.0,
    levels: LevelsArg = 1,
    return_mask: bool = False,
    validate: bool = True,
):
    """CoLab expanded soft labels from task-generator logits (paper eqs. 4-9; docs/design.md,
    "Op 1").

    Parameters
    ----------
    gen_logits : Tensor, shape ``[B, t, *S]``, float32/float16/bfloat16/float64
        Task-generator logits, ``t >= 1`` context channels; ``*S`` is ``(H, W)`` or ``(D, H, W)``.
        q = softmax over the ``t`` channels (computed in float32, float64 for float64 input).
    labels : Tensor, shape ``[B, *S]``, uint8/bool/int32/int64
        0 = background, ``1..num_classes-1`` = ROI classes.
    distance : Tensor, shape ``[B, *S]``, float
        Distance to the ROI (0 inside, ``+inf`` when the item has no ROI; any real values).
    num_classes : int
        ``c >= 2``, background included.
    margin, tau : float
        Soft mask ``M = 1 if d < margin else exp((margin - d) / tau)``; ``tau > 0`` (and not
        0 once rounded to float32).
    levels : int or sequence
        ``n`` -> ``n`` deep-supervision levels with isotropic strides ``2**k``; or a sequence of
        per-level strides (int or per-axis tuple), non-decreasing, each dividing the next.
        Level ``l`` has size ``floor(S / s_l)`` and uses ``q_l`` = avg-pool of q over the cell,
        ``M_l`` = min-pool of M, ``y_l`` = y at ``r*s + s//2`` per axis; ``M_l = 1`` where
        ``y_l > 0``.
    return_mask : bool
        Also return the per-level masks ``M_l`` (``[B, *S_l]``, no gradient).
    validate : bool
        Check label range and NaN distances (one pass over the data, a host sync on CUDA).

    Returns
    -------
    Tensor ``[B, K, *S_l]`` with ``K = num_classes + t - 1`` (float32; float64 for float64
    logits), channels ``[0]`` = context 0 (``M q_0 + 1 - M``), ``[1..c-1]`` = ROI one-hot,
    ``[c..c+t-2]`` = contexts 1..t-1 (``M q_k``); ROI voxels are one-hot. A list (finest first)
    when ``levels`` is not the int 1. With ``return_mask``: ``(labels, masks)`` of the same
    structure. Differentiable w.r.t. ``gen_logits`` only.
    """
    _checks.check_tensor(gen_logits, "gen_logits")
    _checks.check_tensor(labels, "labels")
    _checks.check_tensor(distance, "distance")
    _checks.check_floating(gen_logits, "gen_logits")
    _checks.check_floating(distance, "distance")
    _checks.check_labels(labels, "labels")
    _checks.check_ndim(gen_logits, "gen_logits", (4, 5), "[B, t, H, W] or [B, t, D, H, W]")
    _checks.check_same_device(gen_logits=gen_logits, labels=labels, distance=distance)
    B, t = gen_logits.shape[0], gen_logits.shape[1]
    spatial = tuple(gen_logits.shape[2:])
    if t < 1:
        raise ValueError(
            f"gen_logits must have t >= 1 channels, got shape {tuple(gen_logits.shape)}"
        )
    expected = (B, *spatial)
    desc = f"gen_logits of shape {tuple(gen_logits.shape)}"
    _checks.check_ndim(labels, "labels", (gen_logits.dim() - 1,), "[B, *S] matching gen_logits")
    _checks.check_shape(labels, "labels", expected, desc)
    _checks.check_ndim(distance, "distance", (gen_logits.dim() - 1,), "[B, *S] matching gen_logits")
    _checks.check_shape(distance, "distance", expected, desc)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background included), got {num_classes}")
    for name, v in (("margin", margin), ("tau", tau)):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if tau <= 2.0 ** -150:  # the kernels divide by it in float32, where it would round to 0
        raise ValueError(f"tau must be > 0 in float32, got {tau}, which rounds to 0")
    margin, tau = float(margin), float(tau)
    strides = normalize_levels(levels, spatial)
    if validate and labels.numel() > 0 and labels.dtype != torch.bool:
        lo_t, hi_t = torch.aminmax(labels)
        lo, hi = int(lo_t), int(hi_t)
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"labels must lie in [0, num_classes={num_classes}), got values in [{lo}, {hi}]"
            )
    if validate and bool(torch.isnan(distance).any()):
        raise ValueError("distance contains NaN")

    flat_strides = []
    for s in strides:
        flat_strides += [1] * (3 - len(s)) + list(s)
    if not _kernels_for(gen_logits, flat_strides, num_classes):
        return context_labels_twin(
            gen_logits, labels, distance, num_classes, margin, tau,
            strides if not (isinstance(levels, int) and levels == 1) else 1, return_mask,
        )
    acc = accumulation_dtype(gen_logits.dtype)
    res = _ContextLabels.apply(gen_logits.contiguous(), labels.contiguous(),
                               distance.to(acc).contiguous(), num_classes, float(margin),
                               float(tau), flat_strides, bool(return_mask))
    n = len(strides)
    outs = list(res[:n])
    masks = [m.detach() for m in res[n:]]
    if isinstance(levels, int) and levels == 1:
        return (outs[0], masks[0]) if return_mask else outs[0]
    return (outs, masks) if return_mask else outs

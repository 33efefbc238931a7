"""CoLab context labels: label aggregation + soft distance mask (docs/design.md, "Op 1"), fused.

Forward and backward are ``torch.library`` custom ops (``colabx::context_labels_fwd`` /
``colabx::context_labels_bwd``) with fake kernels, so ``torch.compile`` graphs do not break.
CPU tensors run colabx's C++ kernels, CUDA tensors its CUDA kernels (or the pure-PyTorch twin
when colabx was built without them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from colabx import _backend
from colabx._precision import accumulation_dtype
from colabx.ops import _checks
from colabx.twins.context_labels import (
    LevelsArg,
    context_labels_reference,
    normalize_levels,
)

_OP = "context_labels"
_CUDA_MAX_T = 16  # csrc/common/context_labels.h::kCudaMaxT


def _level_shapes(shape: Sequence[int], strides3: Sequence[int]) -> list[tuple[int, ...]]:
    nsp = len(shape)
    out = []
    for i in range(len(strides3) // 3):
        s = strides3[3 * i + 3 - nsp : 3 * i + 3]
        out.append(tuple(n // v for n, v in zip(shape, s, strict=True)))
    return out


def _cuda_tile_fits(t: int, strides3: Sequence[int], elem: int) -> bool:
    """Whether the CUDA tile (one coarsest cell) keeps its statistics in shared memory; mirrors
    csrc/cuda/context_labels.cu::make_tile with a conservative 96 KiB budget."""
    n = len(strides3) // 3
    s1 = strides3[3:6] if n > 1 and tuple(strides3[:3]) == (1, 1, 1) else strides3[:3]
    sc = strides3[3 * n - 3 :]
    cells = 1
    for a in range(3):
        cells *= sc[a] // s1[a]
    return cells * (t + 1) * elem <= 96 * 1024


def _use_cuda(o: torch.Tensor, strides3: Sequence[int]) -> bool:
    t = o.shape[1]
    elem = 8 if o.dtype == torch.float64 else 4
    if t > _CUDA_MAX_T or not _cuda_tile_fits(t, strides3, elem):
        return False
    return _backend.use_cuda_kernels(o, _OP)


def _kernel_args(o: torch.Tensor, num_classes: int, strides3: list[int]) -> tuple:
    return (o.shape[0], o.shape[1], num_classes, list(o.shape[2:]), list(strides3))


def _kernels_for(o: torch.Tensor, strides3: Sequence[int]) -> bool:
    """Whether colabx's kernels take this call; if not, the public function runs the twin (a
    plain differentiable PyTorch graph) instead of entering the kernels' autograd."""
    return o.device.type == "cpu" or (o.device.type == "cuda" and _use_cuda(o, strides3))


def _fwd_impl(
    o: torch.Tensor,
    y: torch.Tensor,
    d: torch.Tensor,
    num_classes: int,
    margin: float,
    tau: float,
    strides3: list[int],
    with_mask: bool,
) -> list[torch.Tensor]:
    """Per-level labels (then per-level masks when ``with_mask``) from the kernels. Inputs
    contiguous; distance already in the accumulation dtype."""
    B, t = o.shape[0], o.shape[1]
    K = num_classes + t - 1
    acc = accumulation_dtype(o.dtype)
    shapes = _level_shapes(o.shape[2:], strides3)
    outs = [torch.empty((B, K, *s), dtype=acc, device=o.device) for s in shapes]
    masks = [torch.empty((B, *s), dtype=acc, device=o.device) for s in shapes] if with_mask else []
    if B == 0:
        return outs + masks
    _C = _backend.ext()
    args = (
        *_kernel_args(o, num_classes, strides3),
        o.data_ptr(), _backend.dtype_code(o), y.data_ptr(), _backend.dtype_code(y),
        d.data_ptr(), [x.data_ptr() for x in outs], [x.data_ptr() for x in masks],
        float(margin), float(tau),
    )
    if o.device.type == "cuda":
        _C.context_labels_forward_cuda(*args, o.device.index, _backend.stream_of(o))
    else:
        _C.context_labels_forward_cpu(*args, _backend.num_threads())
    return outs + masks


@torch.library.custom_op("colabx::context_labels_fwd", mutates_args=())
def _fwd(
    gen_logits: torch.Tensor,
    labels: torch.Tensor,
    distance: torch.Tensor,
    num_classes: int,
    margin: float,
    tau: float,
    strides3: list[int],
    with_mask: bool,
) -> list[torch.Tensor]:
    return _fwd_impl(gen_logits, labels, distance, num_classes, margin, tau, strides3, with_mask)


@_fwd.register_fake
def _(gen_logits, labels, distance, num_classes, margin, tau, strides3, with_mask):
    B, t = gen_logits.shape[0], gen_logits.shape[1]
    K = num_classes + t - 1
    acc = accumulation_dtype(gen_logits.dtype)
    shapes = _level_shapes(gen_logits.shape[2:], strides3)
    outs = [gen_logits.new_empty((B, K, *s), dtype=acc) for s in shapes]
    masks = [gen_logits.new_empty((B, *s), dtype=acc) for s in shapes] if with_mask else []
    return outs + masks


def _bwd_impl(
    grads: Sequence[torch.Tensor | None],
    o: torch.Tensor,
    y: torch.Tensor,
    d: torch.Tensor,
    num_classes: int,
    margin: float,
    tau: float,
    strides3: list[int],
) -> torch.Tensor:
    """Gradient w.r.t. the generator logits from one incoming gradient per level (None = 0)."""
    acc = accumulation_dtype(o.dtype)
    grads = [None if g is None else g.to(acc).contiguous() for g in grads]
    grad_o = torch.empty_like(o)
    if o.shape[0] == 0:
        return grad_o
    _C = _backend.ext()
    args = (
        *_kernel_args(o, num_classes, strides3),
        [0 if g is None else g.data_ptr() for g in grads],
        o.data_ptr(), _backend.dtype_code(o), y.data_ptr(), _backend.dtype_code(y),
        d.data_ptr(), grad_o.data_ptr(), float(margin), float(tau),
    )
    if o.device.type == "cuda":
        _C.context_labels_backward_cuda(*args, o.device.index, _backend.stream_of(o))
    else:
        _C.context_labels_backward_cpu(*args, _backend.num_threads())
    return grad_o


@torch.library.custom_op("colabx::context_labels_bwd", mutates_args=())
def _bwd(
    grads: list[torch.Tensor | None],
    gen_logits: torch.Tensor,
    labels: torch.Tensor,
    distance: torch.Tensor,
    num_classes: int,
    margin: float,
    tau: float,
    strides3: list[int],
) -> torch.Tensor:
    return _bwd_impl(grads, gen_logits, labels, distance, num_classes, margin, tau, strides3)


@_bwd.register_fake
def _(grads, gen_logits, labels, distance, num_classes, margin, tau, strides3):
    return torch.empty_like(gen_logits)


def _setup_context(ctx, inputs, output):
    gen_logits, labels, distance, num_classes, margin, tau, strides3, _with_mask = inputs
    ctx.save_for_backward(gen_logits, labels, distance)
    ctx.params = (num_classes, margin, tau, list(strides3))
    ctx.nlev = len(strides3) // 3


def _backward(ctx, grads):
    gen_logits, labels, distance = ctx.saved_tensors
    num_classes, margin, tau, strides3 = ctx.params
    level_grads = list(grads[: ctx.nlev])
    grad_o = _bwd(level_grads, gen_logits, labels, distance, num_classes, margin, tau, strides3)
    return grad_o, None, None, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


class _ContextLabelsEager(torch.autograd.Function):
    """Eager fast path: the same kernels as the custom ops without their dispatch and pytree
    overhead (tens of microseconds a call, which dominate on the GPU at training sizes). Under
    torch.compile the public function uses the custom ops instead."""

    @staticmethod
    def forward(ctx, params, o, y, d):
        num_classes, margin, tau, strides3, with_mask = params
        res = _fwd_impl(o, y, d, num_classes, margin, tau, strides3, with_mask)
        ctx.params = params
        ctx.nlev = len(strides3) // 3
        ctx.save_for_backward(o, y, d)
        ctx.mark_non_differentiable(*res[ctx.nlev :])
        ctx.set_materialize_grads(False)  # unused levels arrive as None: the kernel skips them
        return tuple(res)

    @staticmethod
    def backward(ctx, *grads):
        o, y, d = ctx.saved_tensors
        num_classes, margin, tau, strides3, _ = ctx.params
        level_grads = grads[: ctx.nlev]
        if all(g is None for g in level_grads):
            return None, None, None, None
        grad_o = _bwd_impl(level_grads, o, y, d, num_classes, margin, tau, strides3)
        return None, grad_o, None, None


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
        Soft mask ``M = 1 if d < margin else exp((margin - d) / tau)``; ``tau > 0``.
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
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
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

    strides3 = []
    for s in strides:
        strides3 += [1] * (3 - len(s)) + list(s)
    if not _kernels_for(gen_logits, strides3):
        return context_labels_reference(
            gen_logits, labels, distance, num_classes, margin, tau,
            strides if not (isinstance(levels, int) and levels == 1) else 1, return_mask,
        )
    acc = accumulation_dtype(gen_logits.dtype)
    args = (
        gen_logits.contiguous(),
        labels.contiguous(),
        distance.to(acc).contiguous(),
        num_classes,
        float(margin),
        float(tau),
        strides3,
        bool(return_mask),
    )
    if torch.compiler.is_compiling():
        res = _fwd(*args)
    else:
        res = _ContextLabelsEager.apply(args[3:], *args[:3])
    n = len(strides)
    outs = list(res[:n])
    masks = [m.detach() for m in res[n:]]
    if isinstance(levels, int) and levels == 1:
        return (outs[0], masks[0]) if return_mask else outs[0]
    return (outs, masks) if return_mask else outs

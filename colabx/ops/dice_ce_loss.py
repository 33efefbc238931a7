"""Fused softmax + soft cross-entropy + soft Dice loss over deep-supervision levels
(docs/design.md, "Op 3").

One ``torch.autograd.Function`` is the op's autograd path, eager and under ``torch.compile``
(:mod:`colabx.ops._kernels`); under compile it reaches the kernels through the kernel-only
custom ops ``colabx::dice_ce_loss_fwd`` / ``colabx::dice_ce_loss_bwd``. CPU tensors run colabx's
threaded C++ kernels, CUDA tensors its CUDA kernels when the extension says they take the call
(else the pure-PyTorch twin in :mod:`colabx.twins.dice_ce_loss`, with a one-time warning when
the kernels are missing). The CUDA workspace is sized by the extension.
"""

import math
from collections.abc import Sequence
from typing import List, Tuple

import torch
from torch import Tensor

from colabx import _backend
from colabx._precision import accumulation_dtype
from colabx.ops import _checks
from colabx.ops._kernels import first_order_only, kernel_call
from colabx.twins import dice_ce_loss as _twin

__all__ = ["dice_ce_loss"]

_OP = "dice_ce_loss"


def _kernels_for(t: Tensor, k: int, n_levels: int = 1) -> bool:
    """Whether colabx's kernels take this call (the CPU kernels take any K and level count; the
    CUDA kernels' limits are the extension's to answer); if not, the public function runs the
    twin (a plain differentiable PyTorch graph)."""
    if t.device.type == "cpu":
        return True
    return (t.device.type == "cuda" and _backend.use_cuda_kernels(t, _OP)
            and bool(_backend.ext().dice_ce_loss_cuda_supported(k, n_levels, t.shape[0])))


def _levels_meta(logits: list[Tensor]) -> tuple[int, int, list[int]]:
    b, k = logits[0].shape[0], logits[0].shape[1]
    return b, k, [math.prod(z.shape[2:]) for z in logits]


def _hard(t: Tensor) -> bool:
    return not t.dtype.is_floating_point


def _forward_kernels(logits: List[Tensor], targets: List[Tensor], dice_channels: List[int],
                     weights: List[float], smooth: float) -> Tuple[Tensor, Tensor]:
    """Loss and per-(level, item) stats [L, B, 3K+1] = (tp, Σp, Σŷ per channel, CE sum)."""
    z0 = logits[0]
    cdt = accumulation_dtype(z0.dtype)
    b, k, vs = _levels_meta(logits)
    loss = torch.empty((), dtype=cdt, device=z0.device)
    stats = torch.empty((len(logits), b, 3 * k + 1), dtype=cdt, device=z0.device)
    zs = [z.contiguous() for z in logits]
    ts = [t.contiguous() for t in targets]
    _C = _backend.ext()
    args = ([z.data_ptr() for z in zs], [t.data_ptr() for t in ts], _backend.dtype_code(z0),
            [_backend.dtype_code(t) for t in ts], b, k, vs, dice_channels, weights, smooth,
            stats.data_ptr(), loss.data_ptr())
    if z0.device.type == "cpu":
        _C.dice_ce_loss_forward_cpu(*args, _backend.num_threads())
    else:
        work = torch.empty(_C.dice_ce_loss_cuda_workspace_size(b, k, vs), dtype=torch.float64,
                           device=z0.device)
        _C.dice_ce_loss_forward_cuda(*args, work.data_ptr(), z0.device.index,
                                     _backend.stream_of(z0))
    return loss, stats


_forward_op = torch.library.custom_op("colabx::dice_ce_loss_fwd", _forward_kernels,
                                      mutates_args=())


@_forward_op.register_fake
def _(logits, targets, dice_channels, weights, smooth):
    z0 = logits[0]
    cdt = accumulation_dtype(z0.dtype)
    b, k = z0.shape[0], z0.shape[1]
    return (z0.new_empty((), dtype=cdt), z0.new_empty((len(logits), b, 3 * k + 1), dtype=cdt))


def _backward_kernels(grad: Tensor, logits: List[Tensor], targets: List[Tensor], stats: Tensor,
                      dice_channels: List[int], weights: List[float], smooth: float,
                      want_targets: bool) -> Tuple[List[Tensor], List[Tensor]]:
    """∂loss/∂logits per level and ∂loss/∂targets per soft level (empty tensors for hard levels,
    and for every level when ``want_targets`` is False: the kernels then skip those writes)."""
    z0 = logits[0]
    b, k, vs = _levels_meta(logits)
    zs = [z.contiguous() for z in logits]
    ts = [t.contiguous() for t in targets]
    gz = [torch.empty_like(z) for z in zs]
    gt = [torch.empty_like(t) if want_targets and not _hard(t) else t.new_empty(0) for t in ts]
    gt_addr = [g.data_ptr() if g.numel() else 0 for g in gt]
    grad = grad.contiguous()
    _C = _backend.ext()
    args = (grad.data_ptr(), [z.data_ptr() for z in zs], [t.data_ptr() for t in ts],
            _backend.dtype_code(z0), [_backend.dtype_code(t) for t in ts], b, k, vs,
            dice_channels, weights, smooth, stats.data_ptr(), [g.data_ptr() for g in gz],
            gt_addr)
    if z0.device.type == "cpu":
        _C.dice_ce_loss_backward_cpu(*args, _backend.num_threads())
    else:
        _C.dice_ce_loss_backward_cuda(*args, z0.device.index, _backend.stream_of(z0))
    return gz, gt


_backward_op = torch.library.custom_op("colabx::dice_ce_loss_bwd", _backward_kernels,
                                       mutates_args=())


@_backward_op.register_fake
def _(grad, logits, targets, stats, dice_channels, weights, smooth, want_targets):
    gz = [torch.empty_like(z, memory_format=torch.contiguous_format) for z in logits]
    gt = [torch.empty_like(t, memory_format=torch.contiguous_format)
          if want_targets and not _hard(t) else t.new_empty(0) for t in targets]
    return gz, gt


class _DiceCE(torch.autograd.Function):
    """The op's autograd: ``apply(args, *logits, *targets)`` with ``args = (n_levels,
    dice_channels, weights, smooth)``; the backward skips ∂targets when no target needs it."""

    @staticmethod
    def forward(ctx, args, *tensors):
        n, dice_channels, weights, smooth = args
        zs, ts = list(tensors[:n]), list(tensors[n:])
        loss, stats = kernel_call(_forward_op, _forward_kernels, zs, ts, dice_channels, weights,
                                  smooth)
        ctx.args = args
        ctx.save_for_backward(*zs, *ts, stats)
        return loss

    @staticmethod
    @first_order_only("dice_ce_loss", "colabx.twins.dice_ce_loss.dice_ce_loss")
    def backward(ctx, grad_loss):
        n, dice_channels, weights, smooth = ctx.args
        saved = ctx.saved_tensors
        zs, ts, stats = list(saved[:n]), list(saved[n:2 * n]), saved[2 * n]
        want_t = any(ctx.needs_input_grad[1 + n:])
        gz, gt = kernel_call(_backward_op, _backward_kernels, grad_loss, zs, ts, stats,
                             dice_channels, weights, smooth, want_t)
        gt_out = [g if g.numel() and ctx.needs_input_grad[1 + n + i] else None
                  for i, g in enumerate(gt)]
        return (None, *gz, *gt_out)


# ---------------------------------------------------------------------------------------------
# Argument checks and the public function
# ---------------------------------------------------------------------------------------------

def _as_list(x: object, name: str) -> tuple[list[Tensor], bool]:
    if isinstance(x, torch.Tensor):
        return [x], False
    if isinstance(x, (list, tuple)):
        if len(x) == 0:
            raise ValueError(f"{name} must be a tensor or a non-empty list of tensors, got an "
                             f"empty {type(x).__name__}")
        return [_checks.check_tensor(t, f"{name}[{i}]") for i, t in enumerate(x)], True
    raise TypeError(f"{name} must be a torch.Tensor or a list of tensors, got {type(x).__name__}")


def _weights(level_weights: object, n: int) -> list[float]:
    if level_weights is None:
        return _twin.default_level_weights(n)
    if isinstance(level_weights, torch.Tensor):
        level_weights = level_weights.tolist()
    if isinstance(level_weights, (str, bytes)) or not isinstance(level_weights, Sequence):
        raise TypeError(f"level_weights must be a sequence of floats, got "
                        f"{type(level_weights).__name__}")
    try:
        w = [float(x) for x in level_weights]
    except (TypeError, ValueError):
        raise TypeError("level_weights must contain real numbers") from None
    if len(w) != n:
        raise ValueError(f"level_weights has {len(w)} entries but there are {n} levels")
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise ValueError(f"level_weights must be finite and >= 0, got {w}")
    if not any(x > 0 for x in w):
        raise ValueError("level_weights must not all be zero")
    return w


def dice_ce_loss(logits: Tensor | Sequence[Tensor], targets: Tensor | Sequence[Tensor],
                 dice_channels: Sequence[int] | None = None,
                 level_weights: Sequence[float] | None = None, smooth: float = 1e-5, *,
                 validate: bool = True) -> Tensor:
    r"""Fused softmax + soft cross-entropy + soft Dice loss over deep-supervision levels.

    Per level, with ``p = softmax(logits, dim=1)`` computed in float32 (float64 for float64
    logits) and ``ŷ`` the targets (hard labels as one-hot)::

        CE   = -(1/(B·V)) Σ_voxels Σ_channels ŷ · log(p + 1e-32)
        Dice = -mean_{b, j ∈ dice_channels} (2·tp + s) / (2·tp + fp + fn + s)
        tp = Σ p·ŷ,  fp = Σ p·(1-ŷ),  fn = Σ (1-p)·ŷ   (sums over item b's voxels),  s = smooth
        loss = Σ_l level_weights[l] · (CE_l + Dice_l)

    Parameters
    ----------
    logits : Tensor or list of Tensor
        ``[B, K, *S]`` (``S`` 2D or 3D), float32/float16/bfloat16/float64, ``K >= 2``; a list
        gives deep-supervision levels (finest first), each with its own ``S`` but the same B, K
        and dtype.
    targets : Tensor or list of Tensor
        Same structure as ``logits``. Per level either soft targets ``[B, K, *S]`` (floating;
        cast to the compute dtype) or hard integer labels ``[B, *S]`` / ``[B, 1, *S]`` in
        ``0..K-1`` (uint8/int32/int64/bool).
    dice_channels : sequence of int, optional
        Channels averaged in the Dice term; default all but channel 0 (the reference's
        SoftDiceLoss with ``do_bg=False``). May include 0. Distinct, in ``0..K-1``.
    level_weights : sequence of float, optional
        One non-negative weight per level, not all zero. Default: ``1/2**i`` with the coarsest
        level set to 0, normalised to sum 1 (``[1]`` for one level).
    smooth : float
        Dice smoothing ``s > 0``.
    validate : bool
        Check hard-label values are in ``0..K-1`` (a pass over the labels and, on CUDA, a host
        sync). Turn off in training loops once the data is trusted.

    Returns
    -------
    Tensor
        0-dim loss, float32 (float64 for float64 logits). Differentiable w.r.t. ``logits`` and
        soft ``targets`` (gradients in their dtypes); hard labels get none.
    """
    zs, z_list = _as_list(logits, "logits")
    ts, t_list = _as_list(targets, "targets")
    if z_list != t_list or len(zs) != len(ts):
        raise ValueError(f"logits and targets must have the same number of levels, got "
                         f"{len(zs) if z_list else 'a tensor'} and "
                         f"{len(ts) if t_list else 'a tensor'}")
    n = len(zs)
    zname = (lambda i: f"logits[{i}]") if z_list else (lambda i: "logits")
    tname = (lambda i: f"targets[{i}]") if t_list else (lambda i: "targets")
    z0 = zs[0]
    for i, z in enumerate(zs):
        _checks.check_floating(z, zname(i))
        _checks.check_ndim(z, zname(i), (4, 5), "[B, K, H, W] or [B, K, D, H, W]")
        if z.dtype != z0.dtype:
            raise TypeError(f"{zname(i)} has dtype {z.dtype} but logits[0] has {z0.dtype}; "
                            "all levels must share one dtype")
        if z.shape[:2] != z0.shape[:2]:
            raise ValueError(f"{zname(i)} has shape {tuple(z.shape)}; all levels must share "
                             f"B and K with logits[0] of shape {tuple(z0.shape)}")
    k = z0.shape[1]
    if k < 2:
        raise ValueError(f"logits must have K >= 2 channels, got shape {tuple(z0.shape)}")
    for i, z in enumerate(zs):
        if z.numel() == 0:
            raise ValueError(f"{zname(i)} must not be empty, got shape {tuple(z.shape)}")
    devices = {}
    for i, (z, t) in enumerate(zip(zs, ts, strict=True)):
        devices[zname(i)], devices[tname(i)] = z, t
    _checks.check_same_device(**devices)
    cdt = accumulation_dtype(z0.dtype)
    prepared = []
    for i, (z, t) in enumerate(zip(zs, ts, strict=True)):
        if t.is_complex():
            raise TypeError(f"{tname(i)} must be soft targets (float32, float16, bfloat16 or "
                            f"float64) or integer labels (uint8/int32/int64/bool), got {t.dtype}")
        if t.dtype.is_floating_point:
            _checks.check_floating(t, tname(i))
            if tuple(t.shape) != tuple(z.shape):
                raise ValueError(f"{tname(i)} has shape {tuple(t.shape)} but {zname(i)} has shape "
                                 f"{tuple(z.shape)}; soft targets must match the logits")
            prepared.append(t if t.dtype == cdt else t.to(cdt))
        else:
            lab = _checks.prepare_labels(t, z, tname(i), zname(i))
            if validate:
                _checks.check_label_range(lab, k, tname(i))
            prepared.append(lab)
    channels = (list(range(1, k)) if dice_channels is None
                else _checks.check_channels(dice_channels, k, "dice_channels"))
    weights = _weights(level_weights, n)
    if isinstance(smooth, bool) or not isinstance(smooth, (int, float)):
        raise TypeError(f"smooth must be a float, got {type(smooth).__name__}")
    if not (math.isfinite(smooth) and smooth > 0):
        raise ValueError(f"smooth must be finite and > 0, got {smooth}")
    if not _kernels_for(z0, k, n):
        return _twin.dice_ce_loss(zs, prepared, channels, weights, float(smooth))
    return _DiceCE.apply((n, channels, weights, float(smooth)), *zs, *prepared)

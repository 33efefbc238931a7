"""Fused softmax + soft cross-entropy + soft Dice loss, and the ROI one-vs-all BCE
(docs/design.md, "Op 3").

Forward and backward are ``torch.library`` custom ops (``colabx::dice_ce_loss_fwd`` /
``colabx::dice_ce_loss_bwd``, ``colabx::roi_bce_loss_fwd`` / ``colabx::roi_bce_loss_bwd``) with
fake kernels, so they work under ``torch.compile(fullgraph=True)``. CPU tensors run colabx's
threaded C++ kernels, CUDA tensors its CUDA kernels (or, when those are unavailable, the
pure-PyTorch twin in :mod:`colabx.twins.dice_ce_loss`, with a one-time warning).
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from colabx import _backend
from colabx._precision import accumulation_dtype
from colabx.ops import _checks
from colabx.twins import dice_ce_loss as _ref

__all__ = ["dice_ce_loss", "roi_bce_loss"]

_OP = "dice_ce_loss"


@functools.cache
def _cuda_limits() -> tuple[int, int, int]:
    _C = _backend.ext()
    return (int(_C.dice_ce_loss_cuda_partial_voxels), int(_C.dice_ce_loss_cuda_max_k),
            int(_C.dice_ce_loss_cuda_max_levels))


def _partial_slots(voxels: int) -> int:
    """Forward partials the CUDA workspace holds per item of ``voxels`` voxels (one per block;
    csrc/cuda/dice_ce_loss.h::kDcePartialVoxels)."""
    per = _cuda_limits()[0]
    return (voxels + per - 1) // per


def _dce_workspace_size(b: int, k: int, vs: Sequence[int]) -> int:
    """float64 entries of the CUDA forward's workspace: per level and item its block partials,
    then L * B final sums, each 3K+1 wide (csrc/cuda/dice_ce_loss.h)."""
    return (sum(b * _partial_slots(v) for v in vs) + len(vs) * b) * (3 * k + 1)


def _bce_workspace_size(b: int, v: int) -> int:
    """float64 entries of the ROI BCE CUDA forward's workspace: one partial per block and item."""
    return b * _partial_slots(v)


def _use_cuda(t: Tensor, k: int, n_levels: int = 1) -> bool:
    """CUDA kernels for this call (else the twin): built, K and level count within limits."""
    if not _backend.use_cuda_kernels(t, _OP):
        return False
    _, max_k, max_levels = _cuda_limits()
    return k <= max_k and n_levels <= max_levels


def _kernels_for(t: Tensor, k: int, n_levels: int = 1) -> bool:
    """Whether colabx's kernels take this call; if not, the public functions run the twin (a
    plain differentiable PyTorch graph) instead of entering the custom ops."""
    return t.device.type == "cpu" or (t.device.type == "cuda" and _use_cuda(t, k, n_levels))


def _no_kernel(t: Tensor, k: int, n_levels: int = 1) -> RuntimeError:
    return RuntimeError(f"{_OP}: no colabx kernel for {t.device} tensors with K={k}, "
                        f"{n_levels} level(s); the public functions route such calls to the twin")


# ---------------------------------------------------------------------------------------------
# CE + Dice custom ops
# ---------------------------------------------------------------------------------------------

def _levels_meta(logits: list[Tensor]) -> tuple[int, int, list[int]]:
    b, k = logits[0].shape[0], logits[0].shape[1]
    return b, k, [math.prod(z.shape[2:]) for z in logits]


def _hard(t: Tensor) -> bool:
    return not t.dtype.is_floating_point


def _dce_fwd_impl(logits: list[Tensor], targets: list[Tensor], dice_channels: list[int],
                  weights: list[float], smooth: float) -> tuple[Tensor, Tensor]:
    """Loss and per-(level, item) stats [L, B, 3K+1] = (tp, Σp, Σŷ per channel, CE sum)."""
    z0 = logits[0]
    cdt = accumulation_dtype(z0.dtype)
    b, k, vs = _levels_meta(logits)
    n_levels = len(logits)
    loss = torch.empty((), dtype=cdt, device=z0.device)
    stats = torch.empty((n_levels, b, 3 * k + 1), dtype=cdt, device=z0.device)
    zs = [z.contiguous() for z in logits]
    ts = [t.contiguous() for t in targets]
    if z0.device.type == "cpu":
        _backend.ext().dice_ce_loss_forward_cpu(
            [z.data_ptr() for z in zs], [t.data_ptr() for t in ts], _backend.dtype_code(z0),
            [_backend.dtype_code(t) for t in ts], b, k, vs, dice_channels, weights, smooth,
            stats.data_ptr(), loss.data_ptr(), _backend.num_threads())
    elif _use_cuda(z0, k, n_levels):
        work = torch.empty(_dce_workspace_size(b, k, vs), dtype=torch.float64, device=z0.device)
        _backend.ext().dice_ce_loss_forward_cuda(
            [z.data_ptr() for z in zs], [t.data_ptr() for t in ts], _backend.dtype_code(z0),
            [_backend.dtype_code(t) for t in ts], b, k, vs, dice_channels, weights, smooth,
            stats.data_ptr(), loss.data_ptr(), work.data_ptr(), z0.device.index,
            _backend.stream_of(z0))
    else:
        raise _no_kernel(z0, k, n_levels)
    return loss, stats


@torch.library.custom_op("colabx::dice_ce_loss_fwd", mutates_args=())
def _dce_fwd(logits: list[Tensor], targets: list[Tensor], dice_channels: list[int],
             weights: list[float], smooth: float) -> tuple[Tensor, Tensor]:
    return _dce_fwd_impl(logits, targets, dice_channels, weights, smooth)


@_dce_fwd.register_fake
def _(logits, targets, dice_channels, weights, smooth):
    z0 = logits[0]
    cdt = accumulation_dtype(z0.dtype)
    b, k = z0.shape[0], z0.shape[1]
    return (z0.new_empty((), dtype=cdt), z0.new_empty((len(logits), b, 3 * k + 1), dtype=cdt))


def _dce_bwd_impl(grad: Tensor, logits: list[Tensor], targets: list[Tensor], stats: Tensor,
                  dice_channels: list[int], weights: list[float], smooth: float,
                  want_targets: bool = True) -> tuple[list[Tensor], list[Tensor]]:
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
    if z0.device.type == "cpu":
        _backend.ext().dice_ce_loss_backward_cpu(
            grad.data_ptr(), [z.data_ptr() for z in zs], [t.data_ptr() for t in ts],
            _backend.dtype_code(z0), [_backend.dtype_code(t) for t in ts], b, k, vs,
            dice_channels, weights, smooth, stats.data_ptr(), [g.data_ptr() for g in gz],
            gt_addr, _backend.num_threads())
    elif _use_cuda(z0, k, len(zs)):
        _backend.ext().dice_ce_loss_backward_cuda(
            grad.data_ptr(), [z.data_ptr() for z in zs], [t.data_ptr() for t in ts],
            _backend.dtype_code(z0), [_backend.dtype_code(t) for t in ts], b, k, vs,
            dice_channels, weights, smooth, stats.data_ptr(), [g.data_ptr() for g in gz],
            gt_addr, z0.device.index, _backend.stream_of(z0))
    else:
        raise _no_kernel(z0, k, len(zs))
    return gz, gt


@torch.library.custom_op("colabx::dice_ce_loss_bwd", mutates_args=())
def _dce_bwd(grad: Tensor, logits: list[Tensor], targets: list[Tensor], stats: Tensor,
             dice_channels: list[int], weights: list[float],
             smooth: float) -> tuple[list[Tensor], list[Tensor]]:
    return _dce_bwd_impl(grad, logits, targets, stats, dice_channels, weights, smooth)


@_dce_bwd.register_fake
def _(grad, logits, targets, stats, dice_channels, weights, smooth):
    gz = [torch.empty_like(z, memory_format=torch.contiguous_format) for z in logits]
    gt = [t.new_empty(0) if _hard(t) else torch.empty_like(t, memory_format=torch.contiguous_format)
          for t in targets]
    return gz, gt


def _dce_setup_context(ctx, inputs, output):
    logits, targets, dice_channels, weights, smooth = inputs
    _, stats = output
    ctx.n_levels = len(logits)
    ctx.args = (list(dice_channels), list(weights), float(smooth))
    ctx.hard = [_hard(t) for t in targets]
    ctx.save_for_backward(*logits, *targets, stats)


def _dce_backward(ctx, grad_loss, grad_stats):
    saved = ctx.saved_tensors
    n = ctx.n_levels
    logits, targets, stats = list(saved[:n]), list(saved[n:2 * n]), saved[2 * n]
    gz, gt = _dce_bwd(grad_loss, logits, targets, stats, *ctx.args)
    gt = [None if h else g for h, g in zip(ctx.hard, gt, strict=True)]
    return list(gz), gt, None, None, None


_dce_fwd.register_autograd(_dce_backward, setup_context=_dce_setup_context)


class _DiceCEEager(torch.autograd.Function):
    """Eager fast path: the same kernels as the custom ops, without the custom-op dispatch and
    pytree overhead (tens of microseconds per call, which dominate at small sizes). Under
    torch.compile the public function uses the custom ops instead. Skips ∂targets when no
    target needs a gradient."""

    @staticmethod
    def forward(ctx, args, *tensors):
        n, dice_channels, weights, smooth = args
        zs, ts = list(tensors[:n]), list(tensors[n:])
        loss, stats = _dce_fwd_impl(zs, ts, dice_channels, weights, smooth)
        ctx.args = args
        ctx.save_for_backward(*zs, *ts, stats)
        ctx.mark_non_differentiable(stats)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        n, dice_channels, weights, smooth = ctx.args
        saved = ctx.saved_tensors
        zs, ts, stats = list(saved[:n]), list(saved[n:2 * n]), saved[2 * n]
        want_t = any(ctx.needs_input_grad[1 + n:])
        gz, gt = _dce_bwd_impl(grad_loss, zs, ts, stats, dice_channels, weights, smooth, want_t)
        gt_out = [g if g.numel() and ctx.needs_input_grad[1 + n + i] else None
                  for i, g in enumerate(gt)]
        return (None, *gz, *gt_out)


# ---------------------------------------------------------------------------------------------
# ROI BCE custom ops
# ---------------------------------------------------------------------------------------------

def _bce_fwd_impl(logits: Tensor, labels: Tensor, roi_channels: list[int]) -> Tensor:
    cdt = accumulation_dtype(logits.dtype)
    b, k = logits.shape[0], logits.shape[1]
    v = math.prod(logits.shape[2:])
    z, lab = logits.contiguous(), labels.contiguous()
    loss = torch.empty((), dtype=cdt, device=z.device)
    if z.device.type == "cpu":
        _backend.ext().roi_bce_loss_forward_cpu(
            z.data_ptr(), lab.data_ptr(), _backend.dtype_code(z), _backend.dtype_code(lab), b, k,
            v, roi_channels, loss.data_ptr(), _backend.num_threads())
    elif _use_cuda(z, k):
        work = torch.empty(_bce_workspace_size(b, v), dtype=torch.float64, device=z.device)
        _backend.ext().roi_bce_loss_forward_cuda(
            z.data_ptr(), lab.data_ptr(), _backend.dtype_code(z), _backend.dtype_code(lab), b, k,
            v, roi_channels, loss.data_ptr(), work.data_ptr(), z.device.index,
            _backend.stream_of(z))
    else:
        raise _no_kernel(z, k)
    return loss


@torch.library.custom_op("colabx::roi_bce_loss_fwd", mutates_args=())
def _bce_fwd(logits: Tensor, labels: Tensor, roi_channels: list[int]) -> Tensor:
    return _bce_fwd_impl(logits, labels, roi_channels)


@_bce_fwd.register_fake
def _(logits, labels, roi_channels):
    return logits.new_empty((), dtype=accumulation_dtype(logits.dtype))


def _bce_bwd_impl(grad: Tensor, logits: Tensor, labels: Tensor, roi_channels: list[int]) -> Tensor:
    b, k = logits.shape[0], logits.shape[1]
    v = math.prod(logits.shape[2:])
    z, lab, grad = logits.contiguous(), labels.contiguous(), grad.contiguous()
    gz = torch.empty_like(z)
    if z.device.type == "cpu":
        _backend.ext().roi_bce_loss_backward_cpu(
            grad.data_ptr(), z.data_ptr(), lab.data_ptr(), _backend.dtype_code(z),
            _backend.dtype_code(lab), b, k, v, roi_channels, gz.data_ptr(), _backend.num_threads())
    elif _use_cuda(z, k):
        _backend.ext().roi_bce_loss_backward_cuda(
            grad.data_ptr(), z.data_ptr(), lab.data_ptr(), _backend.dtype_code(z),
            _backend.dtype_code(lab), b, k, v, roi_channels, gz.data_ptr(), z.device.index,
            _backend.stream_of(z))
    else:
        raise _no_kernel(z, k)
    return gz


@torch.library.custom_op("colabx::roi_bce_loss_bwd", mutates_args=())
def _bce_bwd(grad: Tensor, logits: Tensor, labels: Tensor, roi_channels: list[int]) -> Tensor:
    return _bce_bwd_impl(grad, logits, labels, roi_channels)


@_bce_bwd.register_fake
def _(grad, logits, labels, roi_channels):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _bce_setup_context(ctx, inputs, output):
    logits, labels, roi_channels = inputs
    ctx.roi = list(roi_channels)
    ctx.save_for_backward(logits, labels)


def _bce_backward(ctx, grad_loss):
    logits, labels = ctx.saved_tensors
    return _bce_bwd(grad_loss, logits, labels, ctx.roi), None, None


_bce_fwd.register_autograd(_bce_backward, setup_context=_bce_setup_context)


class _RoiBCEEager(torch.autograd.Function):
    """Eager fast path of roi_bce_loss (same kernels, no custom-op dispatch overhead)."""

    @staticmethod
    def forward(ctx, roi, logits, labels):
        ctx.roi = roi
        ctx.save_for_backward(logits, labels)
        return _bce_fwd_impl(logits, labels, roi)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, labels = ctx.saved_tensors
        return None, _bce_bwd_impl(grad_loss, logits, labels, ctx.roi), None


# ---------------------------------------------------------------------------------------------
# Argument checks and public functions
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


def _channels(channels: object, k: int, name: str) -> list[int]:
    if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence):
        if isinstance(channels, torch.Tensor):
            channels = channels.tolist()
        else:
            raise TypeError(f"{name} must be a sequence of ints, got {type(channels).__name__}")
    out = []
    for c in channels:
        if isinstance(c, bool) or isinstance(c, float):
            raise TypeError(f"{name} must contain ints, got {c!r}")
        try:
            out.append(operator.index(c))
        except TypeError:
            raise TypeError(f"{name} must contain ints, got {type(c).__name__}") from None
    if not out:
        raise ValueError(f"{name} must name at least one channel")
    for c in out:
        if not 0 <= c < k:
            raise ValueError(f"{name} entry {c} is out of range for K = {k} channels (0..{k - 1})")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} contains duplicate channels: {out}")
    return out


def _weights(level_weights: object, n: int) -> list[float]:
    if level_weights is None:
        return _ref.default_level_weights(n)
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


def _check_label_range(lab: Tensor, k: int, name: str) -> None:
    if lab.numel() == 0 or lab.dtype == torch.bool:
        return
    lo, hi = torch.aminmax(lab)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= k:
        raise ValueError(f"{name} values must be in 0..{k - 1} (K = {k} channels), found range "
                         f"{lo}..{hi}")


def _prepare_labels(lab: Tensor, z: Tensor, name: str, zname: str) -> Tensor:
    """Hard labels [B, *S] or [B, 1, *S] → [B, *S] (bool viewed as uint8)."""
    _checks.check_labels(lab, name)
    b, spatial = z.shape[0], tuple(z.shape[2:])
    if lab.dim() == z.dim() and lab.shape[1] == 1:
        lab = lab[:, 0]
    if tuple(lab.shape) != (b, *spatial):
        raise ValueError(f"{name} has shape {tuple(lab.shape)} but {zname} of shape "
                         f"{tuple(z.shape)} requires integer labels of shape {(b, *spatial)} "
                         f"(or {(b, 1, *spatial)})")
    if lab.dtype == torch.bool:
        lab = lab.view(torch.uint8)
    return lab


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
        if t.dtype.is_floating_point:
            _checks.check_floating(t, tname(i))
            if tuple(t.shape) != tuple(z.shape):
                raise ValueError(f"{tname(i)} has shape {tuple(t.shape)} but {zname(i)} has shape "
                                 f"{tuple(z.shape)}; soft targets must match the logits")
            prepared.append(t if t.dtype == cdt else t.to(cdt))
        else:
            lab = _prepare_labels(t, z, tname(i), zname(i))
            if validate:
                _check_label_range(lab, k, tname(i))
            prepared.append(lab)
    channels = (list(range(1, k)) if dice_channels is None
                else _channels(dice_channels, k, "dice_channels"))
    weights = _weights(level_weights, n)
    if isinstance(smooth, bool) or not isinstance(smooth, (int, float)):
        raise TypeError(f"smooth must be a float, got {type(smooth).__name__}")
    if not (math.isfinite(smooth) and smooth > 0):
        raise ValueError(f"smooth must be finite and > 0, got {smooth}")
    if not _kernels_for(z0, k, n):
        return _ref.dice_ce_loss(zs, prepared, channels, weights, float(smooth))
    if torch.compiler.is_compiling():
        loss, _ = _dce_fwd(zs, prepared, channels, weights, float(smooth))
        return loss
    return _DiceCEEager.apply((n, channels, weights, float(smooth)), *zs, *prepared)


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
    lab = _prepare_labels(labels, logits, "labels", "logits")
    if validate:
        _check_label_range(lab, k, "labels")
    roi = _channels(roi_channels, k, "roi_channels")
    if not _kernels_for(logits, k):
        return _ref.roi_bce_loss(logits, lab, roi)
    if torch.compiler.is_compiling():
        return _bce_fwd(logits, lab, roi)
    return _RoiBCEEager.apply(roi, logits, lab)

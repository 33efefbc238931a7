"""Drop-in ``calculate_loss`` of the reference's ``common.py`` on colabx's fused loss."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from colabx.ops.dice_ce_loss import dice_ce_loss
from colabx.reference.compat import CE_EPS, deep_supervision_weights

__all__ = ["calculate_loss"]


@functools.cache
def _nearest_index(n_in: int, n_out: int, device: torch.device) -> Tensor:
    """Source index of each output position of an order-0, grid-mode resize n_in → n_out (what
    skimage's ``resize(order=0)`` samples: round half up of (o + 0.5)·n_in/n_out − 0.5)."""
    o = torch.arange(n_out, dtype=torch.float64)
    idx = torch.floor((o + 0.5) * (n_in / n_out) - 0.5 + 0.5).long().clamp_(0, n_in - 1)
    return idx.to(device)


def _resize_labels(labels: Tensor, shape: Sequence[int]) -> Tensor:
    """``[B, *S]`` labels → ``[B, *shape]`` by the reference's order-0 resize, on the device."""
    out = labels
    for axis, (n_in, n_out) in enumerate(zip(labels.shape[1:], shape, strict=True)):
        if n_in != n_out:
            out = out.index_select(axis + 1, _nearest_index(n_in, n_out, labels.device))
    return out


def _one_hot(y: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    return torch.nn.functional.one_hot(y, k).movedim(-1, 1).to(dtype)


def _expanded_labels(args, y: Tensor, q: Tensor, k: int, deep: bool) -> Tensor:
    """The reference's expanded labels of one level, ``[B, K, *S]``: context 0, the ROI classes,
    contexts 1..t-1; ROI voxels one-hot. Deep supervision with ``vanilla``: one-hot everywhere;
    with ``manuallabel``: the 3-class labels with channels 1 and 2 swapped."""
    c = args.NumsClass
    if deep and args.manuallabel:
        return _one_hot(y, 3, q.dtype)[:, [0, 2, 1]]
    onehot = _one_hot(y, k, q.dtype)
    if deep and args.vanilla:
        return onehot
    b, spatial = q.shape[0], q.shape[2:]
    ctx = torch.cat((q[:, :1], q.new_zeros((b, c - 1, *spatial)), q[:, 1:]), 1)
    return torch.where(((y > 0) & (y < c)).unsqueeze(1), onehot, ctx)


def _combine(aux: Tensor, mask: Tensor | None, bg: int) -> Tensor:
    """``aux·M + e_bg·(1 − M)``: outside the mask every voxel is class ``bg``."""
    if mask is None:
        return aux
    comb = aux * mask
    return torch.cat((comb[:, :bg], comb[:, bg:bg + 1] + (1 - mask), comb[:, bg + 1:]), 1)


def _cross_entropy(z: Tensor, targets: Tensor) -> Tensor:
    b, v = z.shape[0], z[0, 0].numel()
    p = torch.softmax(z.float(), 1)
    return -(targets * torch.log(p + CE_EPS)).sum() / (b * v)


def _check_level(name: str, x: Tensor, shape: tuple[int, ...], what: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"calculate_loss: {name} must be a tensor, got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise ValueError(f"calculate_loss: {name} has shape {tuple(x.shape)}, expected {shape} "
                         f"({what})")


def _levels(args, output, taskGenerated, loss_masks):
    """Per level (logits, generator probabilities, mask or None), validated."""
    deep = bool(args.deepsupervision)
    if deep:
        n = int(args.downsampling)
        for name, seq in (("output", output), ("taskGenerated", taskGenerated),
                          ("loss_masks", loss_masks)):
            if seq is not None and (not isinstance(seq, (list, tuple)) or len(seq) < n):
                raise ValueError(f"calculate_loss: with deep supervision {name} must be a list "
                                 f"of at least args.downsampling = {n} levels")
        zs, qs = list(output[:n]), list(taskGenerated[:n])
        ms = [None] * n if loss_masks is None else list(loss_masks[:n])
    else:
        zs, qs, ms = [output], [taskGenerated], [loss_masks]
    c, t = args.NumsClass, args.taskcls
    k = 3 if deep and args.manuallabel else c + t - 1
    for i, (z, q, m) in enumerate(zip(zs, qs, ms, strict=True)):
        tag = f"[{i}]" if deep else ""
        if not isinstance(z, Tensor) or z.dim() not in (4, 5):
            raise ValueError(f"calculate_loss: output{tag} must be a [B, K, *S] tensor (2D or 3D)")
        b, spatial = z.shape[0], tuple(z.shape[2:])
        _check_level(f"output{tag}", z, (b, k, *spatial),
                     f"K = NumsClass + taskcls - 1 = {k} channels" if k == c + t - 1 else
                     "K = 3 channels with manuallabel")
        _check_level(f"taskGenerated{tag}", q, (b, t, *spatial), f"taskcls = {t} channels")
        if m is not None:
            _check_level(f"loss_masks{tag}", m, (b, 1, *spatial), "one mask channel")
    return zs, qs, ms, k


def calculate_loss(args, targets, output, taskGenerated, detach=False, criterion=None,
                   losstype=0, logging=None, loss_masks=None, BGcls=0):
    """The reference's training loss (``common.calculate_loss``), same signature and result.

    Parameters
    ----------
    args
        Any object with ``NumsClass`` (c), ``taskcls`` (t), ``deepsupervision``,
        ``downsampling`` (levels used), ``vanilla`` and ``manuallabel``.
    targets : Tensor
        Integer labels ``[B, *S]`` in ``0..c-1`` (``0..2`` with ``manuallabel``), full resolution.
    output : Tensor or list of Tensor
        Segmentation logits ``[B, K, *S_l]``, K = c + t - 1 (3 with ``manuallabel``); a list of
        at least ``downsampling`` levels (finest first) with deep supervision.
    taskGenerated : Tensor or list of Tensor
        The generator's softmax probabilities per level, ``[B, t, *S_l]`` (the reference
        average-pools them for the coarser levels).
    detach : bool
        With ``vanilla`` (deep supervision) or without deep supervision: Dice over the ROI
        classes 1..c-1 only; otherwise over 1..K-1.
    criterion, logging
        Unused (as in the reference).
    losstype : int
        0: Dice + cross-entropy; anything else: cross-entropy only.
    loss_masks : Tensor or list of Tensor, optional
        Soft masks ``[B, 1, *S_l]``: outside them voxels count as background. With deep
        supervision they are **modified in place** (set to 1 on ground-truth ROI voxels), as the
        reference does. None: no mask (the reference requires one without deep supervision).
    BGcls : int
        The background class of the cross-entropy when ``losstype != 0`` (losstype 0 uses 0).

    Returns
    -------
    Tensor
        0-dim loss, float32 (float64 for float64 logits): Σ_levels w_l (Dice_l + CE_l) with
        the reference's weights (1/2^l, the last of several levels 0, normalised).
        Differentiable w.r.t. ``output`` and ``taskGenerated``. Equal to the reference's value
        to float32 rounding.
    """
    deep = bool(args.deepsupervision)
    if not isinstance(targets, Tensor) or targets.dtype.is_floating_point:
        raise TypeError("calculate_loss: targets must be an integer label tensor [B, *S]")
    zs, qs, ms, k = _levels(args, output, taskGenerated, loss_masks)
    c = args.NumsClass
    n_labels = 3 if deep and args.manuallabel else c
    expected = (zs[0].shape[0], *zs[0].shape[2:])
    if tuple(targets.shape) != expected:
        raise ValueError(f"calculate_loss: targets has shape {tuple(targets.shape)}, expected "
                         f"{expected} (the full-resolution output without its channel axis)")
    lo, hi = (int(v) for v in torch.aminmax(targets))
    if lo < 0 or hi >= n_labels:
        raise ValueError(f"calculate_loss: targets values must be in 0..{n_labels - 1}, found "
                         f"{lo}..{hi}")
    y_full = targets.to(zs[0].device).long()
    labels = [_resize_labels(y_full, z.shape[2:]) if deep else y_full for z in zs]
    auxs = [_expanded_labels(args, y, q, k, deep) for y, q in zip(labels, qs, strict=True)]
    if deep:
        # the graph keeps its own forced copy: the caller's masks are updated in place (as the
        # reference does) but may be updated again before this loss is differentiated
        forced = []
        for y, m in zip(labels, ms, strict=True):
            if m is not None:
                m_new = m.masked_fill(((y > 0) & (y < c)).unsqueeze(1) & (m < 1), 1)
                with torch.no_grad():
                    m.copy_(m_new)
                m = m_new
            forced.append(m)
        ms = forced
    weights = deep_supervision_weights(len(zs)).tolist() if deep else [1.0]
    if losstype == 0:
        combs = [_combine(a, m, 0) for a, m in zip(auxs, ms, strict=True)]
        dice_to = c if detach and (args.vanilla or not deep) else c + args.taskcls - 1
        return dice_ce_loss(zs, combs, list(range(1, dice_to)), weights, validate=False)
    bg = int(BGcls)
    total = 0
    for w, z, a, m in zip(weights, zs, auxs, ms, strict=True):
        total = total + w * _cross_entropy(z, _combine(a, m, bg))
    return total

"""Drop-in ``calculate_loss`` of the reference's ``common.py`` on colabx's fused loss."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from colabx._precision import accumulation_dtype
from colabx.ops.dice_ce_loss import dice_ce_loss
from colabx.ops.distance_transform import fork_safe_intraop
from colabx.ops.roi_bce_loss import roi_bce_loss
from colabx.twins.dice_ce_loss import CE_EPS, default_level_weights
from colabx.twins.roi_bce_loss import BCE_EPS

__all__ = ["calcualte_loss_val", "calculate_loss"]


def fork_safe(fn):
    """``fn`` with torch's CPU ops run without the intra-op (OpenMP) pool when called in a
    forked child (see :func:`colabx.ops.distance_transform.fork_safe_intraop`), where they would
    block forever once the parent had used the pool; unchanged elsewhere."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with fork_safe_intraop():
            return fn(*args, **kwargs)
    return wrapper


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


def _context_weight(labels: Tensor, mask: Tensor | None, c: int, dtype: torch.dtype) -> Tensor:
    """M·[not ROI] per voxel ``[B, *S]``: where the generator's contexts enter the targets."""
    w = ((labels <= 0) | (labels >= c)).to(dtype)
    return w if mask is None else w * mask[:, 0]


class _SoftTargets(torch.autograd.Function):
    """The reference's soft targets of one level, ``aux·M + e_bg·(1 − M)``, built channel by
    channel instead of through one-hot, cat and where (whose backward zero-fills full tensors).

    With ``q`` (the CoLab modes) ``aux`` is one-hot on the ROI voxels (``labels`` in 1..c-1) and
    ``[q_0, 0, …, 0, q_1, …, q_{t-1}]`` elsewhere; without (``vanilla`` / ``manuallabel`` with deep
    supervision) ``aux`` is one-hot of ``labels`` everywhere. ``mask`` None means M = 1. The
    backward is one pass: ∂q = M·[not ROI]·g on the context channels; ∂M = Σ_j g_j·aux_j − g_bg.
    """

    @staticmethod
    def forward(ctx, q, mask, labels, c, k, bg, with_q):
        ctx.c, ctx.k, ctx.bg, ctx.with_q = c, k, bg, with_q
        ctx.save_for_backward(q, mask, labels)
        return _SoftTargets.build(q, mask, labels, c, k, bg, with_q)

    @staticmethod
    def build(q, mask, labels, c, k, bg, with_q, aux_only=False):
        dtype = q.dtype
        out = q.new_empty((q.shape[0], k, *q.shape[2:]))
        keep = None if (mask is None or aux_only) else mask[:, 0]
        if with_q:
            ctx_w = _context_weight(labels, None if aux_only else mask, c, dtype)
            out[:, 0] = q[:, 0] * ctx_w
            out[:, c:] = q[:, 1:] * ctx_w.unsqueeze(1)
            onehot_channels = range(1, c)
        else:
            onehot_channels = range(k)
        for j in onehot_channels:
            hit = (labels == j).to(dtype)
            out[:, j] = hit if keep is None else hit * keep
        if keep is not None:
            out[:, bg] += 1 - keep
        return out

    @staticmethod
    def backward(ctx, grad):
        q, mask, labels = ctx.saved_tensors
        c, bg = ctx.c, ctx.bg
        grad_q = grad_mask = None
        if ctx.needs_input_grad[0] and ctx.with_q:
            w = _context_weight(labels, mask, c, grad.dtype)
            grad_q = torch.cat((grad[:, :1], grad[:, c:]), 1) * w.unsqueeze(1)
        if ctx.needs_input_grad[1]:
            aux = _SoftTargets.build(q, mask, labels, c, ctx.k, bg, ctx.with_q, aux_only=True)
            grad_mask = (grad * aux).sum(1, keepdim=True) - grad[:, bg:bg + 1]
        return grad_q, grad_mask, None, None, None, None, None


def _soft_targets(args, y: Tensor, q: Tensor, mask: Tensor | None, k: int, bg: int,
                  deep: bool) -> Tensor:
    """The targets of one level. Deep supervision with ``vanilla``: one-hot everywhere; with
    ``manuallabel``: the 3-class labels with channels 1 and 2 swapped."""
    if deep and args.manuallabel:
        y = torch.where(y == 1, 2, torch.where(y == 2, 1, y))
    with_q = not (deep and (args.vanilla or args.manuallabel))
    if not with_q:  # targets independent of the generator: no ∂targets pass in the loss
        q = q.detach()
    return _SoftTargets.apply(q, mask, y, args.NumsClass, k, bg, with_q)


def _cross_entropy(z: Tensor, targets: Tensor) -> Tensor:
    b, v = z.shape[0], z[0, 0].numel()
    p = torch.softmax(z.to(accumulation_dtype(z.dtype)), 1)
    return -(targets * torch.log(p + CE_EPS)).sum() / (b * v)


def _check_level(name: str, x: Tensor, shape: tuple[int, ...], what: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"calculate_loss: {name} must be a tensor, got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise ValueError(f"calculate_loss: {name} has shape {tuple(x.shape)}, expected {shape} "
                         f"({what})")


def _check_label_values(fn: str, name: str, labels: Tensor, n: int) -> None:
    lo, hi = (int(v) for v in torch.aminmax(labels))
    if lo < 0 or hi >= n:
        raise ValueError(f"{fn}: {name} values must be in 0..{n - 1}, found {lo}..{hi}")


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


@fork_safe
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
        0-dim loss: Σ_levels w_l (Dice_l + CE_l) with
        the reference's weights (1/2^l, the last of several levels 0, normalised).
        Differentiable w.r.t. ``output`` and ``taskGenerated``. Equal to the reference's value
        to float32 rounding. Its dtype is the reference's, the promotion of the dtypes of the
        logits, the masks and (unless ``manuallabel``) ``taskGenerated``; it is computed in
        float32 (float64 for float64 logits).
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
    _check_label_values("calculate_loss", "targets", targets, n_labels)
    y_full = targets.to(zs[0].device).long()
    labels = [_resize_labels(y_full, z.shape[2:]) if deep else y_full for z in zs]
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
    weights = default_level_weights(len(zs)) if deep else [1.0]
    # the reference's arithmetic promotes the loss to the widest dtype of what it reads (manual
    # labels do not read the generator)
    read = (*zs, *ms) if deep and args.manuallabel else (*zs, *qs, *ms)
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in read if t is not None])
    if losstype == 0:
        combs = [_soft_targets(args, y, q, m, k, 0, deep)
                 for y, q, m in zip(labels, qs, ms, strict=True)]
        dice_to = c if detach and (args.vanilla or not deep) else c + args.taskcls - 1
        return dice_ce_loss(zs, combs, list(range(1, dice_to)), weights,
                            validate=False).to(dtype)
    bg = int(BGcls)
    if not 0 <= bg < zs[0].shape[1]:
        raise ValueError(f"calculate_loss: BGcls {bg} is not a channel of the output (0 to "
                         f"{zs[0].shape[1] - 1})")
    total = 0
    for w, z, y, q, m in zip(weights, zs, labels, qs, ms, strict=True):
        total = total + w * _cross_entropy(z, _soft_targets(args, y, q, m, k, bg, deep))
    return total.to(dtype)


@fork_safe
def calcualte_loss_val(args, target_varval, outputval, criterionbce=None):
    """The reference's meta loss with its diagnostics (``common.calcualte_loss_val``, name as
    spelt there), same signature and values.

    ``outputval``: logits ``[B, K, *S]`` (with deep supervision a list whose first entry is the
    full resolution); ``target_varval``: labels ``[B, *S]`` in ``0..c-1``. Returns ten 0-dim
    tensors: the ROI one-vs-all BCE L_ROI (the meta loss; fused :func:`colabx.roi_bce_loss`,
    differentiable), the same BCE again, −Dice, its positive and negative parts, the mean over
    voxels of the largest context logit on background voxels and on ROI voxels, −precision,
    −sensitivity and −specificity (soft, over the ROI classes). All ten carry gradients to
    ``outputval``'s full-resolution level, as the reference's do, when it requires grad (the
    second value is a copy of the first, sharing its graph); without grad, or under
    ``torch.no_grad``, they are computed without autograd graphs. ``criterionbce`` is unused, as
    in the reference.
    """
    c = args.NumsClass
    z = outputval[0] if args.deepsupervision else outputval
    if not isinstance(z, Tensor) or z.dim() not in (4, 5) or z.shape[1] < c:
        raise ValueError("calcualte_loss_val: outputval must be a [B, K, *S] tensor (2D or 3D) "
                         f"with K >= NumsClass = {c} (a list of levels with deep supervision)")
    if not isinstance(target_varval, Tensor) or target_varval.dtype.is_floating_point:
        raise TypeError("calcualte_loss_val: target_varval must be an integer label tensor")
    if tuple(target_varval.shape) != (z.shape[0], *z.shape[2:]):
        raise ValueError(f"calcualte_loss_val: target_varval has shape "
                         f"{tuple(target_varval.shape)}, expected {(z.shape[0], *z.shape[2:])}")
    _check_label_values("calcualte_loss_val", "target_varval", target_varval, c)
    y = target_varval.to(z.device).long()
    bce = roi_bce_loss(z, y, list(range(1, c)), validate=False)
    b, k, v = z.shape[0], z.shape[1], z[0, 0].numel()
    zf = z.to(accumulation_dtype(z.dtype))
    p = torch.softmax(zf, 1)
    onehot = _one_hot(y, k, p.dtype)
    axes = tuple(range(2, z.dim()))
    p_roi, y_roi = p[:, 1:c], onehot[:, 1:c]
    pos = -(torch.log(p_roi + BCE_EPS) * y_roi).sum() / (b * v)
    neg = -(torch.log(1 - p_roi + BCE_EPS) * (1 - y_roi)).sum() / (b * v)
    contexts = [0, *range(c, k)]
    zc = zf[:, contexts]
    on_bg = (zc * onehot[:, :1]).amax(1).sum() / (b * v)
    roi = onehot[:, c - 1:c] if args.deepsupervision else onehot[:, 1:c]
    on_roi = (zc * roi).amax(1, keepdim=True).sum() / (b * v)
    tp = (p * onehot).sum(axes)[:, 1:c]
    sum_p, sum_y = p.sum(axes)[:, 1:c], onehot.sum(axes)[:, 1:c]
    fp, fn = sum_p - tp, sum_y - tp
    tn = v - sum_p - sum_y + tp
    s = 1e-5
    dice = -((2 * tp + s) / (2 * tp + fp + fn + s)).mean()
    prec = -((tp + s) / (tp + fp + s)).mean()
    sens = -((tp + s) / (tp + fn + s)).mean()
    spec = -((tn + s) / (tn + fp + s)).mean()
    return bce, bce.clone(), dice, pos, neg, on_bg, on_roi, prec, sens, spec

"""Reference-style twins of :mod:`colabx.compat`: the public CoLab code's algorithms, step by step.

These follow what ZerojumpLine/CoLab's ``common.calculate_loss``, ``utilities.one_hot2dist`` and
``utilities.hessian_vector_product_Unet`` do, in the same order and with the same host round
trips (deep-supervision labels resized on the CPU with an order-0 resize, one-hot by scatter, the
context-label assembly by masked assignment, a per-level Dice and cross-entropy, two separate
generator backwards for the finite difference). They are written here from that behaviour; no code
is taken from the reference. They are the test oracle and the benchmark baseline of the drop-in
functions, and never used on the fast path.

``args`` is any object with the reference's attributes: ``NumsClass`` (c, the ROI classes with
background), ``taskcls`` (t, the context classes), ``deepsupervision``, ``downsampling`` (the
number of deep-supervision levels used), ``vanilla`` and ``manuallabel``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.ndimage as ndi
import torch

from colabx.reference.dice_ce_loss import BCE_EPS, CE_EPS, default_level_weights

__all__ = [
    "calculate_loss_reference",
    "calculate_loss_val_reference",
    "hessian_vector_product_reference",
    "add_scaled_",
    "one_hot2dist_reference",
    "resize_labels_order0",
    "soft_dice_reference",
]


def resize_labels_order0(labels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``[B, *S]`` integer labels resized to ``[B, *shape]`` the way the reference does it
    (nnU-Net's ``resize_segmentation(order=0)``, i.e. skimage's ``resize(order=0,
    anti_aliasing=False)``, which calls ``scipy.ndimage.zoom`` with ``grid_mode=True``)."""
    out = np.zeros((labels.shape[0], *shape), dtype=labels.dtype)
    for b in range(labels.shape[0]):
        item = labels[b].astype(float)
        zoom = [1 / (n / s) for n, s in zip(item.shape, shape, strict=True)]
        out[b] = ndi.zoom(item, zoom, order=0, mode="grid-constant", grid_mode=True)
    return out


def _soft_ratio(x, y, channels, ratio, smooth=1e-5):
    """−mean over the batch and ``channels`` (without 0) of ``ratio(tp, fp, fn, tn)`` of
    ``softmax(x)`` against the one-hot labels ``y`` (the reference's SoftPREC/SENS/SPECLoss)."""
    e = torch.exp(x - x.max(1, keepdim=True)[0])
    p = e / e.sum(1, keepdim=True)
    axes = tuple(range(2, x.dim()))
    tp = (p * y).sum(axes)
    fp = (p * (1 - y)).sum(axes)
    fn = ((1 - p) * y).sum(axes)
    tn = ((1 - p) * (1 - y)).sum(axes)
    r = ratio(tp, fp, fn, tn, smooth)
    return -torch.cat([r[:, k] for k in channels if k != 0]).mean()


def soft_dice_reference(x: torch.Tensor, y: torch.Tensor, channels: Sequence[int],
                        smooth: float = 1e-5) -> torch.Tensor:
    """Minus the soft Dice of ``softmax(x)`` against one-hot / soft ``y``, averaged over the
    batch and ``channels`` without 0 (the reference's SoftDiceLoss, no mask, per item)."""
    return _soft_ratio(x, y, channels,
                       lambda tp, fp, fn, tn, s: (2 * tp + s) / (2 * tp + fp + fn + s), smooth)


def _one_hot_scatter(labels: torch.Tensor, channels: int, like: torch.Tensor) -> torch.Tensor:
    onehot = torch.zeros((labels.shape[0], channels, *labels.shape[1:]), dtype=like.dtype,
                         device=like.device)
    return onehot.scatter_(1, labels.unsqueeze(1), 1)


def _assemble(args, y: torch.Tensor, q: torch.Tensor, z: torch.Tensor, deep: bool):
    """y_onehot and the expanded labels of one level, assembled like the reference."""
    c = args.NumsClass
    onehot = _one_hot_scatter(y, 3 if (deep and args.manuallabel) else c, z)
    aux = torch.cat((q[:, 0:1], onehot[:, 1:c], q[:, 1:]), 1)
    for cls in range(aux.shape[1]):
        if (deep and args.vanilla) or 0 < cls < c:
            for ch in range(aux.shape[1]):
                plane = aux[:, ch]
                plane[y == cls] = float(cls == ch)
    if deep and args.manuallabel:
        aux = onehot[:, [0, 2, 1]]
    return onehot, aux


def _ce(z: torch.Tensor, aux: torch.Tensor, mask: torch.Tensor, bg: int) -> torch.Tensor:
    k = z.shape[1]
    zf = z.movedim(1, -1).reshape(-1, k)
    af = aux.movedim(1, -1).reshape(-1, k)
    mf = mask.movedim(1, -1).reshape(-1, 1)
    p = torch.softmax(zf, 1)
    e_bg = torch.zeros_like(p)
    e_bg[:, bg] = 1
    comb = af * mf + e_bg * (1 - mf)
    return (-(1.0 / p.shape[0]) * torch.log(p + CE_EPS) * comb).sum()


def _dice_term(z, aux, mask, channels):
    e0 = torch.zeros_like(aux)
    e0[:, 0] = 1
    return soft_dice_reference(z, aux * mask + e0 * (1 - mask), channels)


def calculate_loss_reference(args, targets, output, taskGenerated, detach=False, criterion=None,
                             losstype=0, logging=None, loss_masks=None, BGcls=0):
    """The reference's ``calculate_loss``: per level, expanded labels from the (softmaxed,
    pooled) generator output and the ground truth, the soft mask, then Dice (losstype 0) and
    cross-entropy, weighted over the deep-supervision levels. Mutates ``loss_masks`` (ground-truth
    voxels forced to 1 on every deep-supervision level) as the reference does."""
    c, t = args.NumsClass, args.taskcls
    k = c + t - 1
    dice_channels = list(range(c)) if detach and (args.vanilla or not args.deepsupervision) \
        else list(range(k))
    total = 0
    if args.deepsupervision:
        host = targets.detach().cpu().numpy()
        weights = default_level_weights(args.downsampling)
        for lvl in range(args.downsampling):
            z, q = output[lvl], taskGenerated[lvl]
            y = torch.as_tensor(resize_labels_order0(host, z.shape[2:])).long().to(z.device)
            onehot, aux = _assemble(args, y, q, z, deep=True)
            if loss_masks is not None:
                mask = loss_masks[lvl]
                mask[(onehot[:, 1:c].sum(1, keepdim=True) == 1) & (mask < 1)] = 1
            else:
                mask = torch.ones_like(z[:, :1])
            bg = BGcls
            if losstype == 0:
                bg = 0
                total = total + weights[lvl] * _dice_term(z, aux, mask, dice_channels)
            total = total + weights[lvl] * _ce(z, aux, mask, bg)
        return total
    z, q = output, taskGenerated
    _, aux = _assemble(args, targets, q, z, deep=False)
    mask = torch.ones_like(z[:, :1]) if loss_masks is None else loss_masks
    bg = BGcls
    if losstype == 0:
        bg = 0
        total = total + _dice_term(z, aux, mask, dice_channels)
    return total + _ce(z, aux, mask, bg)


def calculate_loss_val_reference(args, target_varval, outputval, criterionbce=None):
    """The reference's meta loss and its diagnostics (``common.calcualte_loss_val``), at full
    resolution: (BCE, BCE again, −Dice, positive BCE, negative BCE, mean max context logit on
    background, the same on the last ROI class, −precision, −sensitivity, −specificity)."""
    c = args.NumsClass
    z = outputval[0] if args.deepsupervision else outputval
    b, v = z.shape[0], z[0, 0].numel()
    p_all = torch.softmax(z, 1)
    onehot = _one_hot_scatter(target_varval, c, z)
    p, y = p_all[:, 1:c], onehot[:, 1:c]
    pos = -torch.log(p + BCE_EPS) * y
    neg = -torch.log(1 - p + BCE_EPS) * (1 - y)
    bce = (pos + neg).sum() / (b * v)
    contexts = [0] + list(range(c, z.shape[1]))
    on_bg = torch.max(z[:, contexts] * onehot[:, 0:1], dim=1, keepdim=True)[0]
    roi = onehot[:, c - 1:c] if args.deepsupervision else onehot[:, 1:c]
    on_roi = torch.max(z[:, contexts] * roi, dim=1, keepdim=True)[0]
    full = _one_hot_scatter(target_varval, z.shape[1], z)
    classes = list(range(c))
    return (bce, (pos + neg).sum() / (b * v), soft_dice_reference(z, full, classes),
            pos.sum() / (b * v), neg.sum() / (b * v), on_bg.sum() / (b * v),
            on_roi.sum() / (b * v),
            _soft_ratio(z, full, classes, lambda tp, fp, fn, tn, s: (tp + s) / (tp + fp + s)),
            _soft_ratio(z, full, classes, lambda tp, fp, fn, tn, s: (tp + s) / (tp + fn + s)),
            _soft_ratio(z, full, classes, lambda tp, fp, fn, tn, s: (tn + s) / (tn + fp + s)))


def one_hot2dist_reference(seg: np.ndarray, resolution: Sequence[float] | None = None
                           ) -> np.ndarray:
    """Per channel of ``seg`` ``[K, *S]``: scipy's EDT outside the channel's mask, minus (EDT to
    the background − 1) inside; channels without any voxel stay 0; the result has ``seg``'s
    dtype."""
    res = np.zeros_like(seg)
    for k in range(len(seg)):
        inside = seg[k].astype(bool)
        if inside.any():
            outside = ~inside
            res[k] = (ndi.distance_transform_edt(outside, sampling=resolution) * outside
                      - (ndi.distance_transform_edt(inside, sampling=resolution) - 1) * inside)
    return res


def add_scaled_(params, vector, alpha: float) -> None:
    """``p.data += alpha·v`` for each parameter, with ``alpha`` as the scalar alpha of ``add_``:
    the reference's arithmetic for θ ± R·v (``sub_(v, alpha=a)`` is ``add_(v, alpha=-a)``)."""
    for p, v in zip(params, vector, strict=True):
        p.data.add_(v, alpha=alpha)


def hessian_vector_product_reference(model, samplemodel, vector, inputnor_var, target_var,
                                     taskGenerated, criterion, args, loss_mask, BGclsindex,
                                     r=1e-2, loss_fn=calculate_loss_reference):
    """The reference's finite-difference product: θ ± R·v with R = r/‖v‖, a full forward and a
    separate generator backward on each side, θ restored by adding back, (g+ − g−)/(2R)."""
    R = r / torch.cat([v.reshape(-1) for v in vector]).norm()
    step = float(R)  # one host read; the reference passes R as add_'s scalar alpha
    params = list(model.parameters())
    add_scaled_(params, vector, step)
    loss = loss_fn(args, target_var, model(inputnor_var), taskGenerated, loss_masks=loss_mask,
                   BGcls=BGclsindex)
    grads_p = torch.autograd.grad(loss, list(samplemodel.parameters()), retain_graph=True)
    add_scaled_(params, vector, -2 * step)
    loss = loss_fn(args, target_var, model(inputnor_var), taskGenerated, loss_masks=loss_mask,
                   BGcls=BGclsindex)
    grads_n = torch.autograd.grad(loss, list(samplemodel.parameters()))
    add_scaled_(params, vector, step)
    return [(gp - gn).div_(2 * R) for gp, gn in zip(grads_p, grads_n, strict=True)]

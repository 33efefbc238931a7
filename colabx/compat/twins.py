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

import copy
import time
import types
from collections.abc import Sequence

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

from colabx.twins.dice_ce_loss import CE_EPS, default_level_weights
from colabx.twins.roi_bce_loss import BCE_EPS

__all__ = [
    "REFERENCE_COMMON",
    "VAL_METERS",
    "AverageMeter",
    "EpochMeters",
    "accuracy_top1",
    "calculate_loss_reference",
    "calculate_loss_val_reference",
    "hessian_vector_product_reference",
    "add_scaled_",
    "one_hot2dist_reference",
    "resize_labels_order0",
    "soft_dice_reference",
    "generator_levels",
    "loss_mask_levels",
    "soft_distance_mask",
    "train_reference",
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


# --------------------------------------------------------------------------------------------
# one epoch of the reference's training loop (``common.train``)
# --------------------------------------------------------------------------------------------

class AverageMeter:
    """Running value / sum / count / average, as the reference's meters (numbers or arrays)."""

    def __init__(self) -> None:
        self.val = self.sum = self.avg = 0
        self.count = 0

    def update(self, val, n: int = 1) -> None:
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count


#: The diagnostics of ``calcualte_loss_val`` in its return order, as the epoch's meters name them.
VAL_METERS = ("lossval", "lossvalbce", "lossvaldsc", "lossvalpbce", "lossvalnbce", "lossvalpz",
              "lossvalnz", "lossvalprc", "lossvalsen", "lossvalspe")
#: The order the reference logs them to TensorBoard after ``train_lossval`` (Dice first).
TENSORBOARD_ORDER = ("lossvaldsc", "lossvalbce", *VAL_METERS[3:])


class EpochMeters:
    """The reference epoch's meters: ``batch_time``, ``losses``, ``top1``, ``top1val``,
    ``generated_tasks`` (the generator's per-class voxel counts) and one per ``VAL_METERS``."""

    def __init__(self) -> None:
        self.batch_time, self.losses, self.top1, self.top1val = (AverageMeter() for _ in range(4))
        self.generated_tasks = AverageMeter()
        self.val = {name: AverageMeter() for name in VAL_METERS}

    def background_task(self, counts) -> int:
        """Record one sample's per-class counts of the generator's argmax; return the context
        class taken as background: the largest on average, shifted past the ROI class 1."""
        self.generated_tasks.update(np.asarray(counts, dtype=float), 1)
        bg = np.argmax(self.generated_tasks.avg)
        return bg + (bg != 0)

    def progress_line(self, epoch: int, iteration: int, num_iterations) -> str:
        """The reference's per-``print_freq`` log line."""
        return ("Epoch: [{0}][{1}/{2}]\tTime {bt.val:.3f} ({bt.avg:.3f})\t"
                "Loss {lo.val:.4f} ({lo.avg:.4f})\tLossval {lv.val:.4f} ({lv.avg:.4f})\t"
                "Prec@1 {t1.val:.3f} ({t1.avg:.3f})").format(
                    epoch, iteration, num_iterations, bt=self.batch_time, lo=self.losses,
                    lv=self.val["lossval"], t1=self.top1)

    def end_iteration(self, logger, args, epoch: int, iteration: int, started: float) -> float:
        """Time the iteration begun at ``started`` and log its progress line to ``logger`` every
        ``args.print_freq`` iterations, as the reference does; returns the next start time."""
        now = time.time()
        self.batch_time.update(now - started)
        if iteration % args.print_freq == 0:
            logger.info(self.progress_line(epoch, iteration, args.numIteration))
        return now

    def log_tensorboard(self, args, epoch: int) -> None:
        """With ``args.tensorboard``: the epoch averages through ``tensorboard_logger``."""
        if not getattr(args, "tensorboard", False):
            return
        from tensorboard_logger import log_value  # the reference's logger, needed only here

        log_value("train_loss", self.losses.avg, epoch)
        log_value("train_lossval", self.val["lossval"].avg, epoch)
        log_value("train_acc", self.top1.avg, epoch)
        log_value("trainval_acc", self.top1val.avg, epoch)
        for name in TENSORBOARD_ORDER:
            log_value(f"train_{name}", self.val[name].avg, epoch)


def accuracy_top1(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """The reference's Prec@1 of full-resolution logits ``[B, K, *S]``: percentage of voxels
    whose argmax over the ROI classes (the context channels set to -100) equals ``labels``."""
    z = logits.detach().clone()
    z[:, num_classes:] = -100
    correct = (z.argmax(1) == labels.to(z.device)).reshape(-1).float().sum(0)
    return float(correct.mul_(100.0 / labels.numel()))


def soft_distance_mask(dist: torch.Tensor, args,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``min(1, exp((threshold_sub − d)/threshold_dev))`` of distance patches ``[B, *S]``, as
    ``[B, 1, *S]`` in ``dtype`` (float32 in the reference; computed in ``dist``'s dtype, float64
    from the reference's sampler)."""
    m = torch.exp((args.threshold_sub - dist.unsqueeze(1)) / args.threshold_dev)
    m[m > 1] = 1
    return m.to(dtype)


def loss_mask_levels(mask: torch.Tensor, args):
    """The per-level masks: min-pool by 2^k per deep-supervision level, or the mask itself."""
    if not args.deepsupervision:
        return mask
    return [mask] + [-F.max_pool3d(-mask, kernel_size=2**k, stride=2**k)
                     for k in range(1, args.downsampling)]


def generator_levels(q: torch.Tensor, args):
    """The generator's probabilities per level: average-pool by 2^k, or ``q`` itself."""
    if not args.deepsupervision:
        return q
    return [q] + [F.avg_pool3d(q, kernel_size=2**k, stride=2**k)
                  for k in range(1, args.downsampling)]


#: The functions the reference's loop calls by name in its ``common`` module.
REFERENCE_COMMON = types.SimpleNamespace(
    calculate_loss=calculate_loss_reference,
    calcualte_loss_val=calculate_loss_val_reference,
    hessian_vector_product_Unet=hessian_vector_product_reference,
)


def train_reference(sampling_results: Sequence, sampling_results_val, model: torch.nn.Module,
                    samplemodel: torch.nn.Module, criterion, optimizer: torch.optim.Optimizer,
                    optimizer_arch: torch.optim.Optimizer, alpha: float, epoch: int, logging,
                    args, bratsflag: bool = False, common=None) -> EpochMeters:
    """One epoch of the reference's ``common.train``, step by step: per iteration, every
    ``taskupdate`` iterations a per-sample meta step (inner step on the sample, a fresh copy of
    the network loaded with θ*, the meta loss and its diagnostics, the finite-difference
    generator gradient, Adam step; only logged with ``vanilla`` / ``manuallabel``), then the
    ordinary step of θ on the whole batch (loss with ``detach=True``, gradient norm clipped to
    12). Masks from the distance patches on the CPU, generator levels pooled per call.

    ``common``: where ``calculate_loss``, ``calcualte_loss_val`` and
    ``hessian_vector_product_Unet`` are looked up at each call (default
    :data:`REFERENCE_COMMON`, the twins); pass a module patched by
    :func:`colabx.compat.apply_to_reference` to time the drop-ins inside this loop. The
    ``.cuda()`` calls of the reference are moves to ``model``'s device, its ``.float()`` casts
    to ``model``'s dtype. Returns the epoch's meters (the reference returns None).
    """
    fn = REFERENCE_COMMON if common is None else common
    p0 = next(model.parameters())
    dev, dtype = p0.device, p0.dtype  # float32 in the reference (``.float()``)
    logging.info(" **************** epoch " + str(epoch) + " is starting ****************")
    inputs, target, dist = sampling_results[0], sampling_results[1], sampling_results[2]
    B = int(args.batch_size)
    colab = not args.vanilla and not args.manuallabel
    meters = EpochMeters()
    model.train()
    samplemodel.train()
    end = time.time()
    bg = 0
    for it in range(int(args.numIteration)):
        sl = slice(it * B, (it + 1) * B)
        ypick = torch.tensor(target[sl])
        y = ypick.long().to(dev)
        x = torch.tensor(inputs[sl]).to(dev, dtype)
        yval = y.clone()
        if args.manuallabel:
            yval[yval == 1] = 0
            yval[yval == 2] = 1
        if it % args.taskupdate == 0:
            for b in range(x.shape[0]):
                xb, yb, yvb = x[b:b + 1], y[b:b + 1], yval[b:b + 1]
                output = model(xb)
                gen = samplemodel(xb)
                counts = [float(torch.sum(torch.argmax(gen, dim=1) == k))
                          for k in range(args.taskcls)]
                bg = meters.background_task(counts)
                if b == 0:
                    logging.info("average BG class is " + str(bg))
                q = torch.softmax(gen, 1)
                masks = None
                if args.distdetach:
                    d = torch.tensor(dist[sl])[b:b + 1]
                    masks = loss_mask_levels(soft_distance_mask(d, args, dtype).to(dev), args)
                qs = generator_levels(q, args)
                if args.deepsupervision and it % args.print_freq == 0:
                    for k in range(args.taskcls):
                        am = np.argmax(qs[0].data.cpu().numpy(), axis=1)
                        logging.info("Task 1 portion" + str(k) + " " + str(np.sum(am == k)
                                                                            / np.size(am)))
                fast = dict(model.named_parameters())
                loss = fn.calculate_loss(args, yb, output, qs, losstype=0, loss_masks=masks,
                                         BGcls=bg)
                grads = torch.autograd.grad(loss, list(fast.values()))
                theta = {n: (p - alpha * g).data for (n, p), g in zip(fast.items(), grads,
                                                                       strict=True)}
                del grads
                unrolled = copy.deepcopy(model)  # the reference builds a new network here
                unrolled.zero_grad(set_to_none=True)
                state = model.state_dict()
                state.update(theta)
                unrolled.load_state_dict(state)
                outputval = unrolled(xb)
                vals = fn.calcualte_loss_val(args, yvb, outputval, criterionbce=None)
                if colab:
                    optimizer_arch.zero_grad()
                    vals[0].backward()
                    vector, skip = [], False
                    for v in unrolled.parameters():
                        if v.grad is None:
                            vector.append(torch.zeros_like(v))
                            continue
                        vector.append(v.grad.data)
                        if torch.max(torch.abs(v.grad.data)) <= 0 and v.shape[-1] != 1:
                            logging.info("skipping optimizing the meta-learner....")
                            skip = True
                            break
                    if not skip:
                        implicit = fn.hessian_vector_product_Unet(
                            model, samplemodel, vector, xb, yb, qs, criterion, args, masks, bg)
                        for v, g in zip(samplemodel.parameters(), implicit, strict=True):
                            v.grad = -alpha * g.data
                    optimizer_arch.step()
        output = model(x)
        q = torch.softmax(samplemodel(x), 1)
        masks = None
        if args.distdetach:
            masks = loss_mask_levels(soft_distance_mask(torch.tensor(dist[sl]), args, dtype)
                                     .to(dev), args)
        qs = generator_levels(q, args)
        qs = [t.detach() for t in qs] if args.deepsupervision else qs.detach()
        loss = fn.calculate_loss(args, y, output, qs, detach=True, logging=logging,
                                 loss_masks=masks, BGcls=bg)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12)
        optimizer.step()
        _record_iteration(meters, args, it, output, loss, ypick, outputval, yvb, vals, B)
        end = meters.end_iteration(logging, args, epoch, it, end)
    meters.log_tensorboard(args, epoch)
    return meters


def _record_iteration(meters: EpochMeters, args, it: int, output, loss, ypick, outputval, yvb,
                      vals, n: int) -> None:
    """Meters after an iteration: loss and Prec@1 of the batch; every ``taskupdate``
    iterations the last meta-step sample's Prec@1 and diagnostics, each weighted by ``n``."""
    y_acc = ypick.clone()
    if args.manuallabel:
        y_acc[y_acc == 1] = 0
        y_acc[y_acc == 2] = 1
    z = output[0] if args.deepsupervision else output
    meters.losses.update(float(loss.detach()), n)
    meters.top1.update(accuracy_top1(z, y_acc.long(), args.NumsClass), n)
    if it % args.taskupdate == 0:
        zv = outputval[0] if args.deepsupervision else outputval
        meters.top1val.update(accuracy_top1(zv, yvb, args.NumsClass), n)
        for name, v in zip(VAL_METERS, vals, strict=True):
            meters.val[name].update(float(v.detach()), n)

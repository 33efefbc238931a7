"""Drop-in ``train`` of the reference's ``common.py``: its epoch on colabx's meta step."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call

from colabx.compat.common import calcualte_loss_val, calculate_loss, fork_safe
from colabx.compat.twins import (
    EpochMeters,
    accuracy_top1,
    generator_levels,
    loss_mask_levels,
    soft_distance_mask,
)
from colabx.method.meta_step import META_MODES, MetaConfig, MetaStep
from colabx.models.cpu_convolutions import onednn_convolutions

__all__ = ["train"]



class _Tap(torch.nn.Module):
    """One of the reference's networks as :class:`~colabx.method.MetaStep` sees it (a list of
    ``levels`` outputs with deep supervision, ``output_strides`` 2^k), recording the detached
    outputs of its calls made with autograd on in ``taps`` (when a list): in a meta step those
    are f(x) (unless the caller passed f's logits), then f_θ*(x) (the θ± forwards run under
    ``no_grad``), and g(x) once."""

    def __init__(self, net: torch.nn.Module, levels: int) -> None:
        super().__init__()
        self.net = net
        self.deep_supervision = levels > 1
        self.output_strides = [2**k for k in range(levels)]
        self.taps: list | None = None

    def forward(self, x: Tensor):
        out = self.net(x)
        if self.deep_supervision:
            out = list(out)[:len(self.output_strides)]
        if self.taps is not None and torch.is_grad_enabled():
            self.taps.append([t.detach() for t in out] if isinstance(out, list) else out.detach())
        return out


def _check_inputs(sampling_results, args, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not isinstance(sampling_results, (list, tuple)) or len(sampling_results) < 3:
        raise ValueError("train: sampling_results must be the sampler's (images, labels, "
                         "distances, ...) sequence")
    inputs, target, dist = (np.asarray(a) for a in sampling_results[:3])
    if inputs.ndim != 5 or target.ndim != 4:
        raise ValueError(f"train: images must be [N, C, D, H, W] and labels [N, D, H, W], got "
                         f"{inputs.shape} and {target.shape}")
    if len(inputs) < n or len(target) < n or (args.distdetach and len(dist) < n):
        raise ValueError(f"train: numIteration × batch_size = {n} patches needed, the sampler "
                         f"gave {len(inputs)}")
    return inputs, target, dist


def _unrolled_logits(model: torch.nn.Module, args, xb: Tensor, yb: Tensor, qs, masks,
                     bg: int, alpha: float):
    """f_θ*(x_b) with θ* = θ − α ∇θ L(f_θ(x_b)) (``vanilla`` / ``manuallabel``, where the
    reference computes the meta loss for its log only): no copy of the network, no graph kept."""
    z = model(xb)
    loss = calculate_loss(args, yb, z, qs, losstype=0, loss_masks=masks, BGcls=bg)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()))
    star = {n: p.detach() - alpha * g for (n, p), g in zip(params.items(), grads, strict=True)}
    with torch.no_grad():
        return functional_call(model, star, (xb,))


def _samples_independent(model: torch.nn.Module) -> bool:
    """Whether a forward of ``model`` on a batch gives each sample what a forward on it alone
    gives, so one forward can serve several steps: no batch norm and no active dropout."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training:
            return False
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            return False
    return True


def _rows(output, s: slice, levels: int):
    """Rows ``s`` of the network's raw output, as :class:`_Tap` hands it to the meta step."""
    if levels > 1:
        return [t[s] for t in list(output)[:levels]]
    return output[s]


def _class_counts(scores: Tensor, t: int) -> np.ndarray:
    """Per sample of ``scores`` ``[B, t, *S]``, the voxel count of each class of its argmax."""
    per_sample = scores.argmax(1).reshape(scores.shape[0], -1)
    return torch.stack([torch.bincount(s, minlength=t) for s in per_sample]).cpu().numpy()


def _background_task(meters: EpochMeters, logits: Tensor, t: int) -> int:
    """Record each sample's counts of the generator's classes (argmax of its logits, as the
    reference); return the background class after the last sample."""
    bg = 0
    for row in _class_counts(logits, t):
        bg = meters.background_task(row.astype(float))
    return bg


def _task_portions(logits: Tensor, t: int) -> list[np.ndarray]:
    """Each sample's class fractions for the "Task 1 portion" log lines: the argmax of the
    softmax probabilities, as the reference logs them (near-tied logits can tie there)."""
    counts = _class_counts(torch.softmax(logits, 1), t)
    return list(counts / counts[0].sum())


@fork_safe
def train(sampling_results: Sequence, sampling_results_val, model: torch.nn.Module,
          samplemodel: torch.nn.Module, criterion, optimizer: torch.optim.Optimizer,
          optimizer_arch: torch.optim.Optimizer, alpha: float, epoch: int, logging, args,
          bratsflag: bool = False, *, meta_mode: str = "per_sample") -> EpochMeters:
    """One epoch of the reference's ``common.train``, same signature, logging and updates.

    Per iteration (``args.numIteration``, patches ``args.batch_size`` at a time from
    ``sampling_results = (images [N, C, *S], labels [N, *S], distances [N, *S], ...)``):

    * every ``args.taskupdate`` iterations the meta step. CoLab mode (neither ``vanilla`` nor
      ``manuallabel``): :class:`colabx.method.MetaStep` with ``model`` and ``samplemodel`` as
      they are (no network rebuilt), context labels from the generator with the soft mask
      ``min(1, exp((threshold_sub − d)/threshold_dev))`` of the distance patches when
      ``distdetach`` (no mask otherwise), L_ROI on θ*, the finite difference at ε = 0.01/‖v‖,
      ``optimizer_arch`` stepping after each sample (``meta_mode="per_sample"``, the
      reference's semantics) or once per batch (``"batched"``). ``vanilla`` / ``manuallabel``:
      the generator is not updated; θ* of the last sample is computed for the log only;
    * the ordinary step of θ on the batch: :func:`colabx.compat.calculate_loss` with
      ``detach=True`` against the detached generator levels, gradient norm clipped to 12,
      ``optimizer.step()``.

    Labels, distances and images go to ``model``'s device once per iteration; masks, pooled
    generator levels and deep-supervision labels are made there. On the CPU the networks' 3D
    convolutions run on oneDNN (:func:`colabx.models.onednn_convolutions`): per-sample passes
    are batch 1, which PyTorch otherwise runs on its slow kernel. Logged as the reference does:
    the epoch banner, ``average BG class is`` (first sample of each meta step), the generator's
    class fractions with deep supervision on ``print_freq`` iterations, the skip notice, the
    ``Epoch: [e][i/n] ...`` line every ``print_freq`` iterations and, with
    ``args.tensorboard``, the epoch averages through ``tensorboard_logger``. The meta
    diagnostics logged are the last sample's (per-sample mode) or the batch's (batched).

    Differences from the reference, outside the updates except the degenerate case of the
    skip rule: the generator update is skipped (and the notice logged) only when the whole meta
    gradient v is 0 or not finite (the reference skips when any layer's part of v is all zero);
    torch's global random generator is left where it was (the reference initialises a fresh
    U-Net per meta step, which draws from it, so later draws differ); ``vanilla``'s debugging
    comparison with ``calculate_loss_origin`` is not logged; ``sampling_results_val``,
    ``criterion`` and ``bratsflag`` are unused, as in the reference. Deep-supervision levels
    have strides 2^k on every axis, as the reference's pooling of the generator output assumes
    (patches whose network pools anisotropically fail there and here). ROI voxels keep their
    label (mask 1) at every level, also without deep supervision, where the reference's
    ``calculate_loss`` blends an ROI voxel whose distance exceeds ``threshold_sub`` with
    background (its deep-supervision branch forces the mask to 1 there, as colabx does); with
    the reference sampler's distance maps (0 or negative inside the ROI) that never happens.
    Each case's distance
    map is the sampler's work: :func:`colabx.compat.cache_distance_maps` makes it once per run.

    Returns the epoch's :class:`~colabx.compat.twins.EpochMeters` (the reference returns
    None). Raises ValueError on a ``meta_mode`` other than ``"per_sample"`` / ``"batched"``
    or on sampler output of the wrong layout or length.
    """
    if meta_mode not in META_MODES:
        raise ValueError(f"train: meta_mode must be one of {META_MODES}, got {meta_mode!r}")
    cpu = next(model.parameters()).device.type == "cpu"
    with onednn_convolutions(cpu):
        return _epoch(sampling_results, model, samplemodel, optimizer, optimizer_arch, alpha,
                      epoch, logging, args, meta_mode)


def _epoch(sampling_results, model, samplemodel, optimizer, optimizer_arch, alpha, epoch,
           logging, args, meta_mode) -> EpochMeters:
    B, n_it = int(args.batch_size), int(args.numIteration)
    inputs, target, dist = _check_inputs(sampling_results, args, B * n_it)
    p0 = next(model.parameters())
    dev, dtype = p0.device, p0.dtype  # the reference feeds float32 (its networks' dtype)
    c, t = args.NumsClass, args.taskcls
    deep = bool(args.deepsupervision)
    colab = not args.vanilla and not args.manuallabel
    levels = int(args.downsampling) if deep else 1
    f, g = _Tap(model, levels), _Tap(samplemodel, 1)
    share = colab and _samples_independent(model)
    margin, tau = ((float(args.threshold_sub), float(args.threshold_dev)) if args.distdetach
                   else (0.0, 1.0))  # d = 0 below: M = exp(0) = 1 everywhere
    meta = MetaStep(f, g, MetaConfig(num_classes=c, margin=margin, tau=tau, fd_eps=0.01,
                                     mode=meta_mode, skip_without_roi=False))
    logging.info(" **************** epoch " + str(epoch) + " is starting ****************")
    meters = EpochMeters()
    model.train()
    samplemodel.train()
    end = time.time()
    bg, last = 0, None
    for it in range(n_it):
        sl = slice(it * B, (it + 1) * B)
        x = torch.as_tensor(inputs[sl]).to(dev, dtype)
        y = torch.as_tensor(target[sl]).to(dev).long()
        d64 = torch.as_tensor(dist[sl]).to(dev) if args.distdetach else None
        d = d64.to(dtype) if d64 is not None else torch.zeros(y.shape, dtype=dtype, device=dev)
        yval = torch.where(y == 1, 0, torch.where(y == 2, 1, y)) if args.manuallabel else y
        # f at θ on the batch: the plain update's forward and, as θ stays put during the meta
        # steps, each inner step's too (their backwards go through its rows)
        output = model(x) if share else None
        if it % args.taskupdate == 0:
            items = ([slice(b, b + 1) for b in range(B)] if meta_mode == "per_sample"
                     else [slice(0, B)])
            for i, s in enumerate(items):
                if colab:
                    f.taps, g.taps = [], []
                    logits = None if output is None else _rows(output, s, levels)
                    info = meta.step(x[s], y[s], d[s], alpha, optimizer_arch, logits=logits)[0]
                    gen, zval = g.taps[0], f.taps[-1]  # f's last graph-recording call: θ*
                    f.taps = g.taps = None
                    if info.skipped:
                        logging.info("skipping optimizing the meta-learner....")
                else:
                    with torch.no_grad():
                        gen = samplemodel(x[s])
                    zval = None
                bg = _background_task(meters, gen, t)
                if i == 0:
                    logging.info("average BG class is " + str(bg))
                if deep and it % args.print_freq == 0:
                    for frac in _task_portions(gen, t):
                        for k in range(t):
                            logging.info("Task 1 portion" + str(k) + " " + str(frac[k]))
                if i < len(items) - 1:
                    continue
                if zval is None:  # vanilla / manuallabel: θ* of the last sample, for the log
                    masks = None
                    if args.distdetach:
                        masks = loss_mask_levels(soft_distance_mask(d64[s], args, dtype), args)
                    zval = _unrolled_logits(model, args, x[s], y[s],
                                            generator_levels(torch.softmax(gen, 1), args),
                                            masks, bg, alpha)
                last = (zval, yval[s], calcualte_loss_val(args, yval[s], zval))
        if output is None:
            output = model(x)
        with torch.no_grad():
            qs = generator_levels(torch.softmax(samplemodel(x), 1), args)
        masks = loss_mask_levels(soft_distance_mask(d64, args, dtype), args) if args.distdetach \
            else None
        loss = calculate_loss(args, y, output, qs, detach=True, logging=logging,
                              loss_masks=masks, BGcls=bg)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12)
        optimizer.step()
        meters.losses.update(float(loss.detach()), B)
        meters.top1.update(accuracy_top1(output[0] if deep else output, yval, c), B)
        if it % args.taskupdate == 0:
            zval, yv, vals = last
            meters.top1val.update(accuracy_top1(zval[0] if deep else zval, yv, c), B)
            for meter, v in zip(meters.val.values(), vals, strict=True):
                meter.update(float(v.detach()), B)
        end = meters.end_iteration(logging, args, epoch, it, end)
    meters.log_tensorboard(args, epoch)
    return meters

"""Pure-PyTorch CoLab meta steps: the test oracles and the benchmark baselines (docs/design.md,
"The meta step").

Two implementations of the same algorithm, both with the twin ops of :mod:`colabx.twins`:

* :func:`reference_meta_step` does it the way the public CoLab code does: a loop over the samples
  of the batch, a fresh copy of the segmentation network per sample, and the finite difference
  by two separate passes, θ+ and then θ−, each a full forward of the generator, the context
  labels, the network and the loss followed by its own backward to ω (two generator backwards).
  One inner step and one generator update per sample.
* :func:`restructured_meta_step` is the strongest plain-PyTorch version of colabx's algorithm:
  one generator forward with its graph kept, a batched inner step, the θ+ and θ− forwards without
  autograd graphs (sequential), ∂L_seg/∂ŷ taken on the loss alone, and ONE backward of
  −α (G+ − G−)/(2ε) through the context labels and the generator.

:func:`reference_plain_step` is the ordinary SGD update of θ on labels from the (updated)
generator. All functions take the segmentation net ``f`` (a :class:`colabx.models.UNet`, with or
without deep supervision) and the generator ``g`` (``t`` outputs, no deep supervision).
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch.func import functional_call

from colabx._precision import tf32_unless
from colabx.twins.context_labels import context_labels_twin
from colabx.twins.dice_ce_loss import dice_ce_loss
from colabx.twins.roi_bce_loss import roi_bce_loss

__all__ = ["reference_meta_step", "reference_plain_step", "restructured_meta_step"]


def _levels(f: torch.nn.Module):
    return f.output_strides if getattr(f, "deep_supervision", False) else 1


def _full_res(out):
    return out[0] if isinstance(out, (list, tuple)) else out


def _labels(g, x, y, d, num_classes, margin, tau, levels, autocast=None):
    """context_labels(g(x)), the generator's forward under ``autocast`` when given."""
    with autocast if autocast is not None else contextlib.nullcontext():
        o = g(x)
    return context_labels_twin(o, y, d, num_classes, margin, tau, levels)


def _detach(yhat):
    if isinstance(yhat, (list, tuple)):
        return [t.detach() for t in yhat]
    return yhat.detach()


def _set_generator_grad(g: torch.nn.Module, grads, accumulate: bool) -> None:
    for p, gr in zip(g.parameters(), grads, strict=True):
        if gr is None:
            continue
        if accumulate and p.grad is not None:
            p.grad.add_(gr)
        else:
            p.grad = gr.clone()


def reference_meta_step(f, g, x, y, d, num_classes: int, lr: float, gen_optimizer=None,
                        margin: float = 30.0, tau: float = 20.0, fd_eps: float = 0.01) -> list:
    """The reference code's meta step (per-sample loop, two generator backwards per sample).

    For each sample b: ŷ = context_labels(g(x_b)); θ* = θ − lr ∇θ L_seg(f_θ(x_b), ŷ) on a copy of
    ``f``; v = ∇θ* L_ROI(f_θ*(x_b), y_b); ε = fd_eps/‖v‖; for θ+ = θ + εv and θ− = θ − εv in turn:
    L_seg(f_θ±(x_b), context_labels(g(x_b))) and its gradient w.r.t. ω; ω-gradient
    −lr (∇ω L+ − ∇ω L−)/(2ε); then ``gen_optimizer.step()`` (so sample b+1 sees the updated ω).
    Samples whose distances are all +inf (no ROI in their case: ŷ does not depend on ω), or with
    ‖v‖ = 0, are skipped (the reference skips on a zero layer of v only). With
    ``gen_optimizer=None`` the per-sample gradients are summed into the generator's ``.grad``
    and ω stays fixed.
    ``f``'s parameters are never changed. Returns one dict per sample (``skipped``, ``v_norm``).
    """
    levels = _levels(f)
    roi = list(range(1, num_classes))
    gparams = list(g.parameters())
    if gen_optimizer is None:
        for p in gparams:
            p.grad = None
    infos = []
    for b in range(x.shape[0]):
        xb, yb, db = x[b:b + 1], y[b:b + 1], d[b:b + 1]
        if not bool(torch.isfinite(db).any()):
            infos.append({"skipped": True, "v_norm": 0.0})
            continue
        meta = copy.deepcopy(f)  # the reference rebuilds the network for every sample
        mparams = list(meta.parameters())
        theta = [p.detach().clone() for p in mparams]
        # inner step θ* = θ − lr ∇θ L_seg
        loss = dice_ce_loss(meta(xb), _labels(g, xb, yb, db, num_classes, margin, tau, levels))
        grads = torch.autograd.grad(loss, mparams)
        with torch.no_grad():
            for p, gr in zip(mparams, grads, strict=True):
                p.sub_(lr * gr)
        # v = ∇θ* L_ROI
        v = torch.autograd.grad(roi_bce_loss(_full_res(meta(xb)), yb, roi), mparams,
                                allow_unused=True, materialize_grads=True)
        vnorm = torch.sqrt(sum((t.double() ** 2).sum() for t in v))
        if not bool(torch.isfinite(vnorm)) or float(vnorm) == 0.0:
            infos.append({"skipped": True, "v_norm": float(vnorm)})
            continue
        eps = fd_eps / vnorm.to(theta[0].dtype)
        pm = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, t0, vt in zip(mparams, theta, v, strict=True):
                    p.copy_(t0 + sign * eps * vt)
            loss = dice_ce_loss(meta(xb), _labels(g, xb, yb, db, num_classes, margin, tau,
                                                  levels))
            pm.append(torch.autograd.grad(loss, gparams, allow_unused=True))
        ggrad = [None if (a is None or c is None) else -lr * (a - c) / (2 * eps)
                 for a, c in zip(pm[0], pm[1], strict=True)]
        if gen_optimizer is not None:
            gen_optimizer.zero_grad(set_to_none=True)
            _set_generator_grad(g, ggrad, accumulate=False)
            gen_optimizer.step()
        else:
            _set_generator_grad(g, ggrad, accumulate=True)
        infos.append({"skipped": False, "v_norm": float(vnorm)})
    return infos


def restructured_meta_step(f, g, x, y, d, num_classes: int, lr: float, gen_optimizer=None,
                           margin: float = 30.0, tau: float = 20.0, fd_eps: float = 0.01,
                           amp: bool = False, amp_dtype: torch.dtype = torch.bfloat16,
                           fd_tf32: bool = False) -> dict:
    """colabx's algorithm in plain PyTorch: batched, sequential θ±, one generator backward.

    ŷ = context_labels(g(x)) once (graph kept); θ* = θ − lr ∇θ L_seg(f_θ(x), ŷ) over the batch;
    v = ∇θ* L_ROI; ε = fd_eps/‖v‖; under ``no_grad`` the logits of f_θ+ and f_θ− (one after the
    other); G± = ∂L_seg(f_θ±(x), ŷ)/∂ŷ on a detached ŷ; one backward of −lr (G+ − G−)/(2ε)
    through context_labels and g. The generator's ``.grad`` is overwritten; ``gen_optimizer``,
    if given, then steps. Skipped (grads None, no step) when all the batch's distances are +inf
    or ‖v‖ = 0.
    Precision as :class:`colabx.method.MetaConfig`: ``amp`` autocasts the generator, inner-step
    and L_ROI forwards to ``amp_dtype``; the θ± forwards run without autocast, in full fp32
    unless ``fd_tf32``.
    """
    levels = _levels(f)
    roi = list(range(1, num_classes))
    for p in g.parameters():
        p.grad = None
    if not bool(torch.isfinite(d).any()):
        return {"skipped": True, "v_norm": 0.0}
    autocast = torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp)
    yhat = _labels(g, x, y, d, num_classes, margin, tau, levels, autocast)
    yhat_d = _detach(yhat)
    names = [n for n, _ in f.named_parameters()]
    params = [p for _, p in f.named_parameters()]
    with autocast:
        z = f(x)
    loss = dice_ce_loss(z, yhat_d)
    grads = torch.autograd.grad(loss, params)
    star = {n: (p.detach() - lr * gr).requires_grad_()
            for n, p, gr in zip(names, params, grads, strict=True)}
    with autocast:
        z_star = _full_res(functional_call(f, star, (x,)))
    lroi = roi_bce_loss(z_star, y, roi)
    v = torch.autograd.grad(lroi, list(star.values()), allow_unused=True,
                            materialize_grads=True)
    vnorm = torch.sqrt(sum((t.double() ** 2).sum() for t in v))
    if not bool(torch.isfinite(vnorm)) or float(vnorm) == 0.0:
        return {"skipped": True, "v_norm": float(vnorm)}
    eps = fd_eps / vnorm.to(params[0].dtype)
    gs = []
    for sign in (1.0, -1.0):
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False), \
                tf32_unless(fd_tf32):
            pp = {n: p.detach() + sign * eps * vt
                  for n, p, vt in zip(names, params, v, strict=True)}
            z = functional_call(f, pp, (x,))
        leaf = ([t.clone().requires_grad_() for t in yhat_d] if isinstance(yhat_d, list)
                else yhat_d.clone().requires_grad_())
        lp = dice_ce_loss(z, leaf)
        gs.append(torch.autograd.grad(lp, leaf if isinstance(leaf, list) else [leaf]))
    coef = -lr / (2 * eps)
    upstream = [coef * (a - c) for a, c in zip(gs[0], gs[1], strict=True)]
    torch.autograd.backward(yhat if isinstance(yhat, list) else [yhat], upstream)
    if gen_optimizer is not None:
        gen_optimizer.step()
    return {"skipped": False, "v_norm": float(vnorm)}


def reference_plain_step(f, g, x, y, d, num_classes: int, seg_optimizer,
                         margin: float = 30.0, tau: float = 20.0) -> float:
    """The ordinary update of θ: ŷ = context_labels(g(x)) without gradient, L_seg(f(x), ŷ),
    backward, ``seg_optimizer.step()``. Returns the loss."""
    with torch.no_grad():
        yhat = _labels(g, x, y, d, num_classes, margin, tau, _levels(f))
    seg_optimizer.zero_grad(set_to_none=True)
    loss = dice_ce_loss(f(x), yhat)
    loss.backward()
    seg_optimizer.step()
    return float(loss.detach())

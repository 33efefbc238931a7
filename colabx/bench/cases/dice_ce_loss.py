"""Benchmark cases for colabx.dice_ce_loss and colabx.roi_bce_loss: forward + backward
(∂logits and ∂targets) vs the pure-PyTorch twin, eager and torch.compile'd."""

from __future__ import annotations

import torch

import colabx
from colabx.bench.harness import Case
from colabx.twins import dice_ce_loss as ref
from colabx.twins import roi_bce_loss as bce_ref


def _fwd_bwd(loss_fn, wrt):
    def run():
        loss = loss_fn()
        return torch.autograd.grad(loss, wrt)

    return run


def _dice_case(device: torch.device, b: int, k: int, spatial: tuple[int, ...],
               logits_dtype: torch.dtype) -> Case:
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (b, k, *spatial)
    z = (2 * torch.randn(shape, generator=g)).to(device=device, dtype=logits_dtype)
    y = torch.softmax(2 * torch.randn(shape, generator=g), 1).to(device)
    z.requires_grad_()
    y.requires_grad_()
    compiled = torch.compile(ref.dice_ce_loss)
    n = z.numel()
    zb, yb = z.element_size(), y.element_size()
    size = "x".join(str(s) for s in shape) + f" {str(logits_dtype).replace('torch.', '')}"
    return Case(
        op="dice_ce_loss fwd+bwd",
        size=size,
        impls={
            "colabx": _fwd_bwd(lambda: colabx.dice_ce_loss(z, y), (z, y)),
            "eager": _fwd_bwd(lambda: ref.dice_ce_loss(z, y), (z, y)),
            "compile": _fwd_bwd(lambda: compiled(z, y), (z, y)),
        },
        # read logits and targets once, write ∂logits and ∂targets once
        bytes_moved=2 * n * (zb + yb),
        notes={"targets": "soft float32", "dice_channels": "1..K-1"},
    )


def _levels_case(device: torch.device, b: int, k: int, spatial: tuple[int, ...],
                 n_levels: int) -> Case:
    """Deep supervision as the trainer calls it: soft targets at the full size and n_levels - 1
    halvings, the reference's level weights. Against the eager twin only: it times colabx's
    one-launch levels, and a torch.compile of eight inputs would add its compile time to the GPU
    check's time-limited bench stage."""
    g = torch.Generator(device="cpu").manual_seed(2)
    zs, ys = [], []
    for i in range(n_levels):
        shape = (b, k, *(s >> i for s in spatial))
        zs.append((2 * torch.randn(shape, generator=g)).to(device).requires_grad_())
        ys.append(torch.softmax(2 * torch.randn(shape, generator=g), 1).to(device)
                  .requires_grad_())
    wrt = (*zs, *ys)
    return Case(
        op="dice_ce_loss fwd+bwd",
        size="x".join(str(s) for s in (b, k, *spatial)) + f" float32, {n_levels} levels",
        impls={
            "colabx": _fwd_bwd(lambda: colabx.dice_ce_loss(zs, ys), wrt),
            "eager": _fwd_bwd(lambda: ref.dice_ce_loss(zs, ys), wrt),
        },
        bytes_moved=sum(2 * z.numel() * (z.element_size() + y.element_size())
                        for z, y in zip(zs, ys, strict=True)),
        notes={"targets": "soft float32", "level_weights": "reference default"},
    )


def _roi_case(device: torch.device, b: int, k: int, spatial: tuple[int, ...]) -> Case:
    g = torch.Generator(device="cpu").manual_seed(1)
    shape = (b, k, *spatial)
    z = (2 * torch.randn(shape, generator=g)).to(device).requires_grad_()
    lab = torch.randint(0, k, (b, *spatial), generator=g).to(device)
    roi = list(range(1, k))
    compiled = torch.compile(bce_ref.roi_bce_loss)
    return Case(
        op="roi_bce_loss fwd+bwd",
        size="x".join(str(s) for s in shape) + " float32, int64 labels",
        impls={
            # validate=False: what a training loop uses (no label-range pass / host sync)
            "colabx": _fwd_bwd(lambda: colabx.roi_bce_loss(z, lab, roi, validate=False), (z,)),
            "eager": _fwd_bwd(lambda: bce_ref.roi_bce_loss(z, lab, roi), (z,)),
            "compile": _fwd_bwd(lambda: compiled(z, lab, roi), (z,)),
        },
        bytes_moved=2 * z.numel() * z.element_size() + lab.numel() * lab.element_size(),
    )


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    if quick:
        return [_dice_case(device, 2, 3, (16, 16, 16), torch.float32),
                _levels_case(device, 2, 3, (16, 16, 16), 2),
                _roi_case(device, 2, 3, (16, 16, 16))]
    if device.type == "cuda":
        return [
            _dice_case(device, 2, 3, (80, 80, 80), torch.float32),
            _dice_case(device, 2, 3, (160, 160, 160), torch.float32),
            _dice_case(device, 2, 3, (160, 160, 160), torch.bfloat16),
            _levels_case(device, 2, 3, (80, 80, 80), 4),
            _roi_case(device, 2, 3, (160, 160, 160)),
        ]
    return [
        _dice_case(device, 2, 3, (64, 64, 64), torch.float32),
        _dice_case(device, 2, 3, (128, 128, 128), torch.float32),
        _roi_case(device, 2, 3, (96, 96, 96)),
    ]

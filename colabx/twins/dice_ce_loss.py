"""Pure-PyTorch twin of ``colabx.dice_ce_loss`` (docs/design.md, "Op 3").

Plain, readable, differentiable by autograd; the test oracle and the benchmark baseline. Works on
CPU and CUDA tensors. Arguments are assumed valid (the public ops validate them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from colabx._precision import accumulation_dtype

CE_EPS = 1e-32


def default_level_weights(n: int) -> list[float]:
    """nnU-Net-style deep-supervision weights of the reference code: 1/2^i, coarsest level 0,
    normalised to sum 1 ([1] for one level, [1, 1/2, 1/4, 0]/1.75 for four). The rule the fused
    op and the compat layer use; the twin below takes :data:`LEVEL_WEIGHTS` instead."""
    if n == 1:
        return [1.0]
    w = [1.0 / 2**i for i in range(n)]
    w[-1] = 0.0
    total = sum(w)
    return [x / total for x in w]


#: The twin's default level weights, written out (n >= 2 levels: 2^(n-2), ..., 2, 1, 0 over
#: their sum 2^(n-1) − 1; one level: 1), so that a change of :func:`default_level_weights`
#: shows up as a difference between the fused op and the twin.
LEVEL_WEIGHTS: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (1.0, 0.0),
    3: (2 / 3, 1 / 3, 0.0),
    4: (4 / 7, 2 / 7, 1 / 7, 0.0),
    5: (8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0),
    6: (16 / 31, 8 / 31, 4 / 31, 2 / 31, 1 / 31, 0.0),
    7: (32 / 63, 16 / 63, 8 / 63, 4 / 63, 2 / 63, 1 / 63, 0.0),
    8: (64 / 127, 32 / 127, 16 / 127, 8 / 127, 4 / 127, 2 / 127, 1 / 127, 0.0),
}


def as_probabilities(targets: torch.Tensor, logits: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """Soft targets as ``dtype``; hard labels ``[B, *S]`` / ``[B, 1, *S]`` as one-hot over the
    ``K`` channels of ``logits`` ``[B, K, *S]``. The rank decides which label form it is, so
    a first spatial size of 1 is not taken for the channel axis."""
    if targets.dtype.is_floating_point:
        return targets.to(dtype)
    k = logits.shape[1]
    lab = targets.long()
    if lab.dim() == logits.dim():
        lab = lab[:, 0]
    return torch.nn.functional.one_hot(lab, k).movedim(-1, 1).to(dtype)


def dice_ce_level(logits: torch.Tensor, targets: torch.Tensor, dice_channels: Sequence[int],
                  smooth: float = 1e-5) -> torch.Tensor:
    """CE + Dice of one level (no weight)."""
    dt = accumulation_dtype(logits.dtype)
    b = logits.shape[0]
    v = logits[0, 0].numel()
    p = torch.softmax(logits.to(dt), dim=1)
    y = as_probabilities(targets, logits, dt)
    ce = -(y * torch.log(p + CE_EPS)).sum() / (b * v)
    dims = tuple(range(2, logits.dim()))
    tp = (p * y).sum(dims)
    fp = (p * (1 - y)).sum(dims)
    fn = ((1 - p) * y).sum(dims)
    dc = (2 * tp + smooth) / (2 * tp + fp + fn + smooth)
    dice = -dc[:, list(dice_channels)].mean()
    return ce + dice


def dice_ce_loss(logits: torch.Tensor | Sequence[torch.Tensor],
                 targets: torch.Tensor | Sequence[torch.Tensor],
                 dice_channels: Sequence[int] | None = None,
                 level_weights: Sequence[float] | None = None,
                 smooth: float = 1e-5) -> torch.Tensor:
    """Σ_l w_l (CE_l + Dice_l) with p = softmax(logits) in fp32 (fp64 for fp64 logits)."""
    if isinstance(logits, torch.Tensor):
        logits, targets = [logits], [targets]
    k = logits[0].shape[1]
    if dice_channels is None:
        dice_channels = list(range(1, k))
    if level_weights is None:
        if len(logits) not in LEVEL_WEIGHTS:
            raise ValueError(f"no default level weights for {len(logits)} levels; pass "
                             "level_weights")
        level_weights = LEVEL_WEIGHTS[len(logits)]
    loss = None
    for z, t, w in zip(logits, targets, level_weights, strict=True):
        term = w * dice_ce_level(z, t, dice_channels, smooth)
        loss = term if loss is None else loss + term
    return loss

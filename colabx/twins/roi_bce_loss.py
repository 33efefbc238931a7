"""Pure-PyTorch twin of ``colabx.roi_bce_loss`` (docs/design.md, "Op 3").

Plain, readable, differentiable by autograd; the test oracle and the benchmark baseline. Works on
CPU and CUDA tensors. Arguments are assumed valid (the public op validates them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from colabx._precision import accumulation_dtype
from colabx.twins.dice_ce_loss import as_probabilities

BCE_EPS = 1e-6


def roi_bce_loss(logits: torch.Tensor, labels: torch.Tensor,
                 roi_channels: Sequence[int]) -> torch.Tensor:
    """One-vs-all BCE on the ROI channels of p = softmax(logits) over all K channels:
    −(1/(B·V)) Σ_voxels Σ_{j∈roi} [y_j log(p_j + 1e−6) + (1−y_j) log(1 − p_j + 1e−6)]."""
    dt = accumulation_dtype(logits.dtype)
    b = logits.shape[0]
    v = logits[0, 0].numel()
    p = torch.softmax(logits.to(dt), dim=1)
    y = as_probabilities(labels, logits, dt)
    roi = list(roi_channels)
    pr, yr = p[:, roi], y[:, roi]
    bce = yr * torch.log(pr + BCE_EPS) + (1 - yr) * torch.log(1 - pr + BCE_EPS)
    return -bce.sum() / (b * v)

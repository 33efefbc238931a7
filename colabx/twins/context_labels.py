"""Pure-PyTorch twin of :func:`colabx.context_labels` (docs/design.md, "Op 1"), written for clarity.

It is the test oracle and the benchmark baseline; autograd differentiates it w.r.t. the
generator logits. Works on CPU and CUDA tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

LevelsArg = int | Sequence[int | Sequence[int]]


def normalize_levels(levels: LevelsArg, spatial_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Per-level strides, one tuple of ``len(spatial_shape)`` ints per level.

    ``levels`` is an int ``n`` (strides ``2**k`` on every axis, ``k = 0..n-1``) or a sequence of
    per-level strides, each an int (isotropic) or a per-axis tuple. Strides must be >= 1,
    non-decreasing per axis, each dividing the next, and no larger than the spatial size.
    Raises ValueError/TypeError naming ``levels``.
    """
    nsp = len(spatial_shape)
    if isinstance(levels, bool):
        raise TypeError("levels must be an int or a sequence of strides, got bool")
    if isinstance(levels, int):
        if levels < 1 or levels > 8:
            raise ValueError(f"levels must be between 1 and 8, got {levels}")
        strides = [(2**k,) * nsp for k in range(levels)]
    elif isinstance(levels, Sequence) and not isinstance(levels, str):
        if len(levels) < 1 or len(levels) > 8:
            raise ValueError(f"levels must list between 1 and 8 strides, got {len(levels)}")
        strides = []
        for i, s in enumerate(levels):
            if isinstance(s, bool):
                raise TypeError(f"levels[{i}] must be an int or a tuple of ints, got bool")
            if isinstance(s, int):
                strides.append((s,) * nsp)
            elif isinstance(s, Sequence) and not isinstance(s, str):
                if len(s) != nsp:
                    raise ValueError(
                        f"levels[{i}] must have one stride per spatial axis ({nsp}), got {tuple(s)}"
                    )
                if not all(isinstance(v, int) and not isinstance(v, bool) for v in s):
                    raise TypeError(f"levels[{i}] must hold ints, got {tuple(s)}")
                strides.append(tuple(s))
            else:
                raise TypeError(
                    f"levels[{i}] must be an int or a tuple of ints, got {type(s).__name__}"
                )
    else:
        raise TypeError(
            f"levels must be an int or a sequence of strides, got {type(levels).__name__}"
        )
    for i, s in enumerate(strides):
        if any(v < 1 for v in s):
            raise ValueError(f"levels[{i}] strides must be >= 1, got {s}")
        if any(v > n for v, n in zip(s, spatial_shape, strict=True)):
            raise ValueError(
                f"levels[{i}] stride {s} exceeds the spatial size {tuple(spatial_shape)}"
            )
        if i > 0:
            prev = strides[i - 1]
            if any(v < p or v % p for v, p in zip(s, prev, strict=True)):
                raise ValueError(
                    f"levels strides must be non-decreasing and each must divide the next per "
                    f"axis, got {prev} then {s} at levels[{i}]"
                )
    return strides


def _sample_labels(labels: torch.Tensor, stride: Sequence[int]) -> torch.Tensor:
    """y at index r*s + s//2 per spatial axis, r < floor(S/s) (order-0 resize)."""
    out = labels
    for axis, s in enumerate(stride):
        dim = axis + 1
        n = labels.shape[dim] // s
        out = out.narrow(dim, s // 2, (n - 1) * s + 1)[
            (slice(None),) * dim + (slice(None, None, s),)
        ]
    return out


def context_labels_twin(
    gen_logits: torch.Tensor,
    labels: torch.Tensor,
    distance: torch.Tensor,
    num_classes: int,
    margin: float = 30.0,
    tau: float = 20.0,
    levels: LevelsArg = 1,
    return_mask: bool = False,
):
    """Same contract as :func:`colabx.context_labels` (without argument validation)."""
    nsp = gen_logits.dim() - 2
    strides = normalize_levels(levels, gen_logits.shape[2:])
    acc = torch.float64 if gen_logits.dtype == torch.float64 else torch.float32
    c = num_classes
    q = torch.softmax(gen_logits.to(acc), dim=1)
    d = distance.to(acc)
    M = torch.where(d < margin, torch.ones_like(d), torch.exp((margin - d) / tau))
    y = labels.long()
    avg_pool = F.avg_pool2d if nsp == 2 else F.avg_pool3d
    max_pool = F.max_pool2d if nsp == 2 else F.max_pool3d
    outs, masks = [], []
    for s in strides:
        if all(v == 1 for v in s):
            q_l, M_l, y_l = q, M, y
        else:
            q_l = avg_pool(q, kernel_size=s, stride=s)
            M_l = -max_pool(-M.unsqueeze(1), kernel_size=s, stride=s).squeeze(1)
            y_l = _sample_labels(y, s)
        roi = y_l > 0
        M_l = torch.where(roi, torch.ones_like(M_l), M_l)
        zero = torch.zeros((), dtype=acc, device=q.device)
        ctx0 = torch.where(roi, zero, M_l * q_l[:, 0] + (1 - M_l))
        ctxk = torch.where(roi.unsqueeze(1), zero, M_l.unsqueeze(1) * q_l[:, 1:])
        onehot = F.one_hot(y_l, c).movedim(-1, 1).to(acc)
        outs.append(torch.cat([ctx0.unsqueeze(1), onehot[:, 1:], ctxk], dim=1))
        masks.append(M_l)
    single = isinstance(levels, int) and levels == 1
    if single:
        return (outs[0], masks[0]) if return_mask else outs[0]
    return (outs, masks) if return_mask else outs


#: The twin's former name (deprecated): "reference" now means only the published CoLab code.
context_labels_reference = context_labels_twin

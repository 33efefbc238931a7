"""Training targets of every mode: the paper's baselines and CoLab.

All modes build the expanded soft labels with :func:`colabx.context_labels`, so every mode gets the
same channel order (``[0]`` context 0, ``[1..c-1]`` ROI classes, ``[c..]`` contexts 1..t-1) and the
same deep-supervision rules:

* ``vanilla``: t = 1 (plain one-hot labels);
* ``dilation``: t = 2, generator fixed to q = (0, 1), so background voxels get ``[1 - M, M]``;
* ``manual``: t = 1 + the number of context classes in the dataset's ``contextTr`` maps; the
  context map's class k becomes context k (hard), everywhere (M = 1); with ``context_values``
  only those map values become contexts 1.., in that order, and every other value context 0;
* ``kmeans``: t intensity clusters of the background inside the body (1-D k-means of the first
  image channel, fitted once on training cases; clusters ordered by intensity), M = 1; voxels
  outside the body join cluster 0;
* ``colab``: q from the task generator (see :mod:`colabx.method.meta_step`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.cluster.vq import kmeans2
from torch import Tensor

from colabx.ops.context_labels import context_labels

__all__ = ["FixedTargets", "fit_intensity_clusters"]

#: Logit of the chosen context in a hard context map (softmax puts < 1e-13 on the others).
_HARD_LOGIT = 30.0


def _one_hot_logits(classes: Tensor, t: int) -> Tensor:
    """``[B, *S]`` ints in 0..t-1 → ``[B, t, *S]`` logits whose softmax is (almost) one-hot."""
    oh = torch.nn.functional.one_hot(classes.long().clamp(0, t - 1), t)
    return oh.movedim(-1, 1).to(torch.float32) * _HARD_LOGIT


class FixedTargets:
    """Targets of the modes without a generator (``vanilla``, ``dilation``, ``manual``,
    ``kmeans``).

    ``targets(x, y, d, context)`` → ``list[Tensor]`` (one ``[B, K, *S_l]`` per level, finest
    first) for the levels given at construction (an int or the network's output strides).
    ``context`` is the batch's manual context map (``manual`` mode only).
    """

    def __init__(self, mode: str, num_classes: int, t: int, levels, margin: float, tau: float,
                 *, cluster_centres: Sequence[float] | None = None,
                 body_threshold: float | None = None,
                 context_values: Sequence[int] | None = None) -> None:
        if mode not in ("vanilla", "dilation", "manual", "kmeans"):
            raise ValueError(f"mode: FixedTargets has no mode {mode!r}")
        if mode == "kmeans" and (cluster_centres is None or len(cluster_centres) != t):
            raise ValueError(f"cluster_centres: kmeans mode needs {t} centres")
        self.mode, self.num_classes, self.t = mode, num_classes, t
        self.levels, self.margin, self.tau = levels, margin, tau
        self.centres = None if cluster_centres is None else sorted(cluster_centres)
        self.body_threshold = body_threshold
        self._mids: dict[tuple, Tensor] = {}
        self.context_lut = None
        if context_values is not None:
            if len(context_values) != t - 1:
                raise ValueError(f"context_values: {len(context_values)} values for t = {t} "
                                 f"(t - 1 expected)")
            lut = torch.zeros(max(context_values) + 1, dtype=torch.long)
            lut[torch.tensor(list(context_values))] = torch.arange(1, t)
            self.context_lut = lut

    def targets(self, x: Tensor, y: Tensor, d: Tensor, context: Tensor | None = None
                ) -> list[Tensor]:
        b, spatial = y.shape[0], y.shape[1:]
        if self.mode == "vanilla":
            logits = torch.zeros((b, 1, *spatial), device=y.device)
        elif self.mode == "dilation":
            logits = torch.zeros((b, 2, *spatial), device=y.device)
            logits[:, 1] = _HARD_LOGIT
        elif self.mode == "manual":
            if context is None:
                raise ValueError("context: manual mode needs the batch's context maps")
            if self.context_lut is not None:
                if self.context_lut.device != context.device:  # moved once, not per batch
                    self.context_lut = self.context_lut.to(context.device)
                lut = self.context_lut
                context = lut[context.long().clamp(0, lut.numel() - 1)] * (context < lut.numel())
            logits = _one_hot_logits(context, self.t)
            d = torch.zeros_like(d)
        else:
            logits = _one_hot_logits(self.clusters(x[:, 0]), self.t)
            d = torch.zeros_like(d)
        out = context_labels(logits, y, d, self.num_classes, self.margin, self.tau, self.levels,
                             validate=False)
        return out if isinstance(out, list) else [out]

    def clusters(self, intensity: Tensor) -> Tensor:
        """Nearest-centre cluster of every voxel (0 outside the body)."""
        key = (intensity.dtype, intensity.device)
        if key not in self._mids:  # made once: a host-to-device copy per batch would
            centres = torch.tensor(self.centres, dtype=intensity.dtype)  # stop CUDA graphs
            self._mids[key] = ((centres[1:] + centres[:-1]) / 2).to(intensity.device)
        k = torch.bucketize(intensity.contiguous(), self._mids[key])
        if self.body_threshold is not None:
            k = torch.where(intensity > self.body_threshold, k, torch.zeros_like(k))
        return k


def fit_intensity_clusters(samples: np.ndarray, t: int, seed: int = 0) -> list[float]:
    """1-D k-means of background intensities inside the body: ``t`` centres, ascending."""
    v = np.asarray(samples, np.float64).ravel()
    if v.size < t:
        raise ValueError(f"kmeans: {v.size} background voxels inside the body, need >= t = {t}")
    init = np.quantile(v, (np.arange(t) + 0.5) / t)
    centres, _ = kmeans2(v[:, None], init[:, None], iter=30, minit="matrix", seed=seed)
    return sorted(float(c) for c in centres[:, 0])

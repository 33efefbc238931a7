"""The trainer's batch source: deterministic, resumable, DDP-splittable patch batches.

Batch ``i`` is a pure function of ``(seed, i)``: sample ``b`` of it draws everything (case, patch
position, ROI voxel, augmentation) from ``numpy.random.default_rng([seed, i, b])`` and a torch
generator seeded from that. Resuming at iteration ``i``, any number of loader workers, or
splitting each batch over DDP ranks (``samples=slice(...)``, the slices concatenated) therefore
yields exactly the batches of one uninterrupted single-process run.

Per sample ``b`` of a batch of ``B``:

1. ``rng = default_rng([seed, i, b])``; a torch generator ``gen`` seeded with
   ``rng.integers(2**63)``.
2. The case: uniform over ``case_ids`` (``rng``).
3. ROI forcing, nnU-Net's "oversample the last samples" rule: the last
   ``n = floor(B * roi_fraction + 0.5)`` samples of every batch (at least 1 when
   ``roi_fraction > 0``) are ROI-forced, the others uniform. The rule depends on ``b`` only, so a
   DDP rank's slice keeps the samples' roles.
4. With augmentation: the spatial transform is drawn first (``gen``) to size the source region
   (:meth:`SpatialParams.source_size`, the patch itself when neither rotation nor scaling was
   drawn, so most patches read no more than the patch); an ROI-forced sample wants its ROI voxel
   at an offset ``t`` uniform in ``[-(P // 4), P // 4]`` from the output centre (``rng``) and is
   cut around the voxel so that it lands there after the transform. Then
   :func:`~colabx.data.sampling.sample_patch` (``rng``) and
   :func:`~colabx.data.augmentation.augment` (``gen``).

Cases are opened lazily in each process (read-only memory maps) and their ROI locations computed
on first use; nothing but the folder path and ``plans.json`` content is pickled into workers.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from colabx._threads import one_torch_thread
from colabx.data.augmentation import AugmentConfig, augment, sample_spatial
from colabx.data.preprocessing import PreprocessedDataset
from colabx.data.sampling import SamplingCase, as_patch_size, sample_patch

__all__ = ["PatchBatches", "make_loader", "num_forced"]


def num_forced(batch_size: int, roi_fraction: float) -> int:
    """How many of a batch's samples (the last ones) are ROI-forced:
    ``floor(batch_size * roi_fraction + 0.5)``, at least 1 when ``roi_fraction > 0``."""
    if roi_fraction <= 0:
        return 0
    return min(batch_size, max(1, math.floor(batch_size * roi_fraction + 0.5)))


class PatchBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item ``i`` is the batch of global iteration ``i``.

    Args:
        dataset: a preprocessed folder (:func:`colabx.data.preprocessing.load_preprocessed`).
        case_ids: the training cases (e.g. one fold's); each must be in ``dataset``.
        patch_size: ``P`` per spatial axis (or one int).
        batch_size: ``B``, the global batch size.
        seed: the run's seed.
        roi_fraction: share of ROI-forced samples per batch (see :func:`num_forced`).
        augment: augmentation settings, or None for none (then ROI-forced patches get
            :func:`~colabx.data.sampling.sample_patch`'s default jitter).
        with_context: also return the manual context maps (every case must have one).
        samples: the sample indices this process takes (a DDP rank's part of each batch);
            None = all ``B``.
        num_iterations: ``len(self)``; default unbounded (``sys.maxsize``).

    Item ``i`` (``0 <= i < num_iterations``) is a dict: ``image`` float32 ``[b, C, *P]``,
    ``label`` int64 ``[b, *P]``, ``distance`` float32 ``[b, *P]`` (mm, +inf for a patch of a case
    without ROI), ``context`` int64 ``[b, *P]`` (with ``with_context``), ``case_ids``
    ``list[str]``, ``roi_forced`` bool ``[b]``; ``b = len(range(B)[samples])``.
    """

    def __init__(
        self,
        dataset: PreprocessedDataset,
        case_ids: Sequence[str],
        *,
        patch_size: int | Sequence[int],
        batch_size: int,
        seed: int,
        roi_fraction: float = 0.5,
        augment: AugmentConfig | None,
        with_context: bool = False,
        samples: slice | None = None,
        num_iterations: int | None = None,
    ) -> None:
        if not isinstance(dataset, PreprocessedDataset):
            raise TypeError(f"dataset must be a PreprocessedDataset, got {type(dataset).__name__}")
        ids = [case_ids] if isinstance(case_ids, str) else list(case_ids)
        if not ids:
            raise ValueError("case_ids is empty: nothing to sample from")
        missing = [c for c in ids if c not in dataset.plans["cases"]]
        if missing:
            raise ValueError(f"case_ids: {missing[0]!r} is not in the preprocessed dataset "
                             f"{dataset.root}")
        if with_context:
            lacking = [c for c in ids if "context" not in dataset.plans["cases"][c]["files"]]
            if lacking:
                raise ValueError(f"with_context=True but case {lacking[0]!r} has no context map "
                                 f"in {dataset.root}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if not isinstance(roi_fraction, (int, float)) or not 0.0 <= roi_fraction <= 1.0:
            raise ValueError(f"roi_fraction must be in [0, 1], got {roi_fraction!r}")
        if augment is not None and not isinstance(augment, AugmentConfig):
            raise TypeError(f"augment must be an AugmentConfig or None, got "
                            f"{type(augment).__name__}")
        if samples is not None and not isinstance(samples, slice):
            raise TypeError(f"samples must be a slice or None, got {type(samples).__name__}")
        self.sample_indices = list(range(batch_size)[samples or slice(None)])
        if not self.sample_indices:
            raise ValueError(f"samples={samples!r} selects no sample of a batch of {batch_size}")
        n_iter = sys.maxsize if num_iterations is None else num_iterations
        if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
            raise ValueError(f"num_iterations must be a positive int or None, got "
                             f"{num_iterations!r}")
        self.dataset = dataset
        self.case_ids = ids
        self.spacing = dataset.target_spacing
        self.patch_size = as_patch_size(patch_size, len(self.spacing))
        self.batch_size = batch_size
        self.seed = int(seed)
        self.roi_fraction = float(roi_fraction)
        self.augment = augment
        self.with_context = with_context
        self.num_iterations = n_iter
        self._forced_from = batch_size - num_forced(batch_size, self.roi_fraction)
        self._ignore = dataset.plans.get("dataset", {}).get("ignore_label")
        self._cases: dict[str, SamplingCase] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cases"] = {}  # each worker opens its own memory maps
        return state

    def __len__(self) -> int:
        return self.num_iterations

    def _case(self, case_id: str) -> SamplingCase:
        case = self._cases.get(case_id)
        if case is None:
            case = SamplingCase.from_case(self.dataset.load_case(case_id), self._ignore)
            self._cases[case_id] = case
        return case

    def sample(self, iteration: int, b: int) -> dict[str, Any]:
        """Sample ``b`` of batch ``iteration``, unbatched: tensors ``[C, *P]`` / ``[*P]`` in the
        stored dtypes, plus ``case_id`` and ``roi_forced``."""
        rng = np.random.default_rng([self.seed, iteration, b])
        gen = torch.Generator().manual_seed(int(rng.integers(2**63)))
        case_id = self.case_ids[int(rng.integers(len(self.case_ids)))]
        case = self._case(case_id)
        forced = b >= self._forced_from
        cfg = self.augment
        if cfg is None or not cfg.enabled:
            arrays = sample_patch(case, self.patch_size, rng, force_roi=forced)
            out: dict[str, Any] = {k: torch.from_numpy(v) for k, v in arrays.items()}
        else:
            spatial = sample_spatial(cfg, len(self.patch_size), gen, self.spacing)
            t = [int(rng.integers(-(p // 4), p // 4 + 1)) for p in self.patch_size]
            src = spatial.source_size(self.patch_size)
            arrays = sample_patch(case, src, rng, force_roi=forced,
                                  roi_offset=spatial.source_offset(t))
            if not self.with_context:
                arrays.pop("context", None)  # not resampled for nothing
            out = augment({k: torch.from_numpy(v) for k, v in arrays.items()}, cfg, gen,
                          patch_size=self.patch_size, spacing=self.spacing, spatial=spatial)
        if not self.with_context:
            out.pop("context", None)
        out["case_id"] = case_id
        out["roi_forced"] = forced
        return out

    def __getitem__(self, iteration: int) -> dict[str, Any]:
        if not isinstance(iteration, (int, np.integer)) or not 0 <= iteration < len(self):
            raise IndexError(f"iteration {iteration!r} out of range [0, {len(self)})")
        # one thread, as in the workers: float32 reductions (the contrast and gamma transforms'
        # channel means) round differently with other counts, and batch i must not depend on it
        with one_torch_thread():
            items = [self.sample(int(iteration), b) for b in self.sample_indices]
        batch: dict[str, Any] = {
            "image": torch.stack([s["image"] for s in items]).float(),
            "label": torch.stack([s["label"] for s in items]).long(),
            "distance": torch.stack([s["distance"] for s in items]).float(),
        }
        if self.with_context:
            batch["context"] = torch.stack([s["context"] for s in items]).long()
        batch["case_ids"] = [s["case_id"] for s in items]
        batch["roi_forced"] = torch.tensor([s["roi_forced"] for s in items])
        return batch


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def make_loader(
    batches: PatchBatches,
    *,
    start: int,
    stop: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
) -> DataLoader:
    """A DataLoader yielding ``batches[start], ..., batches[stop - 1]`` in order.

    ``batch_size=None`` (items are already batches), a sequential sampler over
    ``range(start, stop)``; with ``num_workers > 0``, persistent workers each limited to one torch
    thread, ``prefetch_factor`` batches in flight per worker. Worker seeding does not matter: every
    item is seeded by its own iteration index, so the output is identical for any
    ``num_workers``. Resume a run at iteration ``k`` with ``start=k``.

    ``num_workers=0`` samples in the calling process, with one torch thread as the workers do
    (so that batch ``i`` does not depend on the thread count); prefer ``num_workers >= 1``, which
    overlaps sampling with training.
    """
    if not isinstance(batches, PatchBatches):
        raise TypeError(f"batches must be a PatchBatches, got {type(batches).__name__}")
    if not 0 <= start <= stop <= len(batches):
        raise ValueError(f"need 0 <= start <= stop <= len(batches) ({len(batches)}), got "
                         f"start={start!r}, stop={stop!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    if not isinstance(prefetch_factor, int) or prefetch_factor < 1:
        raise ValueError(f"prefetch_factor must be a positive int, got {prefetch_factor!r}")
    workers = num_workers > 0
    return DataLoader(
        batches,
        batch_size=None,
        sampler=range(start, stop),
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=workers,
        prefetch_factor=prefetch_factor if workers else None,
        worker_init_fn=_worker_init if workers else None,
    )

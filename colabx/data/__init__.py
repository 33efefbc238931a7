"""Data: dataset readers (nnU-Net v2 raw, MSD), preprocessing, the built-in phantom, patch
sampling, augmentation and the deterministic training loader.

Modules: :mod:`~colabx.data.datasets`, :mod:`~colabx.data.preprocessing`,
:mod:`~colabx.data.phantom`, :mod:`~colabx.data.sampling`, :mod:`~colabx.data.augmentation`,
:mod:`~colabx.data.loader`.
"""

from colabx.data.augmentation import AugmentConfig, augment
from colabx.data.datasets import (
    Case,
    CaseData,
    Dataset,
    DatasetError,
    check_foreground,
    load_dataset,
)
from colabx.data.loader import PatchBatches, make_loader
from colabx.data.phantom import generate_case, phantom_dataset, write_phantom
from colabx.data.preprocessing import load_preprocessed, preprocess_dataset
from colabx.data.sampling import sample_patch

__all__ = [
    "AugmentConfig",
    "Case",
    "CaseData",
    "Dataset",
    "DatasetError",
    "PatchBatches",
    "augment",
    "check_foreground",
    "generate_case",
    "load_dataset",
    "load_preprocessed",
    "make_loader",
    "phantom_dataset",
    "preprocess_dataset",
    "sample_patch",
    "write_phantom",
]

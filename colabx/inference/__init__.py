"""Inference and evaluation: sliding-window logits, the CoLab prediction rule, prediction of raw
cases (NIfTI, .nrrd, .mha) in their original grid, and segmentation metrics (Dice, sensitivity,
precision, HD95) per case and per folder."""

from colabx.inference import metrics, predict, sliding_window
from colabx.inference.metrics import *  # noqa: F403 (the package's API is its modules' APIs)
from colabx.inference.predict import *  # noqa: F403
from colabx.inference.sliding_window import *  # noqa: F403

__all__ = [*metrics.__all__, *predict.__all__, *sliding_window.__all__]

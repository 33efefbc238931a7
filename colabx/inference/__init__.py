"""Inference and evaluation: sliding-window logits, the CoLab prediction rule, prediction of raw
cases (NIfTI, .nrrd, .mha) in their original grid, and segmentation metrics (Dice, sensitivity,
precision, HD95) per case and per folder."""

from colabx.inference.metrics import (
    METRICS,
    evaluate_case,
    evaluate_folders,
    hd95,
    summarize,
    write_summary,
)
from colabx.inference.predict import (
    RawPrediction,
    predict_case,
    predict_contexts,
    predict_labels,
    predict_raw,
    predict_raw_case,
    roi_probabilities,
    save_prediction,
)
from colabx.inference.sliding_window import (
    gaussian_importance_map,
    sliding_window_logits,
    sliding_window_steps,
)

__all__ = [
    "METRICS",
    "RawPrediction",
    "evaluate_case",
    "evaluate_folders",
    "gaussian_importance_map",
    "hd95",
    "predict_case",
    "predict_contexts",
    "predict_labels",
    "predict_raw",
    "predict_raw_case",
    "roi_probabilities",
    "save_prediction",
    "sliding_window_logits",
    "sliding_window_steps",
    "summarize",
    "write_summary",
]

"""The CoLab method: the meta step that trains the task generator (:mod:`colabx.method.meta_step`)
and the training targets of every mode (:mod:`colabx.method.targets`); docs/design.md, "The meta
step"."""

from colabx.method.meta_step import (
    DIFFERENCES,
    ORDERS,
    GradReducer,
    InnerPass,
    MetaConfig,
    MetaStep,
    MetaStepInfo,
    MetaTensors,
    UpdateCounter,
    current_lr,
)
from colabx.method.targets import FixedTargets, fit_intensity_clusters

__all__ = [
    "DIFFERENCES",
    "ORDERS",
    "FixedTargets",
    "GradReducer",
    "InnerPass",
    "MetaConfig",
    "MetaStep",
    "MetaStepInfo",
    "MetaTensors",
    "UpdateCounter",
    "current_lr",
    "fit_intensity_clusters",
]

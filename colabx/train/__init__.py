"""The CoLab trainer (``colabx train``): configuration, targets of every mode, the training loop,
checkpoints, logs and data-parallel training."""

from colabx.train.config import PRESETS, ConfigError, TrainConfig, load_config
from colabx.train.trainer import Trainer, default_config

__all__ = ["PRESETS", "ConfigError", "TrainConfig", "Trainer", "default_config", "load_config"]

"""The CoLab trainer (``colabx train``): configuration, targets of every mode, the training loop,
checkpoints, logs and data-parallel training."""

from colabx.train.config import PRESETS, ConfigError, TrainConfig, load_config

__all__ = ["PRESETS", "ConfigError", "TrainConfig", "Trainer", "default_config", "load_config"]


def __getattr__(name: str):
    # the trainer pulls in the data loader and inference stack; import it on first use
    if name in ("Trainer", "default_config"):
        from colabx.train import trainer

        return getattr(trainer, name)
    raise AttributeError(name)

"""The CoLab trainer (``colabx train``): configuration, the training loop, evaluation, logs,
compare and data-parallel training (the targets of every mode are in :mod:`colabx.method`)."""

from colabx.train.config import PRESETS, TRAIN_PRESETS, ConfigError, TrainConfig, load_config

__all__ = ["PRESETS", "TRAIN_PRESETS", "ConfigError", "TrainConfig", "Trainer", "default_config",
           "load_config"]


def __getattr__(name: str):
    # the trainer pulls in the data loader and inference stack; import it on first use
    if name in ("Trainer", "default_config"):
        from colabx.train import trainer

        return getattr(trainer, name)
    raise AttributeError(name)

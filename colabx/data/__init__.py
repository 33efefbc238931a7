"""Dataset reading: the nnU-Net v2 raw and MSD layouts (see :mod:`colabx.data.datasets`)."""

from colabx.data.datasets import (
    Case,
    CaseData,
    Dataset,
    DatasetError,
    check_foreground,
    load_dataset,
)

__all__ = ["Case", "CaseData", "Dataset", "DatasetError", "check_foreground", "load_dataset"]

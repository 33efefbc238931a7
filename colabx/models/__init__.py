"""Networks of CoLab: the segmentation U-Net and the task generator (same U-Net, t outputs).

See :mod:`colabx.models.unet` for the reference configuration they reproduce.
"""

from colabx.models.unet import (
    DEFAULT_MAX_FEATURES,
    UNet,
    reference_pool_kernel_sizes,
    task_generator,
)

__all__ = [
    "DEFAULT_MAX_FEATURES",
    "UNet",
    "reference_pool_kernel_sizes",
    "task_generator",
]

"""Networks of CoLab: the segmentation U-Net, the task generator (same U-Net, t outputs) and the
network plan that sizes both from the data, and :func:`onednn_convolutions`, which runs their
CPU convolutions on oneDNN's fast paths and their CPU InstanceNorm as GroupNorm.

See :mod:`colabx.models.unet` for the reference configuration they reproduce and
:mod:`colabx.models.plan` for the plan stored in checkpoints.
"""

from colabx.models.cpu_convolutions import (
    disable_onednn_convolutions,
    enable_onednn_convolutions,
    onednn_convolutions,
)
from colabx.models.plan import NetworkPlan, auto_patch_size, build_networks, pool_kernel_sizes
from colabx.models.unet import (
    DEFAULT_MAX_FEATURES,
    UNet,
    reference_pool_kernel_sizes,
    task_generator,
)

__all__ = [
    "DEFAULT_MAX_FEATURES",
    "NetworkPlan",
    "UNet",
    "auto_patch_size",
    "build_networks",
    "disable_onednn_convolutions",
    "enable_onednn_convolutions",
    "onednn_convolutions",
    "pool_kernel_sizes",
    "reference_pool_kernel_sizes",
    "task_generator",
]

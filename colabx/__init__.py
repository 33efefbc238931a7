"""colabx: fast, faithful Context Label Learning (CoLab, Li et al., IEEE TMI 2023).

The fused ops are importable from the top level; see each function's docstring for its contract.
"""

from colabx.ops.context_labels import context_labels
from colabx.ops.dice_ce_loss import dice_ce_loss
from colabx.ops.distance_transform import distance_transform
from colabx.ops.roi_bce_loss import roi_bce_loss

__version__ = "0.1.0"

__all__ = [
    "context_labels",
    "dice_ce_loss",
    "distance_transform",
    "roi_bce_loss",
]

"""Deprecated alias of :mod:`colabx.twins.dice_ce_loss` and :mod:`colabx.twins.roi_bce_loss`
(the twins moved there, the ROI BCE into a module of its own); importing it raises a
DeprecationWarning. Import from ``colabx.twins.dice_ce_loss`` / ``colabx.twins.roi_bce_loss``
instead."""

import warnings

from colabx.twins.dice_ce_loss import CE_EPS, default_level_weights, dice_ce_level, dice_ce_loss
from colabx.twins.roi_bce_loss import BCE_EPS, roi_bce_loss

__all__ = ["BCE_EPS", "CE_EPS", "default_level_weights", "dice_ce_level", "dice_ce_loss",
           "roi_bce_loss"]

warnings.warn(
    "colabx.reference.dice_ce_loss is deprecated: it moved to colabx.twins.dice_ce_loss "
    "(the ROI BCE to colabx.twins.roi_bce_loss)",
    DeprecationWarning,
    stacklevel=2,
)

"""Deprecated alias of :mod:`colabx.twins.dice_ce_loss` (moved there);
importing it raises a DeprecationWarning. Import from ``colabx.twins.dice_ce_loss`` instead."""

import sys
import warnings

from colabx.twins import dice_ce_loss as _moved

warnings.warn(
    "colabx.reference.dice_ce_loss is deprecated: it moved to colabx.twins.dice_ce_loss",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved

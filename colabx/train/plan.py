"""Deprecated alias of :mod:`colabx.models.plan` (moved there);
importing it raises a DeprecationWarning. Import from ``colabx.models.plan`` instead."""

import sys
import warnings

from colabx.models import plan as _moved

warnings.warn(
    "colabx.train.plan is deprecated: it moved to colabx.models.plan",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved

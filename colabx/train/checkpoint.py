"""Deprecated alias of :mod:`colabx.checkpoint` (moved there);
importing it raises a DeprecationWarning. Import from ``colabx.checkpoint`` instead."""

import sys
import warnings

from colabx import checkpoint as _moved

warnings.warn(
    "colabx.train.checkpoint is deprecated: it moved to colabx.checkpoint",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved

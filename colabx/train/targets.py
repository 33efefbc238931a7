"""Deprecated alias of :mod:`colabx.method.targets` (moved there);
importing it raises a DeprecationWarning. Import from ``colabx.method.targets`` instead."""

import sys
import warnings

from colabx.method import targets as _moved

warnings.warn(
    "colabx.train.targets is deprecated: it moved to colabx.method.targets",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved

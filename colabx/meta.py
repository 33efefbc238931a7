"""Deprecated alias of :mod:`colabx.method.meta_step` (moved there);
importing it raises a DeprecationWarning. Import from ``colabx.method.meta_step`` instead."""

import sys
import warnings

from colabx.method import meta_step as _moved

warnings.warn(
    "colabx.meta is deprecated: it moved to colabx.method.meta_step",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved

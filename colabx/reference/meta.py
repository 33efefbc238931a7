"""Deprecated alias of :mod:`colabx.twins.meta` (moved there);
importing it raises a DeprecationWarning. Import from ``colabx.twins.meta`` instead."""

import sys
import warnings

from colabx.twins import meta as _moved

warnings.warn(
    "colabx.reference.meta is deprecated: it moved to colabx.twins.meta",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved

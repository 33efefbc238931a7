"""Deprecated alias of :mod:`colabx.compat.twins` (moved there);
importing it raises a DeprecationWarning. Import from ``colabx.compat.twins`` instead."""

import sys
import warnings

from colabx.compat import twins as _moved

warnings.warn(
    "colabx.reference.compat is deprecated: it moved to colabx.compat.twins",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved

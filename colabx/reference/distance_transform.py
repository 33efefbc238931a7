"""Deprecated alias of :mod:`colabx.twins.distance_transform` (moved there); importing it
raises a DeprecationWarning. Import from ``colabx.twins.distance_transform`` instead."""

import sys
import warnings

from colabx.twins import distance_transform as _moved

warnings.warn(
    "colabx.reference.distance_transform is deprecated: it moved to "
    "colabx.twins.distance_transform",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved

"""Deprecated alias of :mod:`colabx.twins.context_labels` (moved there);
importing it raises a DeprecationWarning. Import from ``colabx.twins.context_labels`` instead."""

import sys
import warnings

from colabx.twins import context_labels as _moved

warnings.warn(
    "colabx.reference.context_labels is deprecated: it moved to colabx.twins.context_labels",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved

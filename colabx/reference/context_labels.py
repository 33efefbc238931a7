"""Deprecated alias of :mod:`colabx.twins.context_labels` (moved there);
importing it raises a DeprecationWarning. Import from ``colabx.twins.context_labels`` instead."""

from colabx._moved import alias

alias(__name__, "colabx.twins.context_labels")

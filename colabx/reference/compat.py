"""Deprecated alias of :mod:`colabx.compat.twins` (moved there);
importing it raises a DeprecationWarning. Import from ``colabx.compat.twins`` instead."""

from colabx._moved import alias

alias(__name__, "colabx.compat.twins")

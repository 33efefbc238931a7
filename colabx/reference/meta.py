"""Deprecated alias of :mod:`colabx.twins.meta` (moved there);
importing it raises a DeprecationWarning. Import from ``colabx.twins.meta`` instead."""

from colabx._moved import alias

alias(__name__, "colabx.twins.meta")

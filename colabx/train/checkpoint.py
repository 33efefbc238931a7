"""Deprecated alias of :mod:`colabx.checkpoint` (moved there);
importing it raises a DeprecationWarning. Import from ``colabx.checkpoint`` instead."""

from colabx._moved import alias

alias(__name__, "colabx.checkpoint")

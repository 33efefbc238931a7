"""Deprecated alias of :mod:`colabx.method.meta_step` (moved there);
importing it raises a DeprecationWarning. Import from ``colabx.method`` instead."""

from colabx._moved import alias

alias(__name__, "colabx.method.meta_step")

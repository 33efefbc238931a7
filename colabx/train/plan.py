"""Deprecated alias of :mod:`colabx.models.plan` (moved there);
importing it raises a DeprecationWarning. Import from ``colabx.models`` instead."""

from colabx._moved import alias

alias(__name__, "colabx.models.plan")

"""Deprecated alias of :mod:`colabx.twins.distance_transform` (moved there);
importing it raises a DeprecationWarning. Import from ``colabx.twins.distance_transform``
instead."""

from colabx._moved import alias

alias(__name__, "colabx.twins.distance_transform")

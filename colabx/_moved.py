"""Old import paths of modules that moved: each is a deprecated alias module whose body calls
:func:`alias`."""

from __future__ import annotations

import importlib
import sys
import warnings

__all__ = ["alias"]


def alias(name: str, target: str) -> None:
    """Make the module imported as ``name`` the module ``target`` itself (its functions,
    classes and private helpers alike), with a DeprecationWarning naming the new path."""
    warnings.warn(f"{name} is deprecated: it moved to {target}", DeprecationWarning,
                  stacklevel=3)
    sys.modules[name] = importlib.import_module(target)

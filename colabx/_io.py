"""Atomic file writes: every file colabx writes (preprocessed arrays, plans, predictions,
checkpoints, logs, figures) goes through :func:`atomic_write`, so a failure never leaves a
half-written file and the previous version stays valid."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_write_text"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[Any], None],
                 mode: str = "wb") -> None:
    """Call ``write(file)`` on a temporary file beside ``path`` (its folder created if needed),
    flush it to disk, then move it to ``path`` with ``os.replace``; on any error the temporary
    file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")

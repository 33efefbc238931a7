"""The run folder of ``colabx train``: what it holds, and when a folder may become one.

A run folder is marked by ``colabx_run.json`` (runs written before the marker existed are
recognised by ``checkpoint_latest.pth``). A new run starts only in an absent or empty folder, or,
with ``overwrite``, in any folder; starting anew where a run was removes that run's files first, so
that none of its checkpoints, logs or predictions can be mistaken for the new run's.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from colabx._io import (
    OutputFolderError,  # noqa: F401  (raised by check_new_run_folder)
    check_output_folder,
    mark_output_folder,
    remove_stale_temporaries,
)

__all__ = ["RUN_FILES", "RUN_MARKER", "check_new_run_folder", "holds_run", "start_run_folder"]

RUN_MARKER = "colabx_run.json"
#: Everything the trainer writes into a run folder.
RUN_FILES = ("checkpoint_latest.pth", "checkpoint_best.pth", "checkpoint_final.pth", "config.yaml",
             "log.csv", "progress.png", "evaluation.json", "evaluation.csv", "tensorboard",
             "snapshots", "predictions_test", RUN_MARKER)


def holds_run(folder: Path) -> bool:
    """True when ``folder`` holds a colabx run with at least one saved epoch."""
    return (Path(folder) / "checkpoint_latest.pth").is_file()


def check_new_run_folder(folder: Path, overwrite: bool = False) -> None:
    """Refuse ``folder`` for a new run: it holds a run (unless ``overwrite``), or files that are
    not a colabx run (unless ``overwrite``).

    Raises:
        OutputFolderError: naming the folder and what to do instead.
    """
    folder = Path(folder)
    if holds_run(folder) and not overwrite:
        raise OutputFolderError(f"{folder}: already holds a run; pass --resume to continue it, "
                                "--overwrite to replace it, or choose another --out")
    check_output_folder(folder, RUN_MARKER, "run folder", overwrite=overwrite)


def start_run_folder(folder: Path, command: str) -> None:
    """Make ``folder`` the run folder of a new run: an earlier run's files are removed (a folder
    that was checked with :func:`check_new_run_folder`), leftovers of killed writers too, and the
    marker is written."""
    folder = Path(folder)
    if (folder / RUN_MARKER).is_file() or holds_run(folder):
        for name in RUN_FILES:
            p = folder / name
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
    remove_stale_temporaries(folder)
    mark_output_folder(folder, RUN_MARKER, {"command": command,
                                            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


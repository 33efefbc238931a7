"""Checkpoints and atomic files of a run directory.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(..., weights_only=True)``: model and generator weights, both optimizers, the AMP
scaler, the RNG states (Python, NumPy, torch CPU and CUDA) and the trainer's counters and log.
Every file is written to a temporary sibling first and moved into place with ``os.replace``, so a
failure while saving leaves the previous file valid.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from colabx._io import atomic_write

__all__ = [
    "RENAMED_KEYS",
    "capture_rng",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]


#: Checkpoint keys renamed since older runs were saved (old -> new): the network plan
#: (:class:`colabx.models.NetworkPlan`) was "plan", the preprocessing plans
#: (:mod:`colabx.data.preprocessing`) "plans". :func:`load_checkpoint` returns the new keys.
RENAMED_KEYS = {"plan": "network_plan", "plans": "preprocessing_plans"}


def capture_rng() -> dict[str, Any]:
    """The global RNG states as tensors and plain lists (``weights_only``-loadable)."""
    np_state = np.random.get_state()  # noqa: NPY002
    py_state = random.getstate()
    state: dict[str, Any] = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np_state = (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                n["cached_gaussian"])
    np.random.set_state(np_state)  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (the previous file stays valid on failure)."""
    atomic_write(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no code from the file is executed); keys of
    older runs are renamed (:data:`RENAMED_KEYS`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable colabx checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint there")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{path}: not a colabx checkpoint (no model/config entries)")
    for old, new in RENAMED_KEYS.items():
        if old in state and new not in state:
            state[new] = state.pop(old)
    return state

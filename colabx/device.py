"""Choosing the torch device from a user's ``--device`` string, with one-line errors."""

from __future__ import annotations

import re

import torch

__all__ = ["cpu_has_amx", "optimizer_options", "resolve_device"]


def resolve_device(spec: str, option: str = "device") -> torch.device:
    """The device ``spec`` names: ``auto`` (CUDA when available, else the CPU), ``cpu``,
    ``cuda`` or ``cuda:N``.

    Raises:
        ValueError: ``spec`` is not one of those forms, names CUDA on a machine without it, or a
            CUDA index the machine does not have; the message starts with ``option``.
    """
    if not isinstance(spec, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", spec):
        raise ValueError(f"{option}: expected auto, cpu, cuda or cuda:N, got {spec!r}")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else \
            "no CUDA device is visible"
        raise ValueError(f"{option}: {spec!r} requested but CUDA is not available ({why}); "
                         "use cpu or auto")
    dev = torch.device(spec)
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"{option}: {spec!r} requested but this machine has {count} CUDA "
                         f"device(s) (cuda:0..cuda:{count - 1})")
    return dev


def optimizer_options(device: torch.device) -> dict[str, bool]:
    """Keyword arguments for the trainer's ``torch.optim`` optimizers of parameters on
    ``device``: the fused step (one C++ kernel over all parameters) on the CPU, where the default
    per-parameter loop is the slower one (the CPU preset's U-Net, 343k parameters in 62
    tensors: AdamW 1.9 -> 0.5 ms per step, SGD with Nesterov momentum 1.1 -> 0.3 ms, 2
    threads); PyTorch's default (the multi-tensor step) elsewhere."""
    return {"fused": True} if device.type == "cpu" else {}


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later), whose bf16 matrix units
    oneDNN's bf16 convolutions use: on this project's AMX VM the task generator's forward +
    backward under CPU bf16 autocast took 28.5 ms against 43.5 ms in float32 (CPU preset, 2
    threads). False where torch cannot tell (torch before 2.5 has no such query)."""
    query = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(query()) if query is not None else False

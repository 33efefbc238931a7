"""Precision rules shared by the ops, their twins, the meta step and the compat layer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

__all__ = ["AMP_DTYPES", "accumulation_dtype", "no_tf32", "resolve_amp", "tf32_unless"]

#: The autocast dtype of each mixed-precision choice (``--amp``, ``--meta-amp``): None for none.
AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16,
                                             "fp16": torch.float16}


def resolve_amp(choice: str, device: torch.device) -> str:
    """``--amp``'s ``auto``: bf16 on CUDA, none elsewhere; any other choice as given."""
    if choice != "auto":
        return choice
    return "bf16" if device.type == "cuda" else "none"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops compute and accumulate in for inputs of ``dtype``: float64 for float64,
    float32 for every other dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@contextmanager
def no_tf32() -> Iterator[None]:
    """Full fp32 convolutions and matmuls inside the block (cuDNN's and cuBLAS's TF32 off); the
    previous settings come back on exit. No effect on the CPU."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    old = matmul.allow_tf32
    matmul.allow_tf32 = False
    try:
        with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark,
                         deterministic=cudnn.deterministic, allow_tf32=False):
            yield
    finally:
        matmul.allow_tf32 = old


def tf32_unless(allow_tf32: bool) -> AbstractContextManager[None]:
    """:func:`no_tf32` unless ``allow_tf32``, which leaves torch's settings as they are."""
    return nullcontext() if allow_tf32 else no_tf32()

"""How the ops call their kernels: directly in eager mode, through a kernel-only
``torch.library`` custom op under ``torch.compile`` (its fake kernel gives the graph the output
shapes, so the graph does not break there).

Each op has ONE autograd path, a ``torch.autograd.Function`` whose forward and backward call
:func:`kernel_call`; the custom ops carry no autograd formula. Host cost per forward+backward on
the CPU (torch 2.13, one thread, ``[2, 3, 8, 8, 8]`` inputs, best of 5 × 500 calls), measured
when the custom ops also held the autograd formula (``register_autograd``) and eager calls went
through a second, separate ``autograd.Function``:

=================  ===========================  ==========================  =====================
op                 custom op with autograd      autograd.Function, direct   Function → custom ops
=================  ===========================  ==========================  =====================
dice_ce_loss       345–425 µs                   101–128 µs                  190 µs
roi_bce_loss       128–168 µs                   64–83 µs                    107 µs
context_labels     354–475 µs                   126–173 µs                  —
=================  ===========================  ==========================  =====================

The custom-op dispatch (schema parsing of list arguments, pytree handling) costs 2–3.5× the
direct call; a training iteration makes ~10 such calls, so through the custom ops eagerly it
would lose 1–3 ms of host time per iteration, which on the GPU is time the device waits. The
Function with direct eager calls keeps that cost away without a second autograd path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["kernel_call"]


def kernel_call(op: Callable[..., Any], kernels: Callable[..., Any], *args: Any) -> Any:
    """``kernels(*args)`` in eager mode; ``op(*args)`` (the custom op wrapping ``kernels``) while
    ``torch.compile`` traces."""
    return op(*args) if torch.compiler.is_compiling() else kernels(*args)

"""How the ops call their kernels: directly in eager mode, through a kernel-only
``torch.library`` custom op under ``torch.compile`` (its fake kernel gives the graph the output
shapes, so the graph does not break there).

Each op has ONE autograd path, a ``torch.autograd.Function`` whose forward and backward call
:func:`kernel_call`; the custom ops carry no autograd formula. Host cost per forward+backward on
the CPU (torch 2.13, one thread, ``[2, 3, 8, 8, 8]`` inputs, best of 5 × 500 calls; this
project's 2-core AVX-512 machine, 2026-12-03, commit d4cffa1), measured when the custom ops also
held the autograd formula (``register_autograd``) and eager calls went through a second,
separate ``autograd.Function``:

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

The kernels' gradients have no autograd graph of their own, so the ops are differentiable once:
:func:`first_order_only` makes a second differentiation raise instead of silently seeing
constants (the exact meta-gradient differentiates the twins twice, not the ops).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["first_order_only", "kernel_call"]


def kernel_call(op: Callable[..., Any], kernels: Callable[..., Any], *args: Any) -> Any:
    """``kernels(*args)`` in eager mode; ``op(*args)`` (the custom op wrapping ``kernels``) while
    ``torch.compile`` traces."""
    return op(*args) if torch.compiler.is_compiling() else kernels(*args)


def first_order_only(op_name: str, twin: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for the ``backward`` of an op's ``autograd.Function``. Under
    ``create_graph=True`` the gradients it returns, when its saved inputs require grad, get a
    ``grad_fn`` that raises a ``RuntimeError`` naming the op and its ``twin`` if they are
    differentiated again; without it they would come back as constants, and a second derivative
    through the op would be silently wrong. Like ``torch.autograd.function.once_differentiable``,
    which only looks at whether the incoming gradients require grad (they usually do not)."""
    message = (f"colabx.{op_name} is differentiable once: its gradient comes from a kernel, not "
               f"from autograd ops. For second derivatives (create_graph=True, then a gradient "
               f"of the gradient) use its twin, {twin}").encode()

    def decorate(backward: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(backward)
        def wrapper(ctx: Any, *grads: Any) -> Any:
            if not torch.is_grad_enabled() or torch.compiler.is_compiling():
                return backward(ctx, *grads)
            with torch.no_grad():
                out = backward(ctx, *grads)
            if not any(t.requires_grad for t in ctx.saved_tensors):
                return out
            outs = out if isinstance(out, tuple) else (out,)
            raise_on_backward = torch._C._functions.DelayedError(message, len(outs))
            marked = raise_on_backward(*[g if g is None else g.detach().requires_grad_()
                                         for g in outs])
            return marked if isinstance(out, tuple) else marked[0]
        return wrapper
    return decorate

"""``colabx train --cuda-graphs``: the iteration's passes (forwards, losses, backwards) captured
once in CUDA graphs and replayed, so that the host no longer launches their kernels one by one.

Two graphs, each captured at its first use: the update of θ (the labels, from the generator's
forward and ``context_labels`` or the mode's fixed rule, the network's forward, ``dice_ce_loss``
and the backward into the network's ``.grad``), replayed in every iteration without a
generator update and for the reference order's plain update; and, in mode ``colab`` with the
batched finite-difference meta step, an update iteration's passes
(:meth:`colabx.method.MetaStep.update_pass`: in the shared order the shared forward and
backward too), whose skip checks come back as a device flag read once after the replay.
Gradient clipping and the optimizer steps stay eager: they read the iteration's learning rate,
and the generator's step depends on that flag.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

Outputs = Tensor | tuple | None


def _map(fn: Callable[[Tensor], Tensor], out: Outputs) -> Outputs:
    """``fn`` applied to every tensor of a step's outputs: a tensor, None, or a (named) tuple
    of them."""
    if out is None:
        return None
    if isinstance(out, Tensor):
        return fn(out)
    items = [_map(fn, o) for o in out]
    return type(out)._make(items) if hasattr(out, "_make") else tuple(items)


class CapturedStep:
    """``step_fn(inputs)``, forward passes and the backward passes that write the parameters'
    ``.grad``, captured once in a CUDA graph and replayed on new inputs.

    Parameters
    ----------
    step_fn : callable
        ``inputs → outputs`` (a tensor, None, or a (named) tuple of them), running its own
        backward passes; must build the same computation on every call and must not
        synchronise with the host (no ``.item()``, no input validation passes, no branch on a
        device value).
    params : iterable of Parameter
        Every parameter whose gradient the step computes (those not requiring grad are left
        out). They must only ever be updated in place (optimizer steps), never replaced.
    inputs : mapping of str to Tensor
        CUDA tensors with the names, shapes and dtypes of every later call. No autograd graph
        of an eager call through the same parameters may still be alive when the step is
        captured (the capture fails on it): capture before, or after it is freed.
    warmup : int
        Eager calls before the capture, on a side stream (cuDNN chooses its algorithms there,
        lazily built state is built). Their gradients are dropped: parameters and optimizer
        state stay as they were.

    Each call copies its ``inputs`` into the captured ones, replays the graph, points every
    parameter's ``.grad`` at the gradient the graph wrote (None where the step wrote none;
    overwritten by the next call) and returns a copy of the outputs (safe to read after later
    calls).
    """

    def __init__(self, step_fn: Callable[[Mapping[str, Tensor]], Outputs],
                 params: Iterable[torch.nn.Parameter], inputs: Mapping[str, Tensor],
                 warmup: int = 3) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.inputs = {name: t.detach().clone() for name, t in inputs.items()}
        for name, t in self.inputs.items():
            if t.device.type != "cuda":
                raise ValueError(f"inputs[{name!r}]: CUDA graphs capture CUDA tensors, got one "
                                 f"on {t.device}")
        side = torch.cuda.Stream(self.inputs[next(iter(self.inputs))].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._drop_grads()
                step_fn(self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self._drop_grads()
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the data loader's pin-memory thread may call CUDA meanwhile
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            out = step_fn(self.inputs)
        self.outputs = _map(Tensor.detach, out)
        self.grads = [p.grad for p in self.params]
        self._drop_grads()

    def _drop_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def __call__(self, inputs: Mapping[str, Tensor]) -> Outputs:
        if set(inputs) != set(self.inputs):
            raise ValueError(f"inputs: the graph was captured for {sorted(self.inputs)}, got "
                             f"{sorted(inputs)}")
        for name, static in self.inputs.items():  # all checked before any is overwritten
            new = inputs[name]
            if (new.shape, new.dtype, new.device) != (static.shape, static.dtype, static.device):
                raise ValueError(f"inputs[{name!r}]: the graph was captured for "
                                 f"{tuple(static.shape)} {static.dtype} on {static.device}, "
                                 f"got {tuple(new.shape)} {new.dtype} on {new.device}")
        for name, static in self.inputs.items():
            static.copy_(inputs[name], non_blocking=True)
        self.graph.replay()
        for p, grad in zip(self.params, self.grads, strict=True):
            p.grad = grad
        return _map(Tensor.clone, self.outputs)

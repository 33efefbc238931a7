"""``colabx train --cuda-graphs``: the update of θ (forward, loss, backward) captured once in a
CUDA graph and replayed, so that the host no longer launches its kernels one by one.

What is captured, at the first iteration without a generator update, is the update of θ: the
labels (the generator's forward and ``context_labels``, or the mode's fixed rule), the
network's forward, ``dice_ce_loss`` and the backward into the network's ``.grad``. It is
replayed in every iteration outside mode ``colab``; in mode ``colab`` in the iterations without
a generator update and, in the reference order, for an update iteration's plain update (the
shared order's update iterations share that forward and backward with the meta step and run
eagerly). The generator updates (the meta step, whose passes hold outputs from one pass to the
next), gradient clipping and the optimizer steps stay eager: they read the iteration's learning
rate, and the meta step's skip checks read the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor


class CapturedStep:
    """``loss_fn(inputs)`` and the backward of its loss into the parameters' ``.grad``,
    captured once in a CUDA graph and replayed on new inputs.

    Parameters
    ----------
    loss_fn : callable
        ``inputs → 0-dim loss``; must build the same computation on every call and must not
        synchronise with the host (no ``.item()``, no input validation passes).
    params : iterable of Parameter
        The parameters whose gradients the backward computes (those requiring grad). They
        must only ever be updated in place (optimizer steps), never replaced.
    inputs : mapping of str to Tensor
        CUDA tensors with the names, shapes and dtypes of every later call.
    warmup : int
        Eager calls before the capture, on a side stream (cuDNN chooses its algorithms there,
        lazily built state is built). Their gradients are dropped: parameters and optimizer
        state stay as they were.

    Each call copies its ``inputs`` into the captured ones, replays the graph, points every
    parameter's ``.grad`` at the gradient the graph wrote (overwritten by the next call) and
    returns the loss (a copy, safe to read after later calls).
    """

    def __init__(self, loss_fn: Callable[[Mapping[str, Tensor]], Tensor],
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
                loss_fn(self.inputs).backward()
        torch.cuda.current_stream().wait_stream(side)
        self._drop_grads()
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the data loader's pin-memory thread may call CUDA meanwhile
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            loss = loss_fn(self.inputs)
            loss.backward()
        self.loss = loss.detach()
        self.grads = [p.grad for p in self.params]
        self._drop_grads()

    def _drop_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def __call__(self, inputs: Mapping[str, Tensor]) -> Tensor:
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
        return self.loss.clone()

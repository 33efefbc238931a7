"""Data-parallel training over processes (``torchrun``: one process per GPU, or gloo on CPUs).

Each process trains on its slice of the global batch. Gradients are averaged explicitly (one
flattened all-reduce per network and step) rather than through ``DistributedDataParallel``: the
meta step differentiates functional copies of the network, which DDP's hooks do not see, and the
same reducer then serves the inner-step gradient, v and the generator gradient
(:class:`colabx.method.GradReducer`). With equal local batches the result equals single-process
training on the global batch up to float summation order.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = ["Dist", "ProcessGroupReducer", "init_from_env"]


@dataclass(frozen=True)
class Dist:
    """This process's place in the run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every process."""
        if self.enabled:
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, 0)

    def mean(self, t: Tensor) -> Tensor:
        """The mean of ``t`` over the processes, as a new tensor (``t`` itself when not
        distributed); every process must call it, in the same order. On CUDA (NCCL) the
        all-reduce is queued on the stream, without waiting for it."""
        if not self.enabled:
            return t
        out = t.detach().clone()
        ProcessGroupReducer().mean_([out])
        return out

    def mean_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average ``.grad`` over the processes (missing grads count as zeros)."""
        if not self.enabled:
            return
        ps = list(params)
        for p in ps:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        ProcessGroupReducer().mean_([p.grad for p in ps])


class ProcessGroupReducer:
    """:class:`colabx.method.GradReducer` over the default process group."""

    def mean_(self, tensors: Sequence[Tensor]) -> None:
        ts = list(tensors)
        if not ts:
            return
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for t in ts:
            by_dtype.setdefault(t.dtype, []).append(t)
        world = dist.get_world_size()
        for group in by_dtype.values():
            flat = _flatten_dense_tensors(group)
            dist.all_reduce(flat)
            flat /= world
            for t, r in zip(group, _unflatten_dense_tensors(flat, group), strict=True):
                t.copy_(r)

    def any(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
        dist.all_reduce(t)
        return bool(t.item() > 0)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_from_env(device: str) -> Dist:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), else single process.

    NCCL when training on CUDA (each process on ``cuda:LOCAL_RANK``), gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local)

"""Glue between torch tensors and the ``colabx._C`` kernels.

The extension never sees a torch object: Python allocates every tensor, makes it contiguous and
passes its address, sizes and dtype code; CUDA kernels also get the device index and the current
stream handle. This keeps one build usable with any torch version.
"""

from __future__ import annotations

import functools
import warnings
from types import ModuleType

import torch

# Must match csrc/common/macros.h::DType.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
    torch.uint8: 4,
    torch.bool: 5,
    torch.int32: 6,
    torch.int64: 7,
}


@functools.cache
def ext() -> ModuleType:
    """The compiled extension; raises ImportError with a build hint when it is missing."""
    try:
        from colabx import _C
    except ImportError as err:  # pragma: no cover - only without a build
        raise ImportError(
            "colabx's compiled extension colabx._C is missing; install the package with "
            "`pip install .` (it builds the C++/CUDA kernels) instead of importing the source tree"
        ) from err
    return _C


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def addr(t: torch.Tensor | None) -> int:
    """Address of a contiguous tensor's first element (0 for None)."""
    return 0 if t is None else t.data_ptr()


def num_threads() -> int:
    """CPU threads for a kernel call: follows ``torch.get_num_threads()``."""
    return max(1, torch.get_num_threads())


@functools.cache
def cuda_kernels_available(device: int | None = None) -> bool:
    """True when the extension was built with CUDA, its runtime sees a device and, for CUDA device
    index ``device``, the build holds code that device can run (see ``cuda_architectures``)."""
    return _cuda_unavailable_reason(device) is None


@functools.cache
def _cuda_unavailable_reason(device: int | None) -> str | None:
    """Why colabx's CUDA kernels cannot run (on ``device``), with what to do; None when they can."""
    _C = ext()
    if not _C.built_with_cuda:
        return ("colabx was built without CUDA kernels; rebuild with nvcc on PATH "
                "(COLABX_CUDA=on) for the fused kernels")
    if _C.cuda_device_count() == 0:
        major, minor = divmod(_C.cuda_runtime_version // 10, 100)
        return (f"colabx's CUDA runtime sees no device ({_C.cuda_device_count_error()}); its "
                f"kernels were built with CUDA {major}.{minor}, whose runtime needs a driver at "
                "least that new (CUDA 13: 580 or newer): update the NVIDIA driver, or rebuild "
                "with a CUDA toolkit the driver supports")
    if device is not None and not _C.cuda_kernels_run_on(device):
        major, minor = torch.cuda.get_device_capability(device)
        return (f"colabx's CUDA kernels were built for architectures {_C.cuda_architectures}, "
                f"none of which cuda:{device} (compute capability {major}.{minor}) can run; "
                f"rebuild from source with COLABX_CUDA_ARCHS={major}{minor} for the fused kernels")
    return None


def stream_of(t: torch.Tensor) -> int:
    """The current CUDA stream handle on ``t``'s device."""
    return _raw_stream(t.device.index)


def _public_raw_stream(index: int) -> int:
    return torch.cuda.current_stream(index).cuda_stream


# torch's private raw-stream query (what inductor's generated code calls) skips building a
# Stream object: microseconds per call on the hot path. The public API is the fallback.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", _public_raw_stream)


def use_cuda_kernels(t: torch.Tensor, op: str) -> bool:
    """Whether ``op`` on CUDA tensor ``t`` runs colabx's CUDA kernels.

    False means the caller must run the pure-PyTorch twin; a warning says so once per op.
    """
    reason = _cuda_unavailable_reason(t.device.index)
    if reason is None:
        return True
    _warn_fallback(op, reason)
    return False


@functools.cache
def _warn_fallback(op: str, reason: str) -> None:
    warnings.warn(f"colabx.{op}: {reason}. Running the pure-PyTorch twin on the GPU instead.",
                  RuntimeWarning, stacklevel=3)

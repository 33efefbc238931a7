// Host-side helpers shared by the CUDA kernels: error checks, stream/device handling.
#pragma once

#include <cstddef>
#include <cstdint>

namespace colabx::cuda {

// Number of CUDA devices; 0 when no driver or device is present (never throws).
int device_count();

// Whether this build holds machine code or PTX that `device` can run (false on a GPU older than
// every architecture in COLABX_CUDA_ARCHS; never throws). Leaves the current device as it was.
bool kernels_run_on(int device);

// Makes `device` current for this thread and returns the stream handle as cudaStream_t-compatible
// pointer. Throws std::runtime_error naming `what` on failure.
void* prepare(int device, uintptr_t stream, const char* what);

// Throws std::runtime_error naming `what` if the last launch failed.
void check_launch(const char* what);

// Blocks of `kernel` (`threads` per block, `smem` dynamic shared bytes) resident on the whole
// device at once (SMs x occupancy, at least 1), cached per (kernel, threads, smem, device): the
// occupancy query costs microseconds, which a small call's host path cannot spare. Throws
// std::runtime_error naming `what` when a query fails.
int resident_blocks(const void* kernel, int threads, size_t smem, int device, const char* what);

}  // namespace colabx::cuda

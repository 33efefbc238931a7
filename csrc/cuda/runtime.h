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

// CUDART_VERSION of the toolkit this build used (e.g. 13000 for CUDA 13.0).
int runtime_version();

// Why the runtime sees no device ("" when it sees one): e.g. a driver older than this CUDA runtime.
const char* device_count_error();

// Makes `device` current for the scope and restores the caller's device at its end: colabx's
// static runtime shares the thread's current context with torch's runtime, so an op on cuda:1
// must not leave torch's current device at 1. Throws std::runtime_error naming `what` when the
// device cannot be made current.
class DeviceScope {
 public:
  DeviceScope(int device, const char* what);
  ~DeviceScope();
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = -1;
};

// Throws std::runtime_error naming `what` if the last launch failed.
void check_launch(const char* what);

// Blocks of `kernel` (`threads` per block, `smem` dynamic shared bytes) resident on the whole
// device at once (SMs x occupancy, at least 1), cached per (kernel, threads, smem, device): the
// occupancy query costs microseconds, which a small call's host path cannot spare. Throws
// std::runtime_error naming `what` when a query fails.
int resident_blocks(const void* kernel, int threads, size_t smem, int device, const char* what);

}  // namespace colabx::cuda

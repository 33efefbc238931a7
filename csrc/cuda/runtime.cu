#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>

#include "cuda/runtime.h"

namespace colabx::cuda {

namespace {
cudaError_t count_devices(int* n) {
  const cudaError_t err = cudaGetDeviceCount(n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the "no driver" error so that no later check reports it
    *n = 0;
  }
  return err;
}
}  // namespace

int runtime_version() { return CUDART_VERSION; }

int device_count() {
  int n = 0;
  count_devices(&n);
  return n;
}

const char* device_count_error() {
  int n = 0;
  const cudaError_t err = count_devices(&n);
  return err == cudaSuccess ? "" : cudaGetErrorString(err);
}

namespace {
// Compiled for the same architectures as every other kernel: its image exists for a device
// exactly when theirs do.
__global__ void probe_kernel() {}
}  // namespace

bool kernels_run_on(int device) {
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, probe_kernel);
  cudaGetLastError();  // clear "no kernel image" so it does not surface at the next launch check
  cudaSetDevice(previous);
  return err == cudaSuccess;
}

DeviceScope::DeviceScope(int device, const char* what) {
  cudaError_t err = cudaGetDevice(&previous_);
  if (err == cudaSuccess && previous_ != device) err = cudaSetDevice(device);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string(what) + ": cannot make CUDA device " +
                             std::to_string(device) + " current: " + cudaGetErrorString(err));
  }
}

DeviceScope::~DeviceScope() {
  int current = -1;
  if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
  cudaGetLastError();
}

void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": CUDA launch failed: " + cudaGetErrorString(err));
}

int resident_blocks(const void* kernel, int threads, size_t smem, int device, const char* what) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, size_t, int>, int> cache;
  const auto key = std::make_tuple(kernel, threads, smem, device);
  std::lock_guard<std::mutex> lock(mu);
  const auto hit = cache.find(key);
  if (hit != cache.end()) return hit->second;
  int sms = 0, per_sm = 0;
  cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess)
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
  if (err != cudaSuccess) {
    cudaGetLastError();  // not to be reported again by the next launch check
    throw std::runtime_error(std::string(what) + ": occupancy query failed: " + cudaGetErrorString(err));
  }
  return cache[key] = std::max(1, sms * per_sm);
}

}  // namespace colabx::cuda

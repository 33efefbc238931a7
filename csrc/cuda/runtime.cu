#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>

#include "cuda/runtime.h"

namespace colabx::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
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

void* prepare(int device, uintptr_t stream, const char* what) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": cudaSetDevice(" + std::to_string(device) +
                             ") failed: " + cudaGetErrorString(err));
  return reinterpret_cast<void*>(stream);
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
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": occupancy query failed: " + cudaGetErrorString(err));
  return cache[key] = std::max(1, sms * per_sm);
}

}  // namespace colabx::cuda

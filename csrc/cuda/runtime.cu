#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

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

}  // namespace colabx::cuda

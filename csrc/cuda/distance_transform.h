// CUDA entry point of the exact Euclidean distance transform (csrc/cuda/distance_transform.cu).
#pragma once

#include <cstdint>
#include <vector>

namespace colabx::cuda {

// Strided passes over lines up to this long keep their envelope in shared memory (6 bytes per
// position and thread, 32 threads at least: 123 KB at 640, within sm_80's 163 KB opt-in limit).
constexpr int kEdtSmemMaxN = 640;

// The longest strided line `device` keeps in shared memory: kEdtSmemMaxN, or less where the
// device's opt-in shared memory per block is smaller (341 on sm_75's 64 KB, 528 on sm_86/89's
// 99 KB). Longer lines need `workspace`: 8 bytes per voxel of device memory.
int edt_smem_max_n(int device);

// Longest W: row positions are ints, and the row kernels' "no feature" sentinels start at 2^29.
constexpr int64_t kEdtMaxRow = int64_t(1) << 28;
// Longest H and D axes the CUDA kernels take (the limit they were written and tested for).
constexpr int64_t kEdtMaxLine = 65535;

// Whether the CUDA kernels take a mask of these spatial sizes ([H, W] or [D, H, W]); else
// Python runs the twin.
inline bool edt_cuda_supported(const std::vector<int64_t>& spatial) {
  if (spatial.size() != 2 && spatial.size() != 3) return false;
  const int64_t W = spatial.back(), H = spatial[spatial.size() - 2];
  const int64_t D = spatial.size() == 3 ? spatial[0] : 1;
  return W <= kEdtMaxRow && H <= kEdtMaxLine && D <= kEdtMaxLine;
}

// mask: uint8/bool [batch, *spatial] (nonzero = feature); out: float32, same shape; scratch:
// float32 of the same size, only when signed_; workspace: see edt_smem_max_n (0 when not needed).
void distance_transform_forward_cuda(uintptr_t mask, uintptr_t out, uintptr_t scratch,
                                     uintptr_t workspace, int64_t batch,
                                     const std::vector<int64_t>& spatial,
                                     const std::vector<double>& spacing, bool signed_, int device,
                                     uintptr_t stream);

}  // namespace colabx::cuda

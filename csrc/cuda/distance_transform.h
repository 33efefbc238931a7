// CUDA entry point of the exact Euclidean distance transform (csrc/cuda/distance_transform.cu).
#pragma once

#include <cstdint>
#include <vector>

namespace colabx::cuda {

// Strided passes over lines up to this long keep their envelope in shared memory (6 bytes per
// position and thread, 32 threads at least: 123 KB at 640, within sm_80's 163 KB opt-in limit).
// Longer lines need `workspace`: 8 bytes per voxel of device memory.
constexpr int kEdtSmemMaxN = 640;

// mask: uint8/bool [batch, *spatial] (nonzero = feature); out: float32, same shape; scratch:
// float32 of the same size, only when signed_; workspace: see kEdtSmemMaxN (0 when not needed).
void distance_transform_forward_cuda(uintptr_t mask, uintptr_t out, uintptr_t scratch,
                                     uintptr_t workspace, int64_t batch,
                                     const std::vector<int64_t>& spatial,
                                     const std::vector<double>& spacing, bool signed_, int device,
                                     uintptr_t stream);

}  // namespace colabx::cuda

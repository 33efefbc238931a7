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

// mask: uint8/bool [batch, *spatial] (nonzero = feature); out: float32, same shape; scratch:
// float32 of the same size, only when signed_; workspace: see edt_smem_max_n (0 when not needed).
void distance_transform_forward_cuda(uintptr_t mask, uintptr_t out, uintptr_t scratch,
                                     uintptr_t workspace, int64_t batch,
                                     const std::vector<int64_t>& spatial,
                                     const std::vector<double>& spacing, bool signed_, int device,
                                     uintptr_t stream);

}  // namespace colabx::cuda

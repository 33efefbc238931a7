// CUDA exact Euclidean distance transform: all batch items in one launch per pass.
//   1. rows (contiguous W): one warp per row; the nearest feature on the left / right of every
//      voxel comes from warp prefix-max / suffix-min scans over 32-voxel chunks (carry between
//      chunks), giving the squared distance along the row.
//   2. H lines, 3. D lines: one thread per line, the 32 threads of a warp on W-adjacent lines so
//      every global access coalesces. A thread stages its column in shared memory ([pos][thread]
//      layout: consecutive threads hit consecutive banks) with its envelope's vertex indices
//      (uint16), runs the shared envelope (common/distance_transform.h) and writes the result in
//      place; the last pass writes the square root. Lines longer than kEdtSmemMaxN use the same
//      code with a [pos][line] global workspace instead of shared memory.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/distance_transform.h"
#include "cuda/distance_transform.h"
#include "cuda/runtime.h"

namespace colabx::cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kBig = 1 << 30;   // "no feature on this side" sentinel for row positions
constexpr int kFar = 1 << 29;   // gaps at least this large mean "none"
constexpr int kMaxRow = 1 << 28;

__global__ void rows_kernel(const uint8_t* __restrict__ mask, float* __restrict__ out,
                            int64_t rows, int w, float sw, bool invert) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t r = warp; r < rows; r += nwarps) {  // warp-uniform loop
    const uint8_t* m = mask + r * w;
    float* o = out + r * w;
    int* gap = reinterpret_cast<int*>(o);  // left gaps parked in the output row
    int carry = -kBig;
    for (int c0 = 0; c0 < w; c0 += 32) {
      const int x = c0 + lane;
      int val = (x < w && edt::is_feature(m[x], invert)) ? x : -kBig;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int y = __shfl_up_sync(kFull, val, off);
        if (lane >= off) val = max(val, y);
      }
      val = max(val, carry);
      carry = __shfl_sync(kFull, val, 31);
      if (x < w) gap[x] = x - val;
    }
    carry = kBig;
    for (int c0 = ((w - 1) / 32) * 32; c0 >= 0; c0 -= 32) {
      const int x = c0 + lane;
      int val = (x < w && edt::is_feature(m[x], invert)) ? x : kBig;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int y = __shfl_down_sync(kFull, val, off);
        if (lane + off < 32) val = min(val, y);
      }
      val = min(val, carry);
      carry = __shfl_sync(kFull, val, 0);
      // Same lane wrote gap[x] in the first scan: a same-thread read-after-write.
      if (x < w) o[x] = edt::row_sq_dist(gap[x], val - x, kFar, sw);
    }
  }
}

// Lines: `lines` of n positions; line l = (o, c) with o = l / inner, c = l % inner starts at
// data + o * n * inner + c, position q at + q * inner. In place.
template <bool kSqrt>
__global__ void lines_smem_kernel(float* __restrict__ data, int64_t lines, int64_t inner, int n,
                                  float w2) {
  extern __shared__ float smem[];
  const int t = threadIdx.x, nt = blockDim.x;
  const int64_t line = int64_t(blockIdx.x) * nt + t;
  if (line >= lines) return;  // no block-wide barrier below: threads own disjoint slots
  float* fcol = smem;                                            // [n][nt]
  uint16_t* vcol = reinterpret_cast<uint16_t*>(smem + int64_t(n) * nt);  // [n][nt]
  const int64_t o = line / inner, c = line - o * inner;
  float* base = data + o * n * inner + c;
#pragma unroll 4
  for (int q = 0; q < n; ++q) fcol[q * nt + t] = base[q * inner];
  edt::envelope_1d<kSqrt>(fcol + t, nt, base, inner, vcol + t, nt, n, w2);
}

template <bool kSqrt>
__global__ void lines_global_kernel(float* __restrict__ data, float* __restrict__ wf,
                                    int32_t* __restrict__ wv, int64_t lines, int64_t inner, int n,
                                    float w2) {
  const int64_t line = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (line >= lines) return;
  const int64_t o = line / inner, c = line - o * inner;
  float* base = data + o * n * inner + c;
  for (int q = 0; q < n; ++q) wf[q * lines + line] = base[q * inner];
  edt::envelope_1d<kSqrt>(wf + line, lines, base, inner, wv + line, lines, n, w2);
}

__global__ void signed_kernel(const uint8_t* __restrict__ mask, float* __restrict__ out,
                              const float* __restrict__ din, int64_t total) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = edt::signed_combine(mask[i], out[i], din[i]);
}

unsigned grid_for(int64_t work, int block) {
  return unsigned(std::min<int64_t>((work + block - 1) / block, int64_t(1) << 20));
}

template <bool kSqrt>
void lines_pass(float* data, int64_t lines, int64_t inner, int n, float w2, float* workspace,
                cudaStream_t st) {
  if (n <= kEdtSmemMaxN) {
    const int64_t per_thread = int64_t(n) * (sizeof(float) + sizeof(uint16_t));
    int threads = 256;
    while (threads > 32 && threads * per_thread > 48 * 1024) threads >>= 1;
    const size_t smem = size_t(threads * per_thread);
    if (smem > 48 * 1024) {
      cudaError_t err = cudaFuncSetAttribute(lines_smem_kernel<kSqrt>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
      if (err != cudaSuccess)
        throw std::runtime_error(std::string("distance_transform: cannot reserve ") +
                                 std::to_string(smem) + " bytes of shared memory: " +
                                 cudaGetErrorString(err));
    }
    const int64_t blocks = (lines + threads - 1) / threads;
    if (blocks > int64_t(INT32_MAX)) throw std::invalid_argument("distance_transform: too many lines");
    lines_smem_kernel<kSqrt><<<unsigned(blocks), threads, smem, st>>>(data, lines, inner, n, w2);
    check_launch("distance_transform lines_smem_kernel");
  } else {
    if (workspace == nullptr)
      throw std::invalid_argument("distance_transform: an axis longer than " +
                                  std::to_string(kEdtSmemMaxN) + " needs the CUDA workspace");
    const int threads = 128;
    const int64_t blocks = (lines + threads - 1) / threads;
    if (blocks > int64_t(INT32_MAX)) throw std::invalid_argument("distance_transform: too many lines");
    lines_global_kernel<kSqrt><<<unsigned(blocks), threads, 0, st>>>(
        data, workspace, reinterpret_cast<int32_t*>(workspace + lines * n), lines, inner, n, w2);
    check_launch("distance_transform lines_global_kernel");
  }
}

void transform(const uint8_t* mask, float* out, int64_t batch, int64_t D, int64_t H, int64_t W,
               const float sp[3], bool three_d, bool invert, float* workspace, cudaStream_t st) {
  const int64_t rows = batch * D * H;
  rows_kernel<<<grid_for(rows * 32, 256), 256, 0, st>>>(mask, out, rows, int(W), sp[2], invert);
  check_launch("distance_transform rows_kernel");
  // H lines: (item, slice, w), stride W.
  const int64_t hlines = batch * D * W;
  if (three_d) {
    lines_pass<false>(out, hlines, W, int(H), sp[1] * sp[1], workspace, st);
    // D lines: (item, h, w), stride H * W.
    lines_pass<true>(out, batch * H * W, H * W, int(D), sp[0] * sp[0], workspace, st);
  } else {
    lines_pass<true>(out, hlines, W, int(H), sp[1] * sp[1], workspace, st);
  }
}

}  // namespace

void distance_transform_forward_cuda(uintptr_t mask_addr, uintptr_t out_addr,
                                     uintptr_t scratch_addr, uintptr_t workspace_addr,
                                     int64_t batch, const std::vector<int64_t>& spatial,
                                     const std::vector<double>& spacing, bool signed_, int device,
                                     uintptr_t stream) {
  if (spatial.size() != 2 && spatial.size() != 3)
    throw std::invalid_argument("distance_transform: mask must have 2 or 3 spatial dimensions");
  if (spacing.size() != spatial.size())
    throw std::invalid_argument("distance_transform: spacing must have one value per spatial axis");
  if (signed_ && scratch_addr == 0)
    throw std::invalid_argument("distance_transform: the signed transform needs a scratch buffer");
  const bool three_d = spatial.size() == 3;
  const int64_t D = three_d ? spatial[0] : 1;
  const int64_t H = spatial[spatial.size() - 2], W = spatial.back();
  if (batch < 0 || D < 0 || H < 0 || W < 0)
    throw std::invalid_argument("distance_transform: negative size");
  if (batch == 0 || D == 0 || H == 0 || W == 0) return;
  if (W > kMaxRow || H > 65535 || D > 65535)
    throw std::invalid_argument("distance_transform: axis too long for the CUDA kernels");
  float sp[3] = {1.f, 1.f, 1.f};
  for (size_t a = 0; a < spacing.size(); ++a) sp[3 - spacing.size() + a] = float(spacing[a]);

  auto st = static_cast<cudaStream_t>(prepare(device, stream, "distance_transform"));
  const auto* mask = reinterpret_cast<const uint8_t*>(mask_addr);
  auto* out = reinterpret_cast<float*>(out_addr);
  auto* ws = reinterpret_cast<float*>(workspace_addr);
  transform(mask, out, batch, D, H, W, sp, three_d, false, ws, st);
  if (!signed_) return;
  auto* din = reinterpret_cast<float*>(scratch_addr);
  transform(mask, din, batch, D, H, W, sp, three_d, true, ws, st);
  const int64_t total = batch * D * H * W;
  signed_kernel<<<grid_for(total, 256), 256, 0, st>>>(mask, out, din, total);
  check_launch("distance_transform signed_kernel");
}

}  // namespace colabx::cuda

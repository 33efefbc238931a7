// CUDA kernels of the ROI one-vs-all BCE (common/roi_bce_loss.h), on the row layout and grids of
// cuda/softmax_rows.cuh. Forward: each block sums its voxels' BCE terms (per-warp float64
// running sums, fixed order), one partial per block into the workspace, and one block finalizes
// the loss in fixed order: bitwise reproducible run to run on a given device. Backward: one pass
// recomputing p, tiles in descending order as the CE + Dice backward.
//
// tests/cuda_emulation compiles this file for host threads (COLABX_CUDA_EMULATION: the CUDA
// runtime replaced, launches rewritten) and runs it on CPU test machines.
#include "common/roi_bce_loss.h"
#include "cuda/roi_bce_loss.h"
#include "cuda/softmax_rows.cuh"

namespace colabx::cuda {
namespace {

// p = softmax over the K channels of voxel j of a loaded tile (compute type).
template <int KM, int VEC, typename TL, typename A = acc_t<TL>>
__device__ __forceinline__ void voxel_softmax(int K, const TL (&zr)[KM][VEC], int j, A (&p)[KM]) {
#pragma unroll
  for (int k = 0; k < KM; ++k) p[k] = k < K ? load_acc(zr[k][j]) : A(0);
  softmax_regs<KM>(K, p);
}

template <typename TL, typename L, int KM>
__global__ void __launch_bounds__(kThreads)
    bce_fwd_kernel(const TL* __restrict__ z, const L* __restrict__ lab, int K, int64_t V,
                   bool aligned, uint64_t roi_mask, double* __restrict__ partial) {
  if constexpr (kExactK<KM>) K = KM;
  using A = acc_t<TL>;
  constexpr int VEC = Bucket<KM>::vec;
  constexpr int64_t kTile = Bucket<KM>::tile;
  const int64_t blk = blockIdx.x, nblk = gridDim.x, b = blockIdx.y;
  const int64_t ntiles = num_tiles<KM>(V);
  const TL* zb = z + b * K * V;
  const L* lb = lab + b * V;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __shared__ double wsum[kWarps];  // per-warp float64 running sums, as in dce_fwd_kernel
  if (lane == 0) wsum[warp] = 0.0;
  A acc[1] = {A(0)};
  int pending = 0;
#pragma unroll 1
  for (int64_t t = blk; t < ntiles; t += nblk) {
    const int64_t v0 = t * kTile + int64_t(threadIdx.x) * VEC;
    if (v0 < V) {
      TL zr[KM][VEC];
      L lr[1][VEC];
      load_tile<true, KM, VEC>(zb, lb, K, v0, V, aligned, zr, lr);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if (v0 + j >= V) continue;
        A p[KM];
        voxel_softmax<KM, VEC>(K, zr, j, p);
        const int64_t y = static_cast<int64_t>(lr[0][j]);
#pragma unroll
        for (int k = 0; k < KM; ++k)
          if (k < K && ((roi_mask >> k) & 1u)) acc[0] += dce::bce_term(y == k, p[k]);
      }
    }
    if (++pending == kFlushTiles<KM>) {
      pending = 0;
      flush_to_warp_sums(acc, &wsum[warp], lane);
    }
  }
  flush_to_warp_sums(acc, &wsum[warp], lane);
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kWarps; ++w) total += wsum[w];
    partial[b * nblk + blk] = total;
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    bce_finalize_kernel(const double* __restrict__ partial, int64_t n, double scale,
                        A* __restrict__ loss) {
  __shared__ double red[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) s += partial[i];
  s = warp_sum_d(s);
  if (lane == 0) red[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int w = 0; w < kWarps; ++w) t += red[w];
    *loss = static_cast<A>(-t * scale);
  }
}

template <typename TL, typename L, int KM>
__global__ void __launch_bounds__(kThreads)
    bce_bwd_kernel(const TL* __restrict__ z, const L* __restrict__ lab, int K, int64_t V,
                   bool aligned, uint64_t roi_mask, const acc_t<TL>* __restrict__ grad_out,
                   double inv_bv, TL* __restrict__ gz) {
  if constexpr (kExactK<KM>) K = KM;
  using A = acc_t<TL>;
  constexpr int VEC = Bucket<KM>::vec;
  constexpr int64_t kTile = Bucket<KM>::tile;
  const int64_t blk = blockIdx.x, nblk = gridDim.x, b = blockIdx.y;
  const int64_t ntiles = num_tiles<KM>(V);
  const A c = grad_out[0] * static_cast<A>(inv_bv);
  const TL* zb = z + b * K * V;
  const L* lb = lab + b * V;
  TL* gzb = gz + b * K * V;
#pragma unroll 1
  for (int64_t t = ntiles - 1 - blk; t >= 0; t -= nblk) {
    const int64_t v0 = t * kTile + int64_t(threadIdx.x) * VEC;
    if (v0 >= V) continue;
    TL zr[KM][VEC];
    L lr[1][VEC];
    load_tile<true, KM, VEC>(zb, lb, K, v0, V, aligned, zr, lr);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      A p[KM], g[KM];
      voxel_softmax<KM, VEC>(K, zr, j, p);
      const int64_t y = static_cast<int64_t>(lr[0][j]);
      A dot = A(0);
#pragma unroll
      for (int k = 0; k < KM; ++k) {
        g[k] = (k < K && ((roi_mask >> k) & 1u)) ? dce::bce_grad_p(y == k, p[k], c) : A(0);
        dot += p[k] * g[k];
      }
#pragma unroll
      for (int k = 0; k < KM; ++k)
        if (k < K) zr[k][j] = store_as<TL>(dce::softmax_grad(p[k], g[k], dot));
    }
#pragma unroll
    for (int k = 0; k < KM; ++k)
      if (k < K) store_vec(gzb + k * V, v0, V, aligned, zr[k]);
  }
}

// The kernel types of one ROI BCE call: calls fn(TypeTag<TL>, TypeTag<label type>,
// integral_constant<int, KM>).
template <typename Fn>
void for_bce_types(int logits_code, int label_code, int64_t K, Fn&& fn) {
  dispatch_floating(logits_code, "roi_bce_loss logits", [&](auto ltag) {
    dispatch_labels(label_code, "roi_bce_loss labels",
                    [&](auto ttag) { dispatch_km(K, [&](auto km) { fn(ltag, ttag, km); }); });
  });
}

}  // namespace
}  // namespace colabx::cuda

namespace colabx {

using namespace colabx::cuda;

void roi_bce_loss_forward_cuda(uintptr_t logits, uintptr_t labels, int logits_code, int label_code,
                               int64_t B, int64_t K, int64_t V,
                               const std::vector<int64_t>& roi_channels, uintptr_t loss,
                               uintptr_t workspace, int device, uintptr_t stream) {
  const uint64_t roi = channel_mask(roi_channels, K, "roi_bce_loss");
  const cuda::DeviceScope scope(device, "roi_bce_loss");
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  check_sizes(B, V, "roi_bce_loss");
  double* work = reinterpret_cast<double*>(workspace);
  int64_t n_part = 0;
  for_bce_types(logits_code, label_code, K, [&](auto ltag, auto ttag, auto km) {
    using TL = typename decltype(ltag)::type;
    using Lb = typename decltype(ttag)::type;
    constexpr int KM = decltype(km)::value;
    constexpr int VEC = Bucket<KM>::vec;
    const bool aligned = V % VEC == 0 && is_aligned(logits, sizeof(TL) * VEC) &&
                         is_aligned(labels, sizeof(Lb) * VEC);
    constexpr auto kernel = bce_fwd_kernel<TL, Lb, KM>;
    const int64_t G = level_blocks<kernel>(device, B, {num_tiles<KM>(V)})[0];
    n_part = B * G;
    const dim3 grid(static_cast<unsigned>(G), static_cast<unsigned>(B));
    kernel<<<grid, kThreads, 0, st>>>(
        reinterpret_cast<const TL*>(logits), reinterpret_cast<const Lb*>(labels),
        static_cast<int>(K), V, aligned, roi, work);
    check_launch("roi_bce_loss forward");
  });
  dispatch_floating(logits_code, "roi_bce_loss logits", [&](auto ltag) {
    using A = acc_t<typename decltype(ltag)::type>;
    bce_finalize_kernel<A><<<1, kThreads, 0, st>>>(work, n_part, 1.0 / (double(B) * double(V)),
                                                   reinterpret_cast<A*>(loss));
    check_launch("roi_bce_loss finalize");
  });
}

void roi_bce_loss_backward_cuda(uintptr_t grad_out, uintptr_t logits, uintptr_t labels,
                                int logits_code, int label_code, int64_t B, int64_t K, int64_t V,
                                const std::vector<int64_t>& roi_channels, uintptr_t grad_logits,
                                int device, uintptr_t stream) {
  const uint64_t roi = channel_mask(roi_channels, K, "roi_bce_loss");
  const cuda::DeviceScope scope(device, "roi_bce_loss");
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  check_sizes(B, V, "roi_bce_loss");
  for_bce_types(logits_code, label_code, K, [&](auto ltag, auto ttag, auto km) {
    using TL = typename decltype(ltag)::type;
    using Lb = typename decltype(ttag)::type;
    using A = acc_t<TL>;
    constexpr int KM = decltype(km)::value;
    constexpr int VEC = Bucket<KM>::vec;
    const bool aligned = V % VEC == 0 && is_aligned(logits, sizeof(TL) * VEC) &&
                         is_aligned(grad_logits, sizeof(TL) * VEC) &&
                         is_aligned(labels, sizeof(Lb) * VEC);
    constexpr auto kernel = bce_bwd_kernel<TL, Lb, KM>;
    const int64_t G = level_blocks<kernel>(device, B, {num_tiles<KM>(V)})[0];
    const dim3 grid(static_cast<unsigned>(G), static_cast<unsigned>(B));
    kernel<<<grid, kThreads, 0, st>>>(
        reinterpret_cast<const TL*>(logits), reinterpret_cast<const Lb*>(labels),
        static_cast<int>(K), V, aligned, roi, reinterpret_cast<const A*>(grad_out),
        1.0 / (double(B) * double(V)), reinterpret_cast<TL*>(grad_logits));
    check_launch("roi_bce_loss backward");
  });
}

}  // namespace colabx

// CPU kernels of the ROI one-vs-all BCE (common/roi_bce_loss.h), on the tiles and the fixed task
// split of cpu/softmax_tiles.h: bitwise reproducible for any num_threads.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/dispatch.h"
#include "common/roi_bce_loss.h"
#include "cpu/parallel.h"
#include "cpu/softmax_tiles.h"

namespace colabx::dce_cpu {

// ROI BCE: lab [kTile] (int32, -1 = none), roi [K] (1 = ROI channel). acc [kTile].
template <typename A>
COLABX_TILE void bce_fwd_tile(int K, int T, const A* z, const int32_t* lab, const uint8_t* roi, A* p,
                         A* m, A* s, A* acc) {
  softmax_tile(K, T, z, p, m, s);
  for (int k = 0; k < K; ++k) {
    if (!roi[k]) continue;
    const A* __restrict pk = p + k * kTile;
    A* __restrict ac = acc;
    const int32_t* __restrict lb = lab;
    for (int t = 0; t < T; ++t) ac[t] += dce::bce_term(lb[t] == k, pk[t]);
  }
}

template <typename A>
COLABX_TILE void bce_bwd_tile(int K, int T, const A* z, const int32_t* lab, const uint8_t* roi, A c,
                         A* p, A* g, A* m, A* s, A* gz) {
  softmax_tile(K, T, z, p, m, s);
  A* __restrict dot = s;
  for (int t = 0; t < T; ++t) dot[t] = A(0);
  for (int k = 0; k < K; ++k) {
    const A* __restrict pk = p + k * kTile;
    A* __restrict gk = g + k * kTile;
    if (roi[k]) {
      for (int t = 0; t < T; ++t) {
        gk[t] = dce::bce_grad_p(lab[t] == k, pk[t], c);
        dot[t] += pk[t] * gk[t];
      }
    } else {
      for (int t = 0; t < T; ++t) gk[t] = A(0);
    }
  }
  for (int k = 0; k < K; ++k) {
    const A* __restrict pk = p + k * kTile;
    const A* __restrict gk = g + k * kTile;
    A* __restrict gzk = gz + k * kTile;
    for (int t = 0; t < T; ++t) gzk[t] = dce::softmax_grad(pk[t], gk[t], dot[t]);
  }
}

// float instances get an AVX2 clone (the hot loops); double runs the generic build.
COLABX_SIMD_CLONES void bce_fwd_tile_f32(int K, int T, const float* z, const int32_t* lab,
                                         const uint8_t* roi, float* p, float* m, float* s,
                                         float* acc) {
  bce_fwd_tile<float>(K, T, z, lab, roi, p, m, s, acc);
}
COLABX_SIMD_CLONES void bce_bwd_tile_f32(int K, int T, const float* z, const int32_t* lab,
                                         const uint8_t* roi, float c, float* p, float* g, float* m,
                                         float* s, float* gz) {
  bce_bwd_tile<float>(K, T, z, lab, roi, c, p, g, m, s, gz);
}

inline void bce_fwd_tile_any(int K, int T, const float* z, const int32_t* lab, const uint8_t* roi,
                             float* p, float* m, float* s, float* acc) {
  bce_fwd_tile_f32(K, T, z, lab, roi, p, m, s, acc);
}
inline void bce_fwd_tile_any(int K, int T, const double* z, const int32_t* lab, const uint8_t* roi,
                             double* p, double* m, double* s, double* acc) {
  bce_fwd_tile<double>(K, T, z, lab, roi, p, m, s, acc);
}
inline void bce_bwd_tile_any(int K, int T, const float* z, const int32_t* lab, const uint8_t* roi,
                             float c, float* p, float* g, float* m, float* s, float* gz) {
  bce_bwd_tile_f32(K, T, z, lab, roi, c, p, g, m, s, gz);
}
inline void bce_bwd_tile_any(int K, int T, const double* z, const int32_t* lab, const uint8_t* roi,
                             double c, double* p, double* g, double* m, double* s, double* gz) {
  bce_bwd_tile<double>(K, T, z, lab, roi, c, p, g, m, s, gz);
}

template <typename TL, typename L>
double bce_forward(const TL* z, const L* lab, int64_t B, int K, int64_t V, const uint8_t* roi,
                   int num_threads) {
  using A = acc_t<TL>;
  std::vector<double> partial(B * num_chunks(V), 0.0);
  for_each_task<A>(B, K, V, num_threads, size_t(K) * kTile * 2 + 3 * kTile,
                   [&](int64_t task, int64_t b, int64_t v_begin, int64_t v_end, A* zt) {
    A* pt = zt + K * kTile;
    A* acc = pt + K * kTile;
    A* m = acc + kTile;
    A* s = m + kTile;
    int32_t lt[kTile];
    std::fill(acc, acc + kTile, A(0));
    for_each_tile(v_begin, v_end, [&](int64_t v0, int n) {
      load_rows(z + b * K * V, V, K, v0, n, zt);
      for (int t = 0; t < n; ++t) lt[t] = label_or_none(lab[b * V + v0 + t], K);
      bce_fwd_tile_any(K, n, zt, lt, roi, pt, m, s, acc);
    });
    double sum = 0.0;
    for (int t = 0; t < kTile; ++t) sum += static_cast<double>(acc[t]);
    partial[task] = sum;
  });
  double total = 0.0;
  for (double x : partial) total += x;
  return total;
}

template <typename TL, typename L>
void bce_backward(const TL* z, const L* lab, int64_t B, int K, int64_t V, const uint8_t* roi,
                  acc_t<TL> c, TL* gz, int num_threads) {
  using A = acc_t<TL>;
  for_each_task<A>(B, K, V, num_threads, size_t(K) * kTile * 4 + 2 * kTile,
                   [&](int64_t, int64_t b, int64_t v_begin, int64_t v_end, A* zt) {
    A* pt = zt + K * kTile;
    A* gt = pt + K * kTile;
    A* gzt = gt + K * kTile;
    A* m = gzt + K * kTile;
    A* s = m + kTile;
    int32_t lt[kTile];
    for_each_tile(v_begin, v_end, [&](int64_t v0, int n) {
      load_rows(z + b * K * V, V, K, v0, n, zt);
      for (int t = 0; t < n; ++t) lt[t] = label_or_none(lab[b * V + v0 + t], K);
      bce_bwd_tile_any(K, n, zt, lt, roi, c, pt, gt, m, s, gzt);
      store_rows(gzt, V, K, v0, n, gz + b * K * V);
    });
  });
}

}  // namespace colabx::dce_cpu

namespace colabx {

using namespace dce_cpu;

// The kernel types of one call: fn(TypeTag<logits type>, TypeTag<label type>).
template <typename Fn>
void for_bce_types(int logits_code, int label_code, Fn&& fn) {
  dispatch_floating(logits_code, "roi_bce_loss logits", [&](auto ltag) {
    dispatch_labels(label_code, "roi_bce_loss labels", [&](auto ttag) { fn(ltag, ttag); });
  });
}

void roi_bce_loss_forward_cpu(uintptr_t logits, uintptr_t labels, int logits_code, int label_code,
                              int64_t B, int64_t K, int64_t V,
                              const std::vector<int64_t>& roi_channels, uintptr_t loss,
                              int num_threads) {
  const std::vector<uint8_t> roi = channel_mask<double>(roi_channels, K, "roi_bce_loss");
  for_bce_types(logits_code, label_code, [&](auto ltag, auto ttag) {
    using TL = typename decltype(ltag)::type;
    const double sum = bce_forward(reinterpret_cast<const TL*>(logits),
                                   reinterpret_cast<const typename decltype(ttag)::type*>(labels),
                                   B, static_cast<int>(K), V, roi.data(), num_threads);
    *reinterpret_cast<acc_t<TL>*>(loss) = static_cast<acc_t<TL>>(-sum / (double(B) * double(V)));
  });
}

void roi_bce_loss_backward_cpu(uintptr_t grad_out, uintptr_t logits, uintptr_t labels,
                               int logits_code, int label_code, int64_t B, int64_t K, int64_t V,
                               const std::vector<int64_t>& roi_channels, uintptr_t grad_logits,
                               int num_threads) {
  const std::vector<uint8_t> roi = channel_mask<double>(roi_channels, K, "roi_bce_loss");
  for_bce_types(logits_code, label_code, [&](auto ltag, auto ttag) {
    using TL = typename decltype(ltag)::type;
    using A = acc_t<TL>;
    const A c = *reinterpret_cast<const A*>(grad_out) / static_cast<A>(double(B) * double(V));
    bce_backward(reinterpret_cast<const TL*>(logits),
                 reinterpret_cast<const typename decltype(ttag)::type*>(labels), B,
                 static_cast<int>(K), V, roi.data(), c, reinterpret_cast<TL*>(grad_logits),
                 num_threads);
  });
}

}  // namespace colabx

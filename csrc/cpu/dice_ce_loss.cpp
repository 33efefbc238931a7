// CPU kernels of the fused softmax + CE + Dice loss and the ROI BCE loss.
//
// Work is split into fixed (item, chunk of kChunk voxels) tasks, independent of the thread
// count, so results are bitwise reproducible for any num_threads. Inside a task voxels are
// processed in tiles of kTile: each channel row of the tile is converted to the compute type,
// then the math runs in loops over the tile's voxels (contiguous, branch-free: they vectorise,
// with an AVX2 clone on x86-64). Per-task partial sums are combined in double in fixed order.
// The selects of the polynomial exp/log if-convert (so the loops vectorise) only because
// CMakeLists.txt compiles the CPU sources with -fno-trapping-math.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common/dice_ce_loss.h"
#include "common/dispatch.h"
#include "cpu/parallel.h"

namespace colabx::dce_cpu {

constexpr int64_t kChunk = 8192;
constexpr int kTile = 64;

// The tile bodies must be inlined into the AVX2 / baseline clones below to be compiled for them.
#if defined(__GNUC__)
#define COLABX_TILE inline __attribute__((always_inline))
#else
#define COLABX_TILE inline
#endif

// ---- tile math (compute type A; z, y, p, g are [K][kTile]) ------------------------------------

template <typename A>
COLABX_TILE void softmax_tile(int K, int T, const A* __restrict z, A* __restrict p,
                              A* __restrict m, A* __restrict s) {
  for (int t = 0; t < T; ++t) m[t] = z[t];
  for (int k = 1; k < K; ++k) {
    const A* __restrict zk = z + k * kTile;
    for (int t = 0; t < T; ++t) m[t] = zk[t] > m[t] ? zk[t] : m[t];
  }
  for (int t = 0; t < T; ++t) s[t] = A(0);
  for (int k = 0; k < K; ++k) {
    const A* __restrict zk = z + k * kTile;
    A* __restrict pk = p + k * kTile;
    for (int t = 0; t < T; ++t) {
      const A e = dce::acc_exp(zk[t] - m[t]);
      pk[t] = e;
      s[t] += e;
    }
  }
  for (int k = 0; k < K; ++k) {
    A* __restrict pk = p + k * kTile;
    for (int t = 0; t < T; ++t) pk[t] = pk[t] / s[t];
  }
}

// acc is [3K + 1][kTile]: tp, Σp, Σŷ per channel, then ce.
template <typename A>
COLABX_TILE void dce_fwd_tile(int K, int T, const A* z, const A* y, A* p, A* m, A* s, A* acc) {
  softmax_tile(K, T, z, p, m, s);
  A* __restrict ce = acc + 3 * K * kTile;
  for (int k = 0; k < K; ++k) {
    A* __restrict tp = acc + k * kTile;
    A* __restrict sp = acc + (K + k) * kTile;
    A* __restrict sy = acc + (2 * K + k) * kTile;
    const A* __restrict pk = p + k * kTile;
    const A* __restrict yk = y + k * kTile;
    // separate simple loops: gcc vectorises each, not the fused four-output one
    for (int t = 0; t < T; ++t) tp[t] += pk[t] * yk[t];
    for (int t = 0; t < T; ++t) sp[t] += pk[t];
    for (int t = 0; t < T; ++t) sy[t] += yk[t];
    for (int t = 0; t < T; ++t) ce[t] += dce::ce_term(yk[t], pk[t]);
  }
}

// coef = [C, alpha(K), beta(K)]. Writes gz and, when want_gy, gy ([K][kTile], compute type).
template <typename A>
COLABX_TILE void dce_bwd_tile(int K, int T, const A* z, const A* y, const A* coef, bool want_gy, A* p,
                         A* g, A* m, A* s, A* gz, A* gy) {
  softmax_tile(K, T, z, p, m, s);
  const A c = coef[0];
  A* __restrict dot = s;  // s is free after the softmax
  for (int t = 0; t < T; ++t) dot[t] = A(0);
  for (int k = 0; k < K; ++k) {
    const A alpha = coef[1 + k], beta = coef[1 + K + k];
    const A* __restrict pk = p + k * kTile;
    const A* __restrict yk = y + k * kTile;
    A* __restrict gk = g + k * kTile;
    for (int t = 0; t < T; ++t) {
      gk[t] = dce::dce_grad_p(yk[t], pk[t], c, alpha, beta);
      dot[t] += pk[t] * gk[t];
    }
    if (want_gy) {
      A* __restrict gyk = gy + k * kTile;
      for (int t = 0; t < T; ++t) gyk[t] = dce::dce_grad_y(pk[t], c, alpha, beta);
    }
  }
  for (int k = 0; k < K; ++k) {
    const A* __restrict pk = p + k * kTile;
    const A* __restrict gk = g + k * kTile;
    A* __restrict gzk = gz + k * kTile;
    for (int t = 0; t < T; ++t) gzk[t] = dce::softmax_grad(pk[t], gk[t], dot[t]);
  }
}

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
COLABX_SIMD_CLONES void dce_fwd_tile_f32(int K, int T, const float* z, const float* y, float* p,
                                         float* m, float* s, float* acc) {
  dce_fwd_tile<float>(K, T, z, y, p, m, s, acc);
}
COLABX_SIMD_CLONES void dce_bwd_tile_f32(int K, int T, const float* z, const float* y,
                                         const float* coef, bool want_gy, float* p, float* g,
                                         float* m, float* s, float* gz, float* gy) {
  dce_bwd_tile<float>(K, T, z, y, coef, want_gy, p, g, m, s, gz, gy);
}
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

inline void dce_fwd_tile_any(int K, int T, const float* z, const float* y, float* p, float* m,
                             float* s, float* acc) {
  dce_fwd_tile_f32(K, T, z, y, p, m, s, acc);
}
inline void dce_fwd_tile_any(int K, int T, const double* z, const double* y, double* p, double* m,
                             double* s, double* acc) {
  dce_fwd_tile<double>(K, T, z, y, p, m, s, acc);
}
inline void dce_bwd_tile_any(int K, int T, const float* z, const float* y, const float* coef,
                             bool want_gy, float* p, float* g, float* m, float* s, float* gz,
                             float* gy) {
  dce_bwd_tile_f32(K, T, z, y, coef, want_gy, p, g, m, s, gz, gy);
}
inline void dce_bwd_tile_any(int K, int T, const double* z, const double* y, const double* coef,
                             bool want_gy, double* p, double* g, double* m, double* s, double* gz,
                             double* gy) {
  dce_bwd_tile<double>(K, T, z, y, coef, want_gy, p, g, m, s, gz, gy);
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

// ---- tile loads / stores ----------------------------------------------------------------------

template <typename T, typename A>
inline void load_rows(const T* base, int64_t V, int K, int64_t v0, int n, A* out) {
  for (int k = 0; k < K; ++k) {
    const T* src = base + k * V + v0;
    A* dst = out + k * kTile;
    for (int t = 0; t < n; ++t) dst[t] = static_cast<A>(to_float(src[t]));
  }
}

template <typename L>
inline int32_t label_or_none(L l, int64_t K) {
  const int64_t v = static_cast<int64_t>(l);
  return (v >= 0 && v < K) ? static_cast<int32_t>(v) : int32_t(-1);
}

template <typename L, typename A>
inline void load_onehot(const L* lab, int K, int n, A* out) {
  for (int k = 0; k < K; ++k)
    for (int t = 0; t < n; ++t)
      out[k * kTile + t] = static_cast<int64_t>(lab[t]) == k ? A(1) : A(0);
}

template <typename T, typename A>
inline void store_rows(const A* src, int64_t V, int K, int64_t v0, int n, T* base) {
  for (int k = 0; k < K; ++k) {
    T* dst = base + k * V + v0;
    const A* s = src + k * kTile;
    for (int t = 0; t < n; ++t) dst[t] = store_as<T>(s[t]);
  }
}


inline int64_t num_chunks(int64_t V) { return (V + kChunk - 1) / kChunk; }

// Threads for a call touching `elements` values: spawning costs tens of microseconds, so small
// calls (deep-supervision coarse levels, tests) stay on the calling thread.
inline int threads_for(int64_t elements, int num_threads) {
  return elements < (int64_t(1) << 17) ? 1 : std::max(1, num_threads);
}

// ---- CE + Dice ---------------------------------------------------------------------------------

template <typename TL, typename TT, bool HARD>
void dce_forward_level(const TL* z, const TT* tg, int64_t B, int K, int64_t V, int num_threads,
                       double* partial) {
  using A = acc_t<TL>;
  const int NS = 3 * K + 1;
  const int64_t nc = num_chunks(V);
  parallel_for(B * nc, threads_for(B * K * V, num_threads), 1, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(size_t(K) * kTile * 3 + size_t(NS) * kTile + 2 * kTile);
    A* zt = buf.data();
    A* yt = zt + K * kTile;
    A* pt = yt + K * kTile;
    A* acc = pt + K * kTile;
    A* m = acc + NS * kTile;
    A* s = m + kTile;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nc, c = task % nc;
      std::fill(acc, acc + NS * kTile, A(0));
      const TL* zb = z + b * K * V;
      const int64_t v_end = std::min(V, (c + 1) * kChunk);
      for (int64_t v0 = c * kChunk; v0 < v_end; v0 += kTile) {
        const int n = static_cast<int>(std::min<int64_t>(kTile, v_end - v0));
        load_rows(zb, V, K, v0, n, zt);
        if constexpr (HARD)
          load_onehot(tg + b * V + v0, K, n, yt);
        else
          load_rows(tg + b * K * V, V, K, v0, n, yt);
        dce_fwd_tile_any(K, n, zt, yt, pt, m, s, acc);
      }
      double* out = partial + task * NS;
      for (int i = 0; i < NS; ++i) {
        double sum = 0.0;
        for (int t = 0; t < kTile; ++t) sum += static_cast<double>(acc[i * kTile + t]);
        out[i] = sum;
      }
    }
  });
}

template <typename TL, typename TT, bool HARD>
void dce_backward_level(const TL* z, const TT* tg, int64_t B, int K, int64_t V,
                        const std::vector<acc_t<TL>>& coef /*[B][2K+1]*/, TL* gz, TT* gy,
                        int num_threads) {
  using A = acc_t<TL>;
  const int64_t nc = num_chunks(V);
  const bool want_gy = !HARD && gy != nullptr;
  parallel_for(B * nc, threads_for(B * K * V, num_threads), 1, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(size_t(K) * kTile * 6 + 2 * kTile);
    A* zt = buf.data();
    A* yt = zt + K * kTile;
    A* pt = yt + K * kTile;
    A* gt = pt + K * kTile;
    A* gzt = gt + K * kTile;
    A* gyt = gzt + K * kTile;
    A* m = gyt + K * kTile;
    A* s = m + kTile;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nc, c = task % nc;
      const A* cb = coef.data() + b * (2 * K + 1);
      const int64_t v_end = std::min(V, (c + 1) * kChunk);
      for (int64_t v0 = c * kChunk; v0 < v_end; v0 += kTile) {
        const int n = static_cast<int>(std::min<int64_t>(kTile, v_end - v0));
        load_rows(z + b * K * V, V, K, v0, n, zt);
        if constexpr (HARD)
          load_onehot(tg + b * V + v0, K, n, yt);
        else
          load_rows(tg + b * K * V, V, K, v0, n, yt);
        dce_bwd_tile_any(K, n, zt, yt, cb, want_gy, pt, gt, m, s, gzt, gyt);
        store_rows(gzt, V, K, v0, n, gz + b * K * V);
        if constexpr (!HARD)
          if (want_gy) store_rows(gyt, V, K, v0, n, gy + b * K * V);
      }
    }
  });
}

template <typename A>
std::vector<uint8_t> channel_mask(const std::vector<int64_t>& channels, int64_t K, const char* what) {
  std::vector<uint8_t> mask(K, 0);
  for (int64_t j : channels) {
    if (j < 0 || j >= K)
      throw std::invalid_argument(std::string(what) + ": channel " + std::to_string(j) +
                                  " out of range for K = " + std::to_string(K));
    mask[j] = 1;
  }
  return mask;
}

// ---- ROI BCE -----------------------------------------------------------------------------------

template <typename TL, typename L>
double bce_forward(const TL* z, const L* lab, int64_t B, int K, int64_t V, const uint8_t* roi,
                   int num_threads) {
  using A = acc_t<TL>;
  const int64_t nc = num_chunks(V);
  std::vector<double> partial(B * nc, 0.0);
  parallel_for(B * nc, threads_for(B * K * V, num_threads), 1, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(size_t(K) * kTile * 2 + 3 * kTile);
    std::vector<int32_t> lt(kTile);
    A* zt = buf.data();
    A* pt = zt + K * kTile;
    A* acc = pt + K * kTile;
    A* m = acc + kTile;
    A* s = m + kTile;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nc, c = task % nc;
      std::fill(acc, acc + kTile, A(0));
      const int64_t v_end = std::min(V, (c + 1) * kChunk);
      for (int64_t v0 = c * kChunk; v0 < v_end; v0 += kTile) {
        const int n = static_cast<int>(std::min<int64_t>(kTile, v_end - v0));
        load_rows(z + b * K * V, V, K, v0, n, zt);
        for (int t = 0; t < n; ++t) lt[t] = label_or_none(lab[b * V + v0 + t], K);
        bce_fwd_tile_any(K, n, zt, lt.data(), roi, pt, m, s, acc);
      }
      double sum = 0.0;
      for (int t = 0; t < kTile; ++t) sum += static_cast<double>(acc[t]);
      partial[task] = sum;
    }
  });
  double total = 0.0;
  for (double x : partial) total += x;
  return total;
}

template <typename TL, typename L>
void bce_backward(const TL* z, const L* lab, int64_t B, int K, int64_t V, const uint8_t* roi,
                  acc_t<TL> c, TL* gz, int num_threads) {
  using A = acc_t<TL>;
  const int64_t nc = num_chunks(V);
  parallel_for(B * nc, threads_for(B * K * V, num_threads), 1, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(size_t(K) * kTile * 4 + 2 * kTile);
    std::vector<int32_t> lt(kTile);
    A* zt = buf.data();
    A* pt = zt + K * kTile;
    A* gt = pt + K * kTile;
    A* gzt = gt + K * kTile;
    A* m = gzt + K * kTile;
    A* s = m + kTile;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nc, ch = task % nc;
      const int64_t v_end = std::min(V, (ch + 1) * kChunk);
      for (int64_t v0 = ch * kChunk; v0 < v_end; v0 += kTile) {
        const int n = static_cast<int>(std::min<int64_t>(kTile, v_end - v0));
        load_rows(z + b * K * V, V, K, v0, n, zt);
        for (int t = 0; t < n; ++t) lt[t] = label_or_none(lab[b * V + v0 + t], K);
        bce_bwd_tile_any(K, n, zt, lt.data(), roi, c, pt, gt, m, s, gzt);
        store_rows(gzt, V, K, v0, n, gz + b * K * V);
      }
    }
  });
}

}  // namespace colabx::dce_cpu

namespace colabx {

using namespace dce_cpu;

void dice_ce_loss_forward_cpu(const std::vector<uintptr_t>& logits,
                              const std::vector<uintptr_t>& targets, int logits_code,
                              const std::vector<int>& target_codes, int64_t B, int64_t K,
                              const std::vector<int64_t>& V, const std::vector<int64_t>& dice_channels,
                              const std::vector<double>& weights, double smooth, uintptr_t stats,
                              uintptr_t loss, int num_threads) {
  const size_t L = logits.size();
  if (targets.size() != L || target_codes.size() != L || V.size() != L || weights.size() != L)
    throw std::invalid_argument("dice_ce_loss_forward_cpu: per-level argument lengths differ");
  if (K < 1 || K > (1 << 20)) throw std::invalid_argument("dice_ce_loss_forward_cpu: bad K");
  const std::vector<uint8_t> dmask = channel_mask<double>(dice_channels, K, "dice_ce_loss");
  const int NS = static_cast<int>(3 * K + 1);
  const double J = static_cast<double>(dice_channels.size());
  dispatch_floating(logits_code, "dice_ce_loss logits", [&](auto ltag) {
    using TL = typename decltype(ltag)::type;
    using A = acc_t<TL>;
    A* st = reinterpret_cast<A*>(stats);
    double total = 0.0;
    for (size_t l = 0; l < L; ++l) {
      const int64_t nc = num_chunks(V[l]);
      std::vector<double> partial(size_t(B * nc) * NS, 0.0);
      dce::dispatch_targets<TL>(target_codes[l], "dice_ce_loss", [&](auto tt, auto hard) {
        using TT = typename decltype(tt)::type;
        dce_forward_level<TL, TT, decltype(hard)::value>(
            reinterpret_cast<const TL*>(logits[l]), reinterpret_cast<const TT*>(targets[l]), B,
            static_cast<int>(K), V[l], num_threads, partial.data());
      });
      double ce = 0.0, dice = 0.0;
      for (int64_t b = 0; b < B; ++b) {
        std::vector<double> sum(NS, 0.0);
        for (int64_t c = 0; c < nc; ++c)
          for (int i = 0; i < NS; ++i) sum[i] += partial[(b * nc + c) * NS + i];
        for (int i = 0; i < NS; ++i) st[(l * B + b) * NS + i] = static_cast<A>(sum[i]);
        ce += sum[3 * K];
        for (int64_t k = 0; k < K; ++k)
          if (dmask[k]) dice += dce::dice_ratio(sum[k], sum[K + k], sum[2 * K + k], smooth);
      }
      const double level = ce / (double(B) * double(V[l])) - dice / (double(B) * J);
      total += weights[l] * level;
    }
    *reinterpret_cast<A*>(loss) = static_cast<A>(total);
  });
}

void dice_ce_loss_backward_cpu(uintptr_t grad_out, const std::vector<uintptr_t>& logits,
                               const std::vector<uintptr_t>& targets, int logits_code,
                               const std::vector<int>& target_codes, int64_t B, int64_t K,
                               const std::vector<int64_t>& V,
                               const std::vector<int64_t>& dice_channels,
                               const std::vector<double>& weights, double smooth, uintptr_t stats,
                               const std::vector<uintptr_t>& grad_logits,
                               const std::vector<uintptr_t>& grad_targets, int num_threads) {
  const size_t L = logits.size();
  if (targets.size() != L || target_codes.size() != L || V.size() != L || weights.size() != L ||
      grad_logits.size() != L || grad_targets.size() != L)
    throw std::invalid_argument("dice_ce_loss_backward_cpu: per-level argument lengths differ");
  const std::vector<uint8_t> dmask = channel_mask<double>(dice_channels, K, "dice_ce_loss");
  const int NS = static_cast<int>(3 * K + 1);
  const double J = static_cast<double>(dice_channels.size());
  dispatch_floating(logits_code, "dice_ce_loss logits", [&](auto ltag) {
    using TL = typename decltype(ltag)::type;
    using A = acc_t<TL>;
    const A g = *reinterpret_cast<const A*>(grad_out);
    const A* st = reinterpret_cast<const A*>(stats);
    for (size_t l = 0; l < L; ++l) {
      const A gw = g * static_cast<A>(weights[l]);
      const A c = gw / static_cast<A>(double(B) * double(V[l]));
      const A dscale = -gw / static_cast<A>(double(B) * J);
      std::vector<A> coef(size_t(B) * (2 * K + 1));
      for (int64_t b = 0; b < B; ++b) {
        A* cb = coef.data() + b * (2 * K + 1);
        const A* sb = st + (l * B + b) * NS;
        cb[0] = c;
        for (int64_t k = 0; k < K; ++k) {
          A alpha = A(0), beta = A(0);
          if (dmask[k])
            dce::dice_coeffs<A>(sb[k], sb[K + k], sb[2 * K + k], static_cast<A>(smooth), dscale,
                                &alpha, &beta);
          cb[1 + k] = alpha;
          cb[1 + K + k] = beta;
        }
      }
      dce::dispatch_targets<TL>(target_codes[l], "dice_ce_loss", [&](auto tt, auto hard) {
        using TT = typename decltype(tt)::type;
        dce_backward_level<TL, TT, decltype(hard)::value>(
            reinterpret_cast<const TL*>(logits[l]), reinterpret_cast<const TT*>(targets[l]), B,
            static_cast<int>(K), V[l], coef, reinterpret_cast<TL*>(grad_logits[l]),
            reinterpret_cast<TT*>(grad_targets[l]), num_threads);
      });
    }
  });
}

void roi_bce_loss_forward_cpu(uintptr_t logits, uintptr_t labels, int logits_code, int label_code,
                              int64_t B, int64_t K, int64_t V,
                              const std::vector<int64_t>& roi_channels, uintptr_t loss,
                              int num_threads) {
  const std::vector<uint8_t> roi = channel_mask<double>(roi_channels, K, "roi_bce_loss");
  dispatch_floating(logits_code, "roi_bce_loss logits", [&](auto ltag) {
    using TL = typename decltype(ltag)::type;
    using A = acc_t<TL>;
    dispatch_labels(label_code, "roi_bce_loss labels", [&](auto ttag) {
      using L = typename decltype(ttag)::type;
      const double sum = bce_forward(reinterpret_cast<const TL*>(logits),
                                     reinterpret_cast<const L*>(labels), B, static_cast<int>(K), V,
                                     roi.data(), num_threads);
      *reinterpret_cast<A*>(loss) = static_cast<A>(-sum / (double(B) * double(V)));
    });
  });
}

void roi_bce_loss_backward_cpu(uintptr_t grad_out, uintptr_t logits, uintptr_t labels,
                               int logits_code, int label_code, int64_t B, int64_t K, int64_t V,
                               const std::vector<int64_t>& roi_channels, uintptr_t grad_logits,
                               int num_threads) {
  const std::vector<uint8_t> roi = channel_mask<double>(roi_channels, K, "roi_bce_loss");
  dispatch_floating(logits_code, "roi_bce_loss logits", [&](auto ltag) {
    using TL = typename decltype(ltag)::type;
    using A = acc_t<TL>;
    const A g = *reinterpret_cast<const A*>(grad_out);
    const A c = g / static_cast<A>(double(B) * double(V));
    dispatch_labels(label_code, "roi_bce_loss labels", [&](auto ttag) {
      using L = typename decltype(ttag)::type;
      bce_backward(reinterpret_cast<const TL*>(logits), reinterpret_cast<const L*>(labels), B,
                   static_cast<int>(K), V, roi.data(), c, reinterpret_cast<TL*>(grad_logits),
                   num_threads);
    });
  });
}

}  // namespace colabx

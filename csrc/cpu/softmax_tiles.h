// Tiles of the CPU softmax losses (cpu/dice_ce_loss.cpp, cpu/roi_bce_loss.cpp): work is split
// into fixed (item, chunk of kChunk voxels) tasks, independent of the thread count, and a task
// processes its voxels in tiles of kTile, each channel row converted to the compute type A and
// laid out [K][kTile] so the per-voxel loops run contiguous and branch-free (they vectorise).
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/dice_ce_loss.h"
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

// ---- softmax of a tile ------------------------------------------------------------------------

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

template <typename A>
inline std::vector<uint8_t> channel_mask(const std::vector<int64_t>& channels, int64_t K, const char* what) {
  std::vector<uint8_t> mask(K, 0);
  for (int64_t j : channels) {
    if (j < 0 || j >= K)
      throw std::invalid_argument(std::string(what) + ": channel " + std::to_string(j) +
                                  " out of range for K = " + std::to_string(K));
    mask[j] = 1;
  }
  return mask;
}

// The (item, chunk) tasks of a [B, K, V] loss call, spread over the threads in fixed chunks:
// fn(task, b, v_begin, v_end, scratch) per task, with `scratch` values of A per thread (results
// do not depend on the thread count: each task's work and output slot are fixed).
template <typename A, typename Fn>
void for_each_task(int64_t B, int K, int64_t V, int num_threads, size_t scratch, Fn&& fn) {
  const int64_t nc = num_chunks(V);
  parallel_for(B * nc, threads_for(B * K * V, num_threads), 1, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(scratch);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nc, c = task % nc;
      fn(task, b, c * kChunk, std::min(V, (c + 1) * kChunk), buf.data());
    }
  });
}

// fn(v0, n) for the tiles of kTile voxels (the last may be shorter) of [v_begin, v_end).
template <typename Fn>
inline void for_each_tile(int64_t v_begin, int64_t v_end, Fn&& fn) {
  for (int64_t v0 = v_begin; v0 < v_end; v0 += kTile)
    fn(v0, static_cast<int>(std::min<int64_t>(kTile, v_end - v0)));
}

}  // namespace colabx::dce_cpu

// Shared host/device building blocks: the COLABX_HD qualifier, the dtype codes Python passes in,
// and float conversions for the 16-bit storage types, so per-voxel math is written once.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define COLABX_HD __host__ __device__ __forceinline__
#else
#define COLABX_HD inline
#endif

// gcc/clang on x86-64: build a hot CPU loop for AVX2 and baseline and pick at load time.
#if !defined(__CUDACC__) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define COLABX_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define COLABX_SIMD_CLONES
#endif

namespace colabx {

// Must match colabx/_backend.py::DTYPE_CODES.
enum class DType : int {
  Float32 = 0,
  Float16 = 1,
  BFloat16 = 2,
  Float64 = 3,
  UInt8 = 4,
  Bool = 5,
  Int32 = 6,
  Int64 = 7,
};

// 16-bit storage types, layout-compatible with torch's Half / BFloat16 and CUDA's __half /
// __nv_bfloat16 (raw bits).
struct half_t {
  uint16_t bits;
};
struct bfloat16_t {
  uint16_t bits;
};

COLABX_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

COLABX_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

COLABX_HD float half_bits_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    // subnormal: normalise the mantissa
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while ((man & 0x400u) == 0);
    man &= 0x3ffu;
    return bits_to_float(sign | uint32_t(127 - 15 - e) << 23 | (man << 13));
  }
  return bits_to_float(sign | (exp + 112u) << 23 | (man << 13));
#endif
}

// Round-to-nearest-even float -> half, with overflow to inf and gradual underflow.
COLABX_HD uint16_t float_to_half_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {                                     // below the smallest normal half
    if (a < 0x33000000u) return sign;                         // rounds to zero
    const uint32_t e = a >> 23;
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;  // 14..24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
    return uint16_t(sign | r);
  }
  uint32_t r = ((a - 0x38000000u) >> 13);
  const uint32_t rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return uint16_t(sign | r);
#endif
}

COLABX_HD float bf16_bits_to_float(uint16_t b) { return bits_to_float(uint32_t(b) << 16); }

// Round-to-nearest-even float -> bfloat16 (one F2FP instruction on the device).
COLABX_HD uint16_t float_to_bf16_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet nan
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
}

// Uniform load/store for the scalar types the kernels are templated on.
COLABX_HD float to_float(float x) { return x; }
COLABX_HD double to_float(double x) { return x; }
COLABX_HD float to_float(half_t x) { return half_bits_to_float(x.bits); }
COLABX_HD float to_float(bfloat16_t x) { return bf16_bits_to_float(x.bits); }

template <typename T>
struct Convert;
template <>
struct Convert<float> {
  COLABX_HD static float from(float x) { return x; }
};
template <>
struct Convert<double> {
  COLABX_HD static double from(double x) { return x; }
};
template <>
struct Convert<half_t> {
  COLABX_HD static half_t from(float x) { return half_t{float_to_half_bits(x)}; }
};
template <>
struct Convert<bfloat16_t> {
  COLABX_HD static bfloat16_t from(float x) { return bfloat16_t{float_to_bf16_bits(x)}; }
};

// Accumulation type: double for double inputs (gradcheck), float for everything else.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

// Store an accumulator value (float, or double for double tensors) as T.
template <typename T>
COLABX_HD T store_as(acc_t<T> x) {
  return Convert<T>::from(x);
}

}  // namespace colabx

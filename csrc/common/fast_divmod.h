// Division by a divisor fixed for a whole kernel launch, as a multiply-high, an add and a shift
// (Granlund & Montgomery, "Division by invariant integers using multiplication", 1994, the
// round-up variant), where the compiler's run-time integer division is ~20 instructions. The
// host builds it; kernels use it in their index math. Exact for 0 <= n < 2^31, 1 <= d < 2^31.
#pragma once

#include <cstdint>
#include <stdexcept>

#include "common/macros.h"

namespace colabx {

struct FastDivmod {
  uint32_t d = 1;  // divisor
  uint32_t m = 1;  // magic multiplier: floor(2^32 (2^s - d) / d) + 1
  uint32_t s = 0;  // shift: ceil(log2 d)

  FastDivmod() = default;

  explicit FastDivmod(int64_t divisor) {
    if (divisor < 1 || divisor > INT32_MAX)
      throw std::invalid_argument("FastDivmod: divisor must be in 1..2^31-1");
    d = static_cast<uint32_t>(divisor);
    s = 0;
    while ((uint64_t{1} << s) < d) ++s;
    m = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << s) - d)) / d + 1);
  }

  // n / d for 0 <= n < 2^31 (hi <= n, so hi + n cannot wrap).
  COLABX_HD int div(int n) const {
    const uint32_t u = static_cast<uint32_t>(n);
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(u, m);
#else
    const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(u) * m) >> 32);
#endif
    return static_cast<int>((hi + u) >> s);
  }

  // Quotient, and n - q d into *rem.
  COLABX_HD int divmod(int n, int* rem) const {
    const int q = div(n);
    *rem = n - q * static_cast<int>(d);
    return q;
  }
};

}  // namespace colabx

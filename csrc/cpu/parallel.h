// A minimal fork-join parallel_for for the CPU kernels. Threads are spawned per call: the ops
// run for milliseconds at least, so a pool would save little and would fight torch's own.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace colabx {

// Runs fn(begin, end) over [0, n) split into at most num_threads contiguous chunks of at least
// min_grain items. fn must be safe to call concurrently on disjoint ranges. Exceptions thrown by
// a worker are rethrown on the calling thread.
template <typename Fn>
void parallel_for(int64_t n, int num_threads, int64_t min_grain, Fn&& fn) {
  if (n <= 0) return;
  int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(num_threads, n / std::max<int64_t>(1, min_grain)));
  if (chunks <= 1) {
    fn(int64_t(0), n);
    return;
  }
  std::vector<std::thread> workers;
  std::vector<std::exception_ptr> errors(chunks);
  workers.reserve(chunks - 1);
  const int64_t step = (n + chunks - 1) / chunks;
  for (int64_t c = 1; c < chunks; ++c) {
    const int64_t b = c * step, e = std::min(n, b + step);
    if (b >= e) break;
    workers.emplace_back([&, c, b, e] {
      try {
        fn(b, e);
      } catch (...) {
        errors[c] = std::current_exception();
      }
    });
  }
  try {
    fn(int64_t(0), std::min(n, step));
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (auto& w : workers) w.join();
  for (auto& err : errors)
    if (err) std::rethrow_exception(err);
}

}  // namespace colabx

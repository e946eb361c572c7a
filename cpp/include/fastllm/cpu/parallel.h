// parallel_for over [0, n) on the shared CPU pool (thread_pool.h): the CPU kernels' one
// set of threads, sized like torch's. Small ranges run inline, so tiny shapes and the
// batch-1 decode step pay no hand-off at all.
#pragma once
#include <algorithm>
#include <cstdint>
#include <functional>

#include "fastllm/cpu/thread_pool.h"

namespace fastllm::cpu {

inline int num_threads() { return pool_num_threads(); }

// fn(begin, end) is called on disjoint chunks; `grain` is the least work per chunk.
template <typename Fn>
void parallel_for(int64_t n, int64_t grain, Fn&& fn) {
  const int64_t chunks = std::min<int64_t>(num_threads(), (n + grain - 1) / std::max<int64_t>(grain, 1));
  if (chunks <= 1) {
    if (n > 0) fn(int64_t{0}, n);
    return;
  }
  const int64_t per = (n + chunks - 1) / chunks;
  pool_run(chunks, [&](int64_t c) {
    const int64_t b = c * per, e = std::min(n, b + per);
    if (b < e) fn(b, e);
  });
}

}  // namespace fastllm::cpu

// parallel_for over [0, n) on std::threads: the CPU kernels' only threading. Small
// ranges run inline, so tiny test shapes pay no thread start-up.
#pragma once
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace fastllm::cpu {

inline int num_threads() {
  static const int n = std::max(1u, std::thread::hardware_concurrency());
  return n;
}

// fn(begin, end) is called on disjoint chunks; `grain` is the least work per thread.
template <typename Fn>
void parallel_for(int64_t n, int64_t grain, Fn&& fn) {
  const int64_t chunks = std::min<int64_t>(num_threads(), (n + grain - 1) / std::max<int64_t>(grain, 1));
  if (chunks <= 1) {
    if (n > 0) fn(int64_t{0}, n);
    return;
  }
  const int64_t per = (n + chunks - 1) / chunks;
  std::vector<std::thread> workers;
  workers.reserve(chunks - 1);
  for (int64_t c = 1; c < chunks; ++c) {
    const int64_t b = c * per, e = std::min(n, b + per);
    if (b < e) workers.emplace_back([&fn, b, e] { fn(b, e); });
  }
  fn(int64_t{0}, std::min(n, per));
  for (auto& w : workers) w.join();
}

}  // namespace fastllm::cpu

// CPU kernel throughput: decode paged attention over a batch and fused softmax rows.
#include <benchmark/benchmark.h>

#include <numeric>
#include <random>
#include <vector>

#include "fastllm/cpu/kernels.h"

static void BM_PagedAttentionDecode(benchmark::State& state) {
  const int64_t S = state.range(0), ctx = state.range(1), H = 32, Hkv = 8, D = 128, BS = 16;
  const int64_t blocks_per_seq = (ctx + BS - 1) / BS, num_blocks = S * blocks_per_seq;
  std::vector<float> q(S * H * D, 0.1f), kc(num_blocks * BS * Hkv * D, 0.01f), vc(kc.size(), 0.02f), out(q.size());
  std::vector<int32_t> tables(num_blocks), seq_lens(S, static_cast<int32_t>(ctx)), qsl(S + 1);
  std::iota(tables.begin(), tables.end(), 0);
  std::iota(qsl.begin(), qsl.end(), 0);
  for (auto _ : state) {
    fastllm::cpu::paged_attention<float>(out.data(), q.data(), kc.data(), vc.data(), tables.data(), seq_lens.data(),
                                         qsl.data(), {S, S, H, Hkv, D, BS, blocks_per_seq}, 0.088f);
    benchmark::DoNotOptimize(out.data());
  }
  state.SetBytesProcessed(state.iterations() * 2 * S * ctx * Hkv * D * sizeof(float));  // K and V read once
}
BENCHMARK(BM_PagedAttentionDecode)->Args({1, 1024})->Args({8, 512})->UseRealTime();

static void BM_FusedSoftmax(benchmark::State& state) {
  const int64_t rows = state.range(0), cols = state.range(1);
  std::vector<float> x(rows * cols), y(x.size());
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  for (float& v : x) v = normal(rng);
  for (auto _ : state) {
    fastllm::cpu::fused_softmax<float>(y.data(), x.data(), nullptr, rows, cols, rows, 0.125f, true, cols - rows);
    benchmark::DoNotOptimize(y.data());
  }
  state.SetBytesProcessed(state.iterations() * 2 * rows * cols * sizeof(float));
}
BENCHMARK(BM_FusedSoftmax)->Args({512, 512})->Args({8, 32000})->UseRealTime();

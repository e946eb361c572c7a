// Allocate/free cost as the pool grows: O(1) means flat time from 1k to 1M blocks.
#include <benchmark/benchmark.h>

#include <vector>

#include "fastllm/block_allocator.h"

static void BM_AllocateFree(benchmark::State& state) {
  const int64_t num_blocks = state.range(0);
  fastllm::BlockAllocator a(num_blocks);
  std::vector<int64_t> held;
  for (int64_t i = 0; i < num_blocks / 2; ++i) held.push_back(a.allocate());  // half-full pool
  for (auto _ : state) {
    const int64_t id = a.allocate();
    benchmark::DoNotOptimize(id);
    a.free(id);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_AllocateFree)->RangeMultiplier(10)->Range(1000, 1000000);

// Allocation that must evict from the prefix-cache LRU (every free block is cached).
static void BM_AllocateEvict(benchmark::State& state) {
  const int64_t num_blocks = state.range(0);
  fastllm::BlockAllocator a(num_blocks);
  for (int64_t i = 0; i < num_blocks; ++i) a.register_block(a.allocate(), static_cast<uint64_t>(i));
  for (int64_t i = 0; i < num_blocks; ++i) a.free(i);
  uint64_t next_hash = num_blocks;
  for (auto _ : state) {
    const int64_t id = a.allocate();
    a.register_block(id, next_hash++);
    a.free(id);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_AllocateEvict)->RangeMultiplier(10)->Range(1000, 1000000);

static void BM_HashBlock(benchmark::State& state) {
  std::vector<int64_t> tokens(state.range(0), 12345);
  uint64_t h = 0;
  for (auto _ : state) benchmark::DoNotOptimize(h = fastllm::hash_block(h, tokens.data(), tokens.size()));
}
BENCHMARK(BM_HashBlock)->Arg(16)->Arg(32);

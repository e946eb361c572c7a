#include <gtest/gtest.h>

#include <random>
#include <set>
#include <vector>

#include "fastllm/block_allocator.h"
#include "fastllm/errors.h"

using fastllm::BlockAllocator;

TEST(BlockAllocator, AllocatesEveryBlockOnceThenRefuses) {
  BlockAllocator a(8);
  std::set<int64_t> ids;
  for (int i = 0; i < 8; ++i) ids.insert(a.allocate());
  EXPECT_EQ(ids.size(), 8u);
  EXPECT_EQ(*ids.begin(), 0);
  EXPECT_EQ(*ids.rbegin(), 7);
  EXPECT_EQ(a.stats().num_free, 0);
  EXPECT_THROW(a.allocate(), std::runtime_error);
}

TEST(BlockAllocator, ErrorsOnDoubleFreeUnknownIdAndBadSize) {
  BlockAllocator a(2);
  const int64_t id = a.allocate();
  a.free(id);
  EXPECT_THROW(a.free(id), fastllm::ArgValueError);
  EXPECT_THROW(a.free(2), fastllm::ArgValueError);
  EXPECT_THROW(a.free(-1), fastllm::ArgValueError);
  EXPECT_THROW(a.share(id), fastllm::ArgValueError);
  EXPECT_THROW(BlockAllocator(0), fastllm::ArgValueError);
}

TEST(BlockAllocator, SharedBlockFreedOnlyWhenLastHolderFrees) {
  BlockAllocator a(2);
  const int64_t id = a.allocate();
  a.share(id);
  EXPECT_EQ(a.ref_count(id), 2);
  a.free(id);
  EXPECT_EQ(a.stats().num_in_use, 1);
  a.free(id);
  EXPECT_EQ(a.stats().num_in_use, 0);
  EXPECT_EQ(a.stats().num_free, 2);
}

TEST(BlockAllocator, CachedBlocksAreReusedAndEvictedLeastRecentlyFreedFirst) {
  BlockAllocator a(3);
  const int64_t b0 = a.allocate(), b1 = a.allocate(), b2 = a.allocate();
  EXPECT_TRUE(a.register_block(b0, 100));
  EXPECT_TRUE(a.register_block(b1, 101));
  EXPECT_FALSE(a.register_block(b2, 100));  // hash already held by b0
  a.free(b1);                               // freed first -> evicted first
  a.free(b0);
  a.free(b2);                               // uncached: reused before any eviction
  EXPECT_EQ(a.stats().num_cached, 2);
  EXPECT_EQ(a.allocate(), b2);
  EXPECT_EQ(a.stats().evictions, 0);
  EXPECT_EQ(a.lookup(100), b0);  // hit: acquired again, leaves the LRU
  EXPECT_EQ(a.ref_count(b0), 1);
  EXPECT_EQ(a.allocate(), b1);   // evicts 101
  EXPECT_EQ(a.stats().evictions, 1);
  EXPECT_EQ(a.lookup(101), -1);
  EXPECT_EQ(a.stats().hits, 1);
  EXPECT_EQ(a.stats().queries, 2);
}

TEST(BlockAllocator, HashChainsDependOnParentAndTokens) {
  const int64_t t1[] = {1, 2, 3, 4}, t2[] = {1, 2, 3, 5};
  EXPECT_EQ(fastllm::hash_block(7, t1, 4), fastllm::hash_block(7, t1, 4));
  EXPECT_NE(fastllm::hash_block(7, t1, 4), fastllm::hash_block(8, t1, 4));
  EXPECT_NE(fastllm::hash_block(7, t1, 4), fastllm::hash_block(7, t2, 4));
  EXPECT_NE(fastllm::hash_block(7, t1, 3), fastllm::hash_block(7, t1, 4));
}

// Random allocate/share/free/register/lookup against a shadow model of ref counts.
TEST(BlockAllocator, RandomOperationsNeverLeakOrDoubleCount) {
  const int64_t n = 64;
  BlockAllocator a(n);
  std::mt19937 rng(1234);
  std::vector<int64_t> held;  // one entry per reference we hold
  for (int step = 0; step < 20000; ++step) {
    const int op = rng() % 5;
    if (op == 0 && a.stats().num_free > 0) {
      held.push_back(a.allocate());
    } else if (op == 1 && !held.empty()) {
      const size_t i = rng() % held.size();
      a.free(held[i]);
      held[i] = held.back();
      held.pop_back();
    } else if (op == 2 && !held.empty()) {
      const int64_t id = held[rng() % held.size()];
      a.share(id);
      held.push_back(id);
    } else if (op == 3 && !held.empty()) {
      const int64_t id = held[rng() % held.size()];
      if (!a.block_hash(id)) a.register_block(id, rng() % 32);
    } else if (op == 4) {
      const int64_t id = a.lookup(rng() % 32);
      if (id >= 0) held.push_back(id);
    }
    std::set<int64_t> distinct(held.begin(), held.end());
    ASSERT_EQ(a.stats().num_in_use, static_cast<int64_t>(distinct.size()));
    ASSERT_EQ(a.stats().num_free + a.stats().num_in_use, n);
  }
  for (int64_t id : held) a.free(id);
  EXPECT_EQ(a.stats().num_free, n);
  for (int64_t id = 0; id < n; ++id) EXPECT_EQ(a.ref_count(id), 0);
}

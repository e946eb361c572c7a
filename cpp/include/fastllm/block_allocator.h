// Fixed pool of KV-cache blocks (DESIGN §3).
//
// A block is in one of three states:
//   in use       ref_count > 0 (shared blocks have ref_count > 1)
//   free         ref_count == 0, holds no prefix-cache hash: on the free list (a stack)
//   cached-free  ref_count == 0, holds a hash: still findable by lookup(), kept on an
//                LRU list and evicted (oldest first) only when the free list is empty
// Every operation is O(1): the free list is a vector, the LRU an intrusive doubly
// linked list through the block table, the prefix cache a hash map.
#pragma once
#include <cstdint>
#include <optional>
#include <unordered_map>
#include <vector>

namespace fastllm {

// Chained hash of a full block: mixes the parent block's hash with the token ids, so
// equal hashes mean equal whole prefixes (up to 64-bit collisions; callers verify).
uint64_t hash_block(uint64_t parent_hash, const int64_t* token_ids, size_t num_tokens);

struct BlockAllocatorStats {
  int64_t num_blocks, num_free, num_in_use, num_cached;
  int64_t hits, queries, evictions;
};

class BlockAllocator {
 public:
  explicit BlockAllocator(int64_t num_blocks);

  int64_t allocate();             // ref_count 1; throws std::runtime_error when no block is left
  void free(int64_t block_id);    // ref_count -= 1; throws ArgValueError on unknown id / double free
  void share(int64_t block_id);   // ref_count += 1 on an in-use block
  int64_t lookup(uint64_t hash);  // acquires the block holding `hash`, or returns -1
  bool register_block(int64_t block_id, uint64_t hash);  // false if `hash` already has a block
  void reset_prefix_cache();      // forget every hash; cached-free blocks become free

  int32_t ref_count(int64_t block_id) const;
  std::optional<uint64_t> block_hash(int64_t block_id) const;
  BlockAllocatorStats stats() const;

 private:
  static constexpr int64_t kNone = -1;
  struct Block {
    int32_t ref_count = 0;
    bool cached = false;
    uint64_t hash = 0;
    int64_t lru_prev = kNone, lru_next = kNone;
  };

  void check_id(int64_t block_id, const char* op) const;
  void lru_push_back(int64_t id);
  void lru_unlink(int64_t id);
  void uncache(int64_t id);

  std::vector<Block> blocks_;
  std::vector<int64_t> free_list_;
  int64_t lru_head_ = kNone, lru_tail_ = kNone, lru_size_ = 0;
  std::unordered_map<uint64_t, int64_t> cache_;  // hash -> block id
  int64_t hits_ = 0, queries_ = 0, evictions_ = 0;
};

}  // namespace fastllm

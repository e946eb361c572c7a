#include "fastllm/block_allocator.h"

#include <stdexcept>
#include <string>

#include "fastllm/errors.h"

namespace fastllm {

static inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

uint64_t hash_block(uint64_t parent_hash, const int64_t* token_ids, size_t num_tokens) {
  uint64_t h = splitmix64(parent_hash ^ (0x5851F42D4C957F2Dull * (num_tokens + 1)));
  for (size_t i = 0; i < num_tokens; ++i) h = splitmix64(h ^ static_cast<uint64_t>(token_ids[i]));
  return h;
}

BlockAllocator::BlockAllocator(int64_t num_blocks) {
  if (num_blocks <= 0) throw ArgValueError("num_blocks must be positive, got " + std::to_string(num_blocks));
  blocks_.resize(num_blocks);
  free_list_.reserve(num_blocks);
  for (int64_t id = num_blocks - 1; id >= 0; --id) free_list_.push_back(id);  // hands out 0, 1, 2, ...
}

void BlockAllocator::check_id(int64_t block_id, const char* op) const {
  if (block_id < 0 || block_id >= static_cast<int64_t>(blocks_.size())) {
    throw ArgValueError(std::string(op) + ": unknown block id " + std::to_string(block_id) + " (pool has " +
                        std::to_string(blocks_.size()) + " blocks)");
  }
}

void BlockAllocator::lru_push_back(int64_t id) {
  Block& b = blocks_[id];
  b.lru_prev = lru_tail_;
  b.lru_next = kNone;
  if (lru_tail_ != kNone) blocks_[lru_tail_].lru_next = id; else lru_head_ = id;
  lru_tail_ = id;
  ++lru_size_;
}

void BlockAllocator::lru_unlink(int64_t id) {
  Block& b = blocks_[id];
  if (b.lru_prev != kNone) blocks_[b.lru_prev].lru_next = b.lru_next; else lru_head_ = b.lru_next;
  if (b.lru_next != kNone) blocks_[b.lru_next].lru_prev = b.lru_prev; else lru_tail_ = b.lru_prev;
  b.lru_prev = b.lru_next = kNone;
  --lru_size_;
}

void BlockAllocator::uncache(int64_t id) {
  Block& b = blocks_[id];
  cache_.erase(b.hash);
  b.cached = false;
  b.hash = 0;
}

int64_t BlockAllocator::allocate() {
  int64_t id;
  if (!free_list_.empty()) {
    id = free_list_.back();
    free_list_.pop_back();
  } else if (lru_head_ != kNone) {  // evict the least recently freed cached block
    id = lru_head_;
    lru_unlink(id);
    uncache(id);
    ++evictions_;
  } else {
    throw std::runtime_error("BlockAllocator: out of KV blocks (all " + std::to_string(blocks_.size()) +
                             " are in use)");
  }
  blocks_[id].ref_count = 1;
  return id;
}

void BlockAllocator::free(int64_t block_id) {
  check_id(block_id, "free");
  Block& b = blocks_[block_id];
  if (b.ref_count == 0) throw ArgValueError("free: block " + std::to_string(block_id) + " is already free (double free)");
  if (--b.ref_count > 0) return;
  if (b.cached) lru_push_back(block_id); else free_list_.push_back(block_id);
}

void BlockAllocator::share(int64_t block_id) {
  check_id(block_id, "share");
  Block& b = blocks_[block_id];
  if (b.ref_count == 0) throw ArgValueError("share: block " + std::to_string(block_id) + " is free");
  ++b.ref_count;
}

int64_t BlockAllocator::lookup(uint64_t hash) {
  ++queries_;
  auto it = cache_.find(hash);
  if (it == cache_.end()) return kNone;
  int64_t id = it->second;
  Block& b = blocks_[id];
  if (b.ref_count == 0) lru_unlink(id);
  ++b.ref_count;
  ++hits_;
  return id;
}

bool BlockAllocator::register_block(int64_t block_id, uint64_t hash) {
  check_id(block_id, "register");
  Block& b = blocks_[block_id];
  if (b.ref_count == 0) throw ArgValueError("register: block " + std::to_string(block_id) + " is free");
  if (b.cached) {
    if (b.hash == hash) return true;
    throw ArgValueError("register: block " + std::to_string(block_id) + " already holds another hash");
  }
  if (cache_.count(hash)) return false;
  cache_.emplace(hash, block_id);
  b.cached = true;
  b.hash = hash;
  return true;
}

void BlockAllocator::reset_prefix_cache() {
  while (lru_head_ != kNone) {
    int64_t id = lru_head_;
    lru_unlink(id);
    uncache(id);
    free_list_.push_back(id);
  }
  for (auto& [hash, id] : cache_) {  // in-use blocks keep their data but leave the cache
    blocks_[id].cached = false;
    blocks_[id].hash = 0;
  }
  cache_.clear();
}

int32_t BlockAllocator::ref_count(int64_t block_id) const {
  check_id(block_id, "ref_count");
  return blocks_[block_id].ref_count;
}

std::optional<uint64_t> BlockAllocator::block_hash(int64_t block_id) const {
  check_id(block_id, "block_hash");
  const Block& b = blocks_[block_id];
  return b.cached ? std::optional<uint64_t>(b.hash) : std::nullopt;
}

BlockAllocatorStats BlockAllocator::stats() const {
  const int64_t num_blocks = static_cast<int64_t>(blocks_.size());
  const int64_t num_free = static_cast<int64_t>(free_list_.size()) + lru_size_;
  return {num_blocks, num_free, num_blocks - num_free, static_cast<int64_t>(cache_.size()),
          hits_, queries_, evictions_};
}

}  // namespace fastllm

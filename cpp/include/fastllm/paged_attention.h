// Paged attention's shared vocabulary (plain C++): its sizes, the head dims the CUDA
// kernels are compiled for, and the per-step plan of the CUDA launch. The CPU kernel,
// the CUDA launchers, ops.cc and the bindings all read it from here.
#pragma once
#include <cstdint>

#include "fastllm/dtype.h"

// The head dims the CUDA paged-attention kernels are instantiated for: the one table.
// FASTLLM_DISPATCH_HEAD_DIM (dispatch.h), kPagedAttentionHeadDims and so fastllm.ops
// (through _C.build_info()) derive from it. X(D, ...) is expanded once per head dim.
#define FASTLLM_FOR_EACH_PAGED_ATTENTION_HEAD_DIM(X, ...) X(64, __VA_ARGS__) X(128, __VA_ARGS__)

namespace fastllm {

#define FASTLLM_HEAD_DIM_LIST_ITEM_(D, ...) D,
inline constexpr int kPagedAttentionHeadDims[] = {
    FASTLLM_FOR_EACH_PAGED_ATTENTION_HEAD_DIM(FASTLLM_HEAD_DIM_LIST_ITEM_, )};
#undef FASTLLM_HEAD_DIM_LIST_ITEM_

constexpr bool cuda_paged_attention_supports(int64_t head_dim) {
  for (int d : kPagedAttentionHeadDims) {
    if (d == head_dim) return true;
  }
  return false;
}

// Sizes of one paged-attention call (shapes as in python/fastllm/reference.py):
// query/out [num_tokens, num_heads, head_dim], caches [*, block_size, num_kv_heads,
// head_dim], block_tables [num_seqs, max_blocks_per_seq].
struct PagedAttentionShape {
  int64_t num_tokens, num_seqs;
  int64_t num_heads, num_kv_heads, head_dim;
  int64_t block_size, max_blocks_per_seq;

  bool operator==(const PagedAttentionShape& o) const {
    return num_tokens == o.num_tokens && num_seqs == o.num_seqs && num_heads == o.num_heads &&
           num_kv_heads == o.num_kv_heads && head_dim == o.head_dim && block_size == o.block_size &&
           max_blocks_per_seq == o.max_blocks_per_seq;
  }
  bool operator!=(const PagedAttentionShape& o) const { return !(*this == o); }
};

// How one step's paged attention runs, decided once when the step is prepared and
// reused by every layer's call (the layers share the shape). On CUDA: whether the
// tensor-core prefill kernel launches (fp16/bf16 on sm_80+, when some sequence's
// q_len * num_heads / num_kv_heads fills a 64-row tile; the decode kernel serves the
// rest), how the decode kernel splits long contexts over CTAs, and the float32
// workspace the splits' partials need. On CPU only the shape, dtype and device count.
struct PagedAttentionPlan {
  PagedAttentionShape shape{};  // what it was planned for: a call must match it
  DType dtype = DType::kOther;
  int device = -1;              // the CUDA device it was planned on; -1: CPU
  bool prefill_kernel = false;
  int num_splits = 1;           // > 1: split-context partials, merged by a second kernel
  int64_t keys_per_split = 0;   // a multiple of 256 keys
  int64_t workspace_bytes = 0;  // 0 unless num_splits > 1
};

}  // namespace fastllm

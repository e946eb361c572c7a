// CPU kernels: raw pointers and sizes, no framework types (DESIGN §2). T is float,
// Half or BFloat16; arithmetic is fp32. Shapes as in python/fastllm/reference.py.
#pragma once
#include <cstdint>

#include "fastllm/paged_attention.h"

namespace fastllm::cpu {

// Copies token rows (row_elems = num_kv_heads * head_dim elements of elem_bytes each) of
// key/value into the caches at slot_mapping; slot -1 is skipped (padding). Token t's row
// starts key_stride / value_stride elements after token t-1's: row_elems for contiguous
// tensors, more for views of the fused qkv projection output.
void reshape_and_cache(const void* key, const void* value, void* k_cache, void* v_cache,
                       const int64_t* slot_mapping, int64_t num_tokens, int64_t row_elems, int64_t key_stride,
                       int64_t value_stride, int64_t elem_bytes);

using ::fastllm::PagedAttentionShape;

// query's token t starts at query + t * q_token_stride (<= 0: num_heads * head_dim, a
// contiguous query; more for the q part of the fused qkv projection's output).
template <typename T>
void paged_attention(T* out, const T* query, const T* k_cache, const T* v_cache,
                     const int32_t* block_tables, const int32_t* seq_lens,
                     const int32_t* query_start_loc, const PagedAttentionShape& shape, float scale,
                     int64_t q_token_stride = 0);

// out/scores viewed as [num_rows, num_cols]; causal masking uses row % rows_per_matrix.
// Row r is scaled by scale * row_scale[r] (row_scale [num_rows], or nullptr for 1).
template <typename T>
void fused_softmax(T* out, const T* scores, const float* row_scale, int64_t num_rows, int64_t num_cols,
                   int64_t rows_per_matrix, float scale, bool causal, int64_t causal_offset);

}  // namespace fastllm::cpu

// Host-side launchers of the CUDA kernels: raw pointers, sizes and a stream in, a
// cudaError_t out. Plain C++ (no CUDA syntax), so the core's dispatch can call them.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace fastllm::cuda {

enum class ScalarType { kF32, kF16, kBF16 };

// Number of usable GPUs; 0 when there is no driver or device (never throws).
int device_count();

// key/value [num_tokens, row_bytes] -> caches at slot_mapping (slot -1 skipped).
cudaError_t reshape_and_cache(const void* key, const void* value, void* k_cache, void* v_cache,
                              const int64_t* slot_mapping, int64_t num_tokens, int64_t row_bytes,
                              cudaStream_t stream);

// Causal paged attention. head_dim 64 or 128; num_heads a multiple of num_kv_heads;
// query rows [T, H, D] may have any token stride (q_token_stride elements, 16-byte
// aligned rows), out is contiguous. With fp16/bf16 on sm_80+, sequences whose
// q_len * (num_heads / num_kv_heads) fills a 64-row tile run on tensor cores
// (paged_prefill.cuh) and the rest on the decode kernel (paged_attention.cuh);
// max_query_len (the batch's longest q_len, or < 0: unknown) lets a decode-only step skip
// the prefill launch. fp32 runs all on the decode kernel.
// Decode of long contexts with few CTAs is split across CTAs and merged (flash-decoding);
// the splits' partial results live in a caller-owned workspace of
// paged_attention_workspace_bytes(...) bytes (0 when no split is needed), so memory
// stays with the caller's allocator (and CUDA graphs capture no allocation).
bool paged_attention_supports(int head_dim);
size_t paged_attention_workspace_bytes(int num_tokens, int num_heads, int head_dim, int max_blocks,
                                       int block_size);
cudaError_t paged_attention(ScalarType dtype, void* out, const void* query, int64_t q_token_stride,
                            const void* k_cache, const void* v_cache, const int32_t* block_tables,
                            const int32_t* seq_lens, const int32_t* query_start_loc, int num_tokens, int num_seqs,
                            int max_query_len, int num_heads, int num_kv_heads, int head_dim, int block_size,
                            int max_blocks, float scale, void* workspace, size_t workspace_bytes,
                            cudaStream_t stream);

// softmax(scale * row_scale[r] * scores) by rows, causal when `causal` (see
// fused_softmax.cuh). row_scale: [num_rows] float32 on the device, or nullptr (all 1).
cudaError_t fused_softmax(ScalarType dtype, void* out, const void* scores, const float* row_scale, int64_t num_rows,
                          int64_t num_cols, int64_t rows_per_matrix, float scale, bool causal, int64_t causal_offset,
                          cudaStream_t stream);

}  // namespace fastllm::cuda

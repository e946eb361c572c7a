// The ops as the bindings see them: validated TensorViews in, dispatched to the CPU
// kernels or the CUDA launchers by device. `stream` is a cudaStream_t as an integer
// (0 = default stream; ignored on CPU).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "fastllm/tensor_view.h"

namespace fastllm {

bool cuda_compiled();                  // built with CUDA kernels
bool cuda_available();                 // ... and a GPU + driver can run them
std::vector<std::string> cuda_ops();   // ops with a CUDA kernel in this build
std::string cuda_archs();              // the archs compiled for ("" without CUDA)

void reshape_and_cache(const TensorView& key, const TensorView& value, const TensorView& k_cache,
                       const TensorView& v_cache, const TensorView& slot_mapping, int64_t stream);

// `query` may have any token stride (a view of the fused qkv output) on CUDA; the CPU
// kernel needs it contiguous. `max_query_len`: the longest q_len in the batch, known on
// the host (-1: unknown); 1 keeps a decode step on the decode kernel alone (CUDA graphs).
// `workspace` (CUDA only, may be null when the size below is 0): a float32 buffer of at
// least paged_attention_workspace_bytes(...) bytes for the split-context partial results.
void paged_attention(const TensorView& out, const TensorView& query, const TensorView& k_cache,
                     const TensorView& v_cache, const TensorView& block_tables, const TensorView& seq_lens,
                     const TensorView& query_start_loc, float scale, int64_t max_query_len,
                     const TensorView* workspace, int64_t stream);
int64_t paged_attention_workspace_bytes(int64_t num_tokens, int64_t num_heads, int64_t head_dim, int64_t max_blocks,
                                        int64_t block_size);

// `row_scale` (may be null): float32 [num_rows] (num_rows = scores.numel() / last dim),
// multiplied into each row's scale (per-row inverse temperatures when sampling).
void fused_softmax(const TensorView& out, const TensorView& scores, float scale, bool causal,
                   int64_t causal_offset, const TensorView* row_scale, int64_t stream);

}  // namespace fastllm

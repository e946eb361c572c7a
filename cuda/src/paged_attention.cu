#include <algorithm>

#include "fastllm/cuda/launchers.h"
#include "fastllm/cuda/paged_attention_launch.cuh"

namespace fastllm::cuda {

static int num_sms(int device) {
  int sms = 132;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return sms;
}

// The tensor-core prefill kernel needs sm_80 (mma bf16, cp.async).
static bool has_sm80(int device) {
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  return major >= 8;
}

// The longest context any sequence can have is known on the host from the table width;
// split it when the grid alone would leave SMs idle (batch 1 with a long context).
static int num_splits(int64_t num_tokens, int64_t num_heads, int64_t max_keys, int sms) {
  const int64_t ctas = num_tokens * num_heads;  // upper bound (HEADS = 1)
  const int64_t want = std::max<int64_t>(1, (4 * sms) / std::max<int64_t>(1, ctas / 8));
  return static_cast<int>(std::max<int64_t>(1, std::min((max_keys + 255) / 256, want)));
}

PagedAttentionPlan plan_paged_attention(DType dtype, const PagedAttentionShape& shape, int64_t max_query_len) {
  PagedAttentionPlan plan;
  plan.shape = shape;
  plan.dtype = dtype;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) cudaGetLastError();
  plan.device = device;
  // max_query_len < 0: unknown, assume some sequence may be long enough.
  const int64_t q_len = max_query_len < 0 ? shape.num_tokens : std::min(max_query_len, shape.num_tokens);
  const int group = shape.num_kv_heads > 0 ? static_cast<int>(shape.num_heads / shape.num_kv_heads) : 1;
  plan.prefill_kernel = dtype != DType::kF32 && on_prefill_kernel(static_cast<int>(q_len), group) && has_sm80(device);
  const int64_t max_keys = shape.max_blocks_per_seq * shape.block_size;
  plan.num_splits = num_splits(shape.num_tokens, shape.num_heads, max_keys, num_sms(device));
  // Split boundaries on multiples of 256 keys, so they do not move with the table width
  // (a CUDA-graph step and an eager step then sum the same partials in the same order).
  plan.keys_per_split = ((max_keys + plan.num_splits - 1) / plan.num_splits + 255) / 256 * 256;
  if (plan.num_splits > 1) {
    plan.workspace_bytes = shape.num_tokens * shape.num_heads * plan.num_splits * (shape.head_dim + 2) *
                           static_cast<int64_t>(sizeof(float));
  }
  return plan;
}

cudaError_t paged_attention(const PagedAttentionParams& params, cudaStream_t stream) {
  return run_paged_attention</*LDSM=*/true>(params, stream);
}

}  // namespace fastllm::cuda

#include <algorithm>
#include <type_traits>

#include "fastllm/cuda/launchers.h"
#include "fastllm/cuda/nvtx.h"
#include "fastllm/cuda/paged_attention.cuh"
#include "fastllm/cuda/paged_prefill.cuh"

namespace fastllm::cuda {

bool paged_attention_supports(int head_dim) { return head_dim == 64 || head_dim == 128; }

static int num_sms() {
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return sms;
}

// The tensor-core prefill kernel needs sm_80 (mma bf16, cp.async).
static bool has_sm80() {
  int device = 0, major = 0;
  if (cudaGetDevice(&device) == cudaSuccess) cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  return major >= 8;
}

// The longest context any sequence can have is known on the host from the table width;
// split it when the grid alone would leave SMs idle (batch 1 with a long context).
static int num_splits(int num_tokens, int num_heads, int max_blocks, int block_size) {
  const int max_keys = max_blocks * block_size;
  const int ctas = num_tokens * num_heads;  // upper bound (HEADS = 1)
  const int want = std::max(1, (4 * num_sms()) / std::max(1, ctas / 8));
  return std::max(1, std::min((max_keys + 255) / 256, want));
}

size_t paged_attention_workspace_bytes(int num_tokens, int num_heads, int head_dim, int max_blocks,
                                       int block_size) {
  const int splits = num_splits(num_tokens, num_heads, max_blocks, block_size);
  if (splits == 1) return 0;
  return (size_t)num_tokens * num_heads * splits * (head_dim + 2) * sizeof(float);
}

template <typename T, int D, int HEADS>
static cudaError_t launch_decode(PagedAttentionParams& p, int num_tokens, cudaStream_t stream) {
  const dim3 grid(num_tokens, p.num_heads / HEADS, p.num_splits);
  paged_attention_kernel<T, D, HEADS><<<grid, kAttentionThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  paged_attention_merge_kernel<T><<<dim3(num_tokens, p.num_heads), D, 0, stream>>>(p, D);
  return cudaGetLastError();
}

// HEADS (query heads per CTA) is the largest of 8/4/2/1 dividing the GQA group.
template <typename T, int D>
static cudaError_t dispatch_heads(PagedAttentionParams& p, int num_tokens, cudaStream_t stream) {
  const int group = p.num_heads / p.num_kv_heads;
  if (group % 8 == 0) return launch_decode<T, D, 8>(p, num_tokens, stream);
  if (group % 4 == 0) return launch_decode<T, D, 4>(p, num_tokens, stream);
  if (group % 2 == 0) return launch_decode<T, D, 2>(p, num_tokens, stream);
  return launch_decode<T, D, 1>(p, num_tokens, stream);
}

static bool g_prefill_ldmatrix = true;
void set_paged_prefill_ldmatrix(bool on) { g_prefill_ldmatrix = on; }
bool paged_prefill_ldmatrix() { return g_prefill_ldmatrix; }

// Sequences filling a 64-row tile go to the tensor-core kernel; the decode kernel skips them.
template <typename T, int D>
static cudaError_t launch_prefill(PagedAttentionParams& p, int num_tokens, cudaStream_t stream) {
  const dim3 grid(prefill_grid_x(num_tokens, p.num_seqs, p.num_heads / p.num_kv_heads), p.num_kv_heads);
  if (g_prefill_ldmatrix) {
    paged_prefill_kernel<T, D, true><<<grid, kPrefillThreads, 0, stream>>>(p);
  } else {
    paged_prefill_kernel<T, D, false><<<grid, kPrefillThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
static cudaError_t dispatch_dim(PagedAttentionParams& p, int head_dim, int num_tokens, bool prefill,
                                cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {
    if (prefill) {
      cudaError_t err = head_dim == 64 ? launch_prefill<T, 64>(p, num_tokens, stream)
                                       : launch_prefill<T, 128>(p, num_tokens, stream);
      if (err != cudaSuccess) return err;
      p.decode_only = true;
    }
  }
  if (head_dim == 64) return dispatch_heads<T, 64>(p, num_tokens, stream);
  if (head_dim == 128) return dispatch_heads<T, 128>(p, num_tokens, stream);
  return cudaErrorInvalidValue;
}

cudaError_t paged_attention(ScalarType dtype, void* out, const void* query, int64_t q_token_stride,
                            const void* k_cache, const void* v_cache, const int32_t* block_tables,
                            const int32_t* seq_lens, const int32_t* query_start_loc, int num_tokens, int num_seqs,
                            int max_query_len, int num_heads, int num_kv_heads, int head_dim, int block_size,
                            int max_blocks, float scale, void* workspace, size_t workspace_bytes,
                            cudaStream_t stream) {
  FASTLLM_NVTX_RANGE("paged_attention");
  if (num_tokens == 0) return cudaSuccess;
  if (!paged_attention_supports(head_dim) || num_kv_heads <= 0 || num_heads % num_kv_heads) return cudaErrorInvalidValue;
  PagedAttentionParams p{out, query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                         nullptr, nullptr, nullptr, num_seqs, num_heads, num_kv_heads, block_size, max_blocks,
                         1, 0, scale, q_token_stride, false};
  const int max_keys = max_blocks * block_size;
  p.num_splits = num_splits(num_tokens, num_heads, max_blocks, block_size);
  // Split boundaries on multiples of 256 keys, so they do not move with the table width
  // (a CUDA-graph step and an eager step then sum the same partials in the same order).
  p.keys_per_split = ((max_keys + p.num_splits - 1) / p.num_splits + 255) / 256 * 256;
  if (p.num_splits > 1) {
    const size_t rows = (size_t)num_tokens * num_heads * p.num_splits;
    if (workspace == nullptr || workspace_bytes < rows * (head_dim + 2) * sizeof(float)) return cudaErrorInvalidValue;
    p.split_acc = static_cast<float*>(workspace);
    p.split_max = p.split_acc + rows * head_dim;
    p.split_sum = p.split_max + rows;
  }
  // max_query_len < 0: unknown, assume some sequence may be long enough.
  const int group = num_heads / num_kv_heads;
  const bool prefill = on_prefill_kernel(max_query_len < 0 ? num_tokens : max_query_len, group) && has_sm80();
  switch (dtype) {
    case ScalarType::kF32: return dispatch_dim<float>(p, head_dim, num_tokens, prefill, stream);
    case ScalarType::kF16: return dispatch_dim<__half>(p, head_dim, num_tokens, prefill, stream);
    case ScalarType::kBF16: return dispatch_dim<__nv_bfloat16>(p, head_dim, num_tokens, prefill, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastllm::cuda

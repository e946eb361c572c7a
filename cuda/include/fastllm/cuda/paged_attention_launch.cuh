// The paged-attention launcher body, templated on the prefill kernel's fragment loads:
// paged_attention.cu instantiates the ldmatrix kernel (the library's only variant);
// cuda/testing/ instantiates the plain shared-load reference variant for the C++
// tests and benches (fastllm/cuda/testing.h).
#pragma once
#include <type_traits>

#include "fastllm/cuda/launchers.h"
#include "fastllm/cuda/nvtx.h"
#include "fastllm/cuda/paged_attention.cuh"
#include "fastllm/cuda/paged_prefill.cuh"
#include "fastllm/dispatch.h"

namespace fastllm::cuda {

template <typename T, int D, int HEADS>
cudaError_t launch_decode(const AttentionKernelParams& p, int num_tokens, cudaStream_t stream) {
  const dim3 grid(num_tokens, p.num_heads / HEADS, p.num_splits);
  paged_attention_kernel<T, D, HEADS><<<grid, kAttentionThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  paged_attention_merge_kernel<T><<<dim3(num_tokens, p.num_heads), D, 0, stream>>>(p, D);
  return cudaGetLastError();
}

// HEADS (query heads per CTA) is the largest of 8/4/2/1 dividing the GQA group.
template <typename T, int D>
cudaError_t launch_decode_heads(const AttentionKernelParams& p, int num_tokens, cudaStream_t stream) {
  const int group = p.num_heads / p.num_kv_heads;
  if (group % 8 == 0) return launch_decode<T, D, 8>(p, num_tokens, stream);
  if (group % 4 == 0) return launch_decode<T, D, 4>(p, num_tokens, stream);
  if (group % 2 == 0) return launch_decode<T, D, 2>(p, num_tokens, stream);
  return launch_decode<T, D, 1>(p, num_tokens, stream);
}

// Sequences filling a 64-row tile go to the tensor-core kernel first; the decode kernel
// then skips them (decode_only). fp32 has no tensor-core kernel (its plan never asks).
template <typename T, int D, bool LDSM>
cudaError_t launch_attention(AttentionKernelParams& p, bool prefill_kernel, int num_tokens, cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {
    if (prefill_kernel) {
      const dim3 grid(prefill_grid_x(num_tokens, p.num_seqs, p.num_heads / p.num_kv_heads), p.num_kv_heads);
      paged_prefill_kernel<T, D, LDSM><<<grid, kPrefillThreads, 0, stream>>>(p);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
      p.decode_only = true;
    }
  }
  return launch_decode_heads<T, D>(p, num_tokens, stream);
}

// The kernels' view of a call: the plan's split layout over the caller's workspace
// ([T, H, splits, D] partial sums, then [T, H, splits] maxima and sums).
inline AttentionKernelParams kernel_params(const PagedAttentionParams& a) {
  const PagedAttentionShape& s = a.shape;
  AttentionKernelParams p{a.out, a.query, a.k_cache, a.v_cache, a.block_tables, a.seq_lens, a.query_start_loc,
                          nullptr, nullptr, nullptr, static_cast<int>(s.num_seqs), static_cast<int>(s.num_heads),
                          static_cast<int>(s.num_kv_heads), static_cast<int>(s.block_size),
                          static_cast<int>(s.max_blocks_per_seq), a.plan.num_splits,
                          static_cast<int>(a.plan.keys_per_split), a.scale, a.q_token_stride, false};
  if (a.plan.num_splits > 1) {
    const size_t rows = static_cast<size_t>(s.num_tokens) * s.num_heads * a.plan.num_splits;
    p.split_acc = static_cast<float*>(a.workspace);
    p.split_max = p.split_acc + rows * s.head_dim;
    p.split_sum = p.split_max + rows;
  }
  return p;
}

template <bool LDSM>
cudaError_t run_paged_attention(const PagedAttentionParams& a, cudaStream_t stream) {
  FASTLLM_NVTX_RANGE("paged_attention");
  const PagedAttentionShape& s = a.shape;
  if (s.num_tokens == 0) return cudaSuccess;
  if (s.num_kv_heads <= 0 || s.num_heads % s.num_kv_heads != 0) return cudaErrorInvalidValue;
  if (a.plan.num_splits > 1 && a.workspace == nullptr) return cudaErrorInvalidValue;
  AttentionKernelParams p = kernel_params(a);
  const int num_tokens = static_cast<int>(s.num_tokens);
  return FASTLLM_DISPATCH_CUDA_FLOAT(a.dtype, [&] {
    return FASTLLM_DISPATCH_HEAD_DIM(s.head_dim, cudaErrorInvalidValue, [&] {
      return launch_attention<scalar_t, HEAD_DIM, LDSM>(p, a.plan.prefill_kernel, num_tokens, stream);
    });
  });
}

}  // namespace fastllm::cuda

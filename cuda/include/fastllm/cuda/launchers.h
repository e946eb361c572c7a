// Host-side launchers of the CUDA kernels: raw pointers, sizes and a stream in, a
// cudaError_t out. Plain C++ (no CUDA syntax), so the core's dispatch can call them.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "fastllm/dtype.h"
#include "fastllm/paged_attention.h"

namespace fastllm::cuda {

// The launchers take the core's dtype (float types only; others: cudaErrorInvalidValue).
using ScalarType = ::fastllm::DType;

// Number of usable GPUs; 0 when there is no driver or device (never throws).
int device_count();

// Makes `device` the current device for the guard's lifetime: kernels launch on the
// current device, which need not be the one holding the tensors (torch's current
// device is its own state, not the runtime's).
// device < 0: leave the current device alone. status(): cudaSuccess, or why the switch
// failed (the runtime's sticky error is cleared, so later calls are not blamed for it).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  cudaError_t status() const { return status_; }

 private:
  int previous_ = -1;  // -1: nothing to restore
  cudaError_t status_ = cudaSuccess;
};

// key/value rows of row_elems elements (elem_bytes each) -> caches at slot_mapping (slot
// -1 skipped). Token t's row is at key + t * key_stride elements (value likewise): views
// of the fused qkv output need no copy. 16-byte copies when rows, strides and pointers
// allow, narrower ones otherwise.
cudaError_t reshape_and_cache(const void* key, const void* value, void* k_cache, void* v_cache,
                              const int64_t* slot_mapping, int64_t num_tokens, int64_t row_elems,
                              int64_t key_stride, int64_t value_stride, int64_t elem_bytes, cudaStream_t stream);

// Causal paged attention, in two calls (cf. FlashInfer's plan / run):
//   plan = plan_paged_attention(dtype, shape, max_query_len);   // once per step
//   paged_attention({..., plan, workspace}, stream);             // every layer
// The plan (fastllm/paged_attention.h) fixes the kernels: with fp16/bf16 on sm_80+,
// sequences whose q_len * (num_heads / num_kv_heads) fills a 64-row tile run on tensor
// cores (paged_prefill.cuh) and the rest on the decode kernel (paged_attention.cuh);
// max_query_len (the step's longest q_len, or < 0: unknown) lets a decode-only step skip
// the prefill launch. fp32 runs all on the decode kernel. Decode of long contexts with
// few CTAs is split across CTAs and merged (flash-decoding); the splits' partials live in
// a caller-owned workspace of plan.workspace_bytes (0 when no split is needed), so
// memory stays with the caller's allocator (and CUDA graphs capture no allocation).
// Plans for the current device (its SM count and compute capability). Sizes are not
// validated here: ops.cc checks the tensors, and that calls match their plan.
PagedAttentionPlan plan_paged_attention(DType dtype, const PagedAttentionShape& shape, int64_t max_query_len);

// The launcher ABI of one paged-attention call (cf. FlashInfer's BatchDecodeParams and
// paged_kv_t): pointers, sizes, and the step's plan.
struct PagedAttentionParams {
  DType dtype = DType::kOther;      // of query, out and the caches
  PagedAttentionShape shape{};
  void* out = nullptr;              // [T, H, D], contiguous
  const void* query = nullptr;      // [T, H, D]: token t at query + t * q_token_stride elements
  int64_t q_token_stride = 0;       // 16-byte aligned rows
  const void* k_cache = nullptr;    // [num_blocks, block_size, Hkv, D], contiguous
  const void* v_cache = nullptr;
  const int32_t* block_tables = nullptr;     // [S, max_blocks_per_seq]
  const int32_t* seq_lens = nullptr;         // [S]: keys in cache, this step's included
  const int32_t* query_start_loc = nullptr;  // [S + 1]
  float scale = 1.f;
  PagedAttentionPlan plan{};        // plan_paged_attention(dtype, shape, ...)
  void* workspace = nullptr;        // >= plan.workspace_bytes bytes, float-aligned (null when 0)
};

// head_dim one of kPagedAttentionHeadDims; num_heads a multiple of num_kv_heads.
cudaError_t paged_attention(const PagedAttentionParams& params, cudaStream_t stream);

// softmax(scale * row_scale[r] * scores) by rows, causal when `causal` (see
// fused_softmax.cuh). row_scale: [num_rows] float32 on the device, or nullptr (all 1).
cudaError_t fused_softmax(ScalarType dtype, void* out, const void* scores, const float* row_scale, int64_t num_rows,
                          int64_t num_cols, int64_t rows_per_matrix, float scale, bool causal, int64_t causal_offset,
                          cudaStream_t stream);

// ---- fused elementwise ops of the decoder layer (rms_norm.cuh, silu_and_mul.cuh,
// rotary_embedding.cuh). Rounding points are HF's: fp32 math, a round to the dtype
// wherever torch would round an intermediate tensor. Contiguous rows unless noted.

// x, out [num_tokens, hidden]; weight [hidden]:
// out = dtype(weight * dtype(x * rsqrt(mean(x^2) + eps))).
cudaError_t rms_norm(ScalarType dtype, void* out, const void* x, const void* weight, int64_t num_tokens,
                     int64_t hidden, float eps, cudaStream_t stream);

// In place: residual = dtype(residual + x); x = rms_norm(residual).
cudaError_t fused_add_rms_norm(ScalarType dtype, void* x, void* residual, const void* weight, int64_t num_tokens,
                               int64_t hidden, float eps, cudaStream_t stream);

// x [num_tokens, 2 * inter] = [gate | up] -> out [num_tokens, inter] = dtype(dtype(silu(gate)) * up).
cudaError_t silu_and_mul(ScalarType dtype, void* out, const void* x, int64_t num_tokens, int64_t inter,
                         cudaStream_t stream);

// In place rotate-half RoPE of query [num_tokens, num_heads, head_dim] and key
// [num_tokens, num_kv_heads, head_dim], token t's heads at query + t * query_stride
// (elements; key likewise); cos, sin [num_tokens, head_dim / 2] contiguous.
cudaError_t rotary_embedding(ScalarType dtype, void* query, void* key, const void* cos, const void* sin,
                             int64_t num_tokens, int num_heads, int num_kv_heads, int head_dim, int64_t query_stride,
                             int64_t key_stride, cudaStream_t stream);

}  // namespace fastllm::cuda

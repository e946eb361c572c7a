// RMSNorm and residual-add + RMSNorm over rows [num_tokens, hidden], one CTA per row.
// Rounding as HF's LlamaRMSNorm: y = dtype(x * rsqrt(mean(x^2) + eps)) in float32, then
// out = dtype(weight * y). Pass 1 reads the row (fp32 sum of squares, block reduction),
// pass 2 reads it again (L1/L2-resident) to normalise: each thread touches the same
// elements in both passes, so the fused variant's pass-2 read of the residual it wrote in
// pass 1 needs no barrier.
#pragma once
#include <cstdint>

#include "fastllm/cuda/row_vec.cuh"

namespace fastllm::cuda {

template <typename T, int VEC>
// src is not __restrict__: in fused_add_rms_norm it is the residual this kernel just wrote
// (a restrict-qualified read could become a non-coherent ld.global.nc of stale data).
__device__ __forceinline__ void normalize_row(T* out, const T* src, const T* __restrict__ weight,
                                              int64_t num_vecs, float inv_rms) {
  for (int64_t i = threadIdx.x; i < num_vecs; i += blockDim.x) {
    float v[VEC], w[VEC];
    load_floats<T, VEC>(src + i * VEC, v);
    load_floats<T, VEC>(weight + i * VEC, w);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = w[j] * round_to<T>(v[j] * inv_rms);
    store_floats<T, VEC>(out + i * VEC, v);
  }
}

// VEC divides hidden; x, out, weight VEC-aligned.
template <typename T, int VEC>
__global__ void rms_norm_kernel(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ weight,
                                int64_t hidden, float eps) {
  const T* row = x + blockIdx.x * hidden;
  const int64_t num_vecs = hidden / VEC;
  float sum_sq = 0.f;
  for (int64_t i = threadIdx.x; i < num_vecs; i += blockDim.x) {
    float v[VEC];
    load_floats<T, VEC>(row + i * VEC, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) sum_sq += v[j] * v[j];
  }
  const float inv_rms = rsqrtf(block_reduce_sum(sum_sq) / static_cast<float>(hidden) + eps);
  normalize_row<T, VEC>(out + blockIdx.x * hidden, row, weight, num_vecs, inv_rms);
}

// residual = dtype(residual + x) (HF adds the residual in the model dtype); x = rms_norm(residual).
template <typename T, int VEC>
__global__ void fused_add_rms_norm_kernel(T* __restrict__ x, T* __restrict__ residual, const T* __restrict__ weight,
                                          int64_t hidden, float eps) {
  T* x_row = x + blockIdx.x * hidden;
  T* res_row = residual + blockIdx.x * hidden;
  const int64_t num_vecs = hidden / VEC;
  float sum_sq = 0.f;
  for (int64_t i = threadIdx.x; i < num_vecs; i += blockDim.x) {
    float a[VEC], r[VEC];
    load_floats<T, VEC>(x_row + i * VEC, a);
    load_floats<T, VEC>(res_row + i * VEC, r);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      r[j] = round_to<T>(r[j] + a[j]);
      sum_sq += r[j] * r[j];
    }
    store_floats<T, VEC>(res_row + i * VEC, r);
  }
  const float inv_rms = rsqrtf(block_reduce_sum(sum_sq) / static_cast<float>(hidden) + eps);
  normalize_row<T, VEC>(x_row, res_row, weight, num_vecs, inv_rms);
}

}  // namespace fastllm::cuda

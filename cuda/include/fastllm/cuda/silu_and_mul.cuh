// SwiGLU's activation: x [num_tokens, 2 * inter] = [gate | up] (the fused gate_up
// projection's output) -> out [num_tokens, inter] = dtype(dtype(silu(gate)) * up), the
// rounding of HF's act_fn(gate) * up. A flat grid-stride loop over VEC-wide chunks of
// out, so a single decode token still spreads over many CTAs.
#pragma once
#include <cstdint>

#include "fastllm/cuda/row_vec.cuh"

namespace fastllm::cuda {

// torch's formula (x / (1 + exp(-x))) with the accurate expf, not __expf.
__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }

// VEC divides inter; x and out VEC-aligned.
template <typename T, int VEC>
__global__ void silu_and_mul_kernel(T* __restrict__ out, const T* __restrict__ x, int64_t num_tokens, int64_t inter) {
  const int64_t vecs_per_row = inter / VEC;
  const int64_t total = num_tokens * vecs_per_row;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t token = i / vecs_per_row;
    const int64_t col = (i - token * vecs_per_row) * VEC;
    const T* gate = x + token * 2 * inter + col;
    float g[VEC], u[VEC];
    load_floats<T, VEC>(gate, g);
    load_floats<T, VEC>(gate + inter, u);
#pragma unroll
    for (int j = 0; j < VEC; ++j) g[j] = round_to<T>(silu(g[j])) * u[j];
    store_floats<T, VEC>(out + token * inter + col, g);
  }
}

}  // namespace fastllm::cuda

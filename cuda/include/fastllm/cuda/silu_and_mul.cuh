// SwiGLU's activation: x [num_tokens, 2 * inter] = [gate | up] (the fused gate_up
// projection's output) -> out [num_tokens, inter] = dtype(dtype(silu(gate)) * up), the
// rounding of HF's act_fn(gate) * up. Small CTAs over VEC-wide chunks of out, so a single
// decode token still spreads over several SMs.
#pragma once
#include <cstdint>

#include "fastllm/cuda/row_vec.cuh"

namespace fastllm::cuda {

// torch's formula (x / (1 + exp(-x))) with the accurate expf, not __expf.
__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }

// Grid (num_tokens, ceil(inter / VEC / blockDim.x)): one VEC-wide chunk of one token's
// row per thread, no index division. VEC divides inter; with VEC > 1, x and out are
// 16-byte aligned.
template <typename T, int VEC>
__global__ void silu_and_mul_kernel(T* __restrict__ out, const T* __restrict__ x, int64_t inter) {
  const int64_t token = blockIdx.x;
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (col >= inter) return;
  const T* gate = x + token * 2 * inter + col;
  float g[VEC], u[VEC];
  load_floats<T, VEC>(gate, g);
  load_floats<T, VEC>(gate + inter, u);
#pragma unroll
  for (int j = 0; j < VEC; ++j) g[j] = round_to<T>(silu(g[j])) * u[j];
  store_floats<T, VEC>(out + token * inter + col, g);
}

}  // namespace fastllm::cuda

// Neox (rotate-half) RoPE in place on query [T, H, D] and key [T, Hkv, D], which are
// views of the fused qkv projection output (token stride != heads * D). One CTA per
// token; a thread rotates VEC pairs (x1 = x[j], x2 = x[j + D/2]) of one head.
// Rounding as torch's unfused ops in the model dtype (layers.py's former _rotate):
//   x1' = dtype(dtype(x1 * c) - dtype(x2 * s)),  x2' = dtype(dtype(x2 * c) + dtype(x1 * s)).
// The _rn intrinsics keep nvcc from contracting a multiply and an add into an fma,
// which would skip fp32's intermediate rounding and differ from torch.
#pragma once
#include <cstdint>

#include "fastllm/cuda/row_vec.cuh"

namespace fastllm::cuda {

struct RotaryParams {
  void* query;
  void* key;
  const void* cos;  // [T, D/2]
  const void* sin;
  int64_t query_stride, key_stride;  // elements between consecutive tokens
  int num_heads, num_kv_heads, head_dim;
};

// VEC divides D/2; every row start and both halves VEC-aligned.
template <typename T, int VEC>
__global__ void rotary_embedding_kernel(RotaryParams p) {
  const int64_t token = blockIdx.x;
  const int half = p.head_dim / 2;
  const int vecs_per_head = half / VEC;
  const int total = (p.num_heads + p.num_kv_heads) * vecs_per_head;
  const T* cos_row = static_cast<const T*>(p.cos) + token * half;
  const T* sin_row = static_cast<const T*>(p.sin) + token * half;
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    const int head = i / vecs_per_head;
    const int j = (i - head * vecs_per_head) * VEC;
    T* x = head < p.num_heads
               ? static_cast<T*>(p.query) + token * p.query_stride + static_cast<int64_t>(head) * p.head_dim
               : static_cast<T*>(p.key) + token * p.key_stride + static_cast<int64_t>(head - p.num_heads) * p.head_dim;
    float x1[VEC], x2[VEC], c[VEC], s[VEC];
    load_floats<T, VEC>(x + j, x1);
    load_floats<T, VEC>(x + half + j, x2);
    load_floats<T, VEC>(cos_row + j, c);
    load_floats<T, VEC>(sin_row + j, s);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float a = x1[k], b = x2[k];
      x1[k] = __fsub_rn(round_to<T>(__fmul_rn(a, c[k])), round_to<T>(__fmul_rn(b, s[k])));
      x2[k] = __fadd_rn(round_to<T>(__fmul_rn(b, c[k])), round_to<T>(__fmul_rn(a, s[k])));
    }
    store_floats<T, VEC>(x + j, x1);
    store_floats<T, VEC>(x + half + j, x2);
  }
}

}  // namespace fastllm::cuda

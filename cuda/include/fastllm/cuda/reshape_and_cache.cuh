// One thread block per token; threads copy the token's K and V rows in VecT-sized
// chunks (uint4 = 16 bytes when the rows, token strides and pointers allow it). Source
// rows may be spaced wider than a row (views of the fused qkv projection output).
#pragma once
#include <cstdint>

namespace fastllm::cuda {

// vecs_per_row, key_stride, value_stride: in VecT units.
template <typename VecT>
__global__ void reshape_and_cache_kernel(const VecT* __restrict__ key, const VecT* __restrict__ value,
                                         VecT* __restrict__ k_cache, VecT* __restrict__ v_cache,
                                         const int64_t* __restrict__ slot_mapping, int64_t vecs_per_row,
                                         int64_t key_stride, int64_t value_stride) {
  const int64_t token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  if (slot < 0) return;  // padding
  const VecT* k = key + token * key_stride;
  const VecT* v = value + token * value_stride;
  VecT* kc = k_cache + slot * vecs_per_row;
  VecT* vc = v_cache + slot * vecs_per_row;
  for (int64_t i = threadIdx.x; i < vecs_per_row; i += blockDim.x) {
    kc[i] = k[i];
    vc[i] = v[i];
  }
}

}  // namespace fastllm::cuda

// Shared pieces of the fused elementwise kernels: VEC-wide loads/stores converted to/from
// float registers (VEC = VecTraits<T>::kSize: one 16-byte transaction; VEC = 1: scalar,
// for rows or pointers that are not 16-byte aligned), rounding to a storage dtype, and a
// sum over a thread block.
#pragma once
#include "fastllm/cuda/vec.cuh"

namespace fastllm::cuda {

template <typename T, int VEC>
__device__ __forceinline__ void load_floats(const T* __restrict__ src, float* dst) {
  if constexpr (VEC == 1) {
    dst[0] = to_float(*src);
  } else {
    static_assert(VEC == VecTraits<T>::kSize, "VEC is 1 or one 16-byte vector");
    load_vec<T>(src, dst);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_floats(T* __restrict__ dst, const float* src) {
  if constexpr (VEC == 1) {
    *dst = from_float<T>(src[0]);
  } else {
    static_assert(VEC == VecTraits<T>::kSize, "VEC is 1 or one 16-byte vector");
    store_vec<T>(dst, src);
  }
}

// x rounded to T and back: where torch materialises an intermediate tensor in the
// model dtype, the fused kernel rounds too, so results match the unfused ops.
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_float(from_float<T>(x));
}

__device__ __forceinline__ float warp_reduce_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Sum of x over the block, returned to every thread. blockDim.x: a multiple of 32, at
// most 1024. Once per kernel (its shared scratch is not reset for a second call).
__device__ __forceinline__ float block_reduce_sum(float x) {
  __shared__ float warp_sums[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  x = warp_reduce_sum(x);
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  x = lane < static_cast<int>(blockDim.x / 32) ? warp_sums[lane] : 0.f;
  return warp_reduce_sum(x);  // every warp sums the partials: no second barrier
}

}  // namespace fastllm::cuda

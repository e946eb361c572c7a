// 16-byte vector loads/stores of fp32/fp16/bf16 rows, converted to/from float registers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastllm::cuda {

template <typename T> struct VecTraits;
template <> struct VecTraits<float> { static constexpr int kSize = 4; };
template <> struct VecTraits<__half> { static constexpr int kSize = 8; };
template <> struct VecTraits<__nv_bfloat16> { static constexpr int kSize = 8; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// The VecTraits<T>::kSize elements of one 16-byte word as floats.
template <typename T>
__device__ __forceinline__ void unpack_vec(uint4 raw, float* dst) {
  constexpr int N = VecTraits<T>::kSize;
  union { uint4 raw; T elems[N]; } u;
  u.raw = raw;
#pragma unroll
  for (int i = 0; i < N; ++i) dst[i] = to_float(u.elems[i]);
}

// Loads VecTraits<T>::kSize consecutive elements (one 16-byte transaction) as floats.
template <typename T>
__device__ __forceinline__ void load_vec(const T* __restrict__ src, float* dst) {
  unpack_vec<T>(*reinterpret_cast<const uint4*>(src), dst);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* __restrict__ dst, const float* src) {
  constexpr int N = VecTraits<T>::kSize;
  union { uint4 raw; T elems[N]; } u;
#pragma unroll
  for (int i = 0; i < N; ++i) u.elems[i] = from_float<T>(src[i]);
  *reinterpret_cast<uint4*>(dst) = u.raw;
}

}  // namespace fastllm::cuda

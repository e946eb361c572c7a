#include <algorithm>

#include "fastllm/cuda/launchers.h"
#include "fastllm/cuda/nvtx.h"
#include "fastllm/dispatch.h"
#include "fastllm/cuda/rotary_embedding.cuh"

namespace fastllm::cuda {

static bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, int VEC>
static cudaError_t launch_vec(const RotaryParams& p, int64_t num_tokens, cudaStream_t stream) {
  const int64_t work = static_cast<int64_t>(p.num_heads + p.num_kv_heads) * (p.head_dim / 2 / VEC);
  const int threads = static_cast<int>(std::clamp<int64_t>((work + 31) / 32 * 32, 32, 512));
  rotary_embedding_kernel<T, VEC><<<static_cast<unsigned>(num_tokens), threads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
static cudaError_t launch(const RotaryParams& p, int64_t num_tokens, cudaStream_t stream) {
  constexpr int kVec = VecTraits<T>::kSize;
  constexpr int64_t kBytes = sizeof(T);
  // 16-byte chunks need every chunk start aligned: both halves of each head (D/2 % VEC),
  // every token's row (strides) and the four base pointers.
  const bool vec = (p.head_dim / 2) % kVec == 0 && (p.query_stride * kBytes) % 16 == 0 &&
                   (p.key_stride * kBytes) % 16 == 0 && aligned16(p.query) && aligned16(p.key) &&
                   aligned16(p.cos) && aligned16(p.sin);
  return vec ? launch_vec<T, kVec>(p, num_tokens, stream) : launch_vec<T, 1>(p, num_tokens, stream);
}

cudaError_t rotary_embedding(ScalarType dtype, void* query, void* key, const void* cos, const void* sin,
                             int64_t num_tokens, int num_heads, int num_kv_heads, int head_dim, int64_t query_stride,
                             int64_t key_stride, cudaStream_t stream) {
  FASTLLM_NVTX_RANGE("rotary_embedding");
  if (num_tokens == 0 || head_dim == 0 || num_heads + num_kv_heads == 0) return cudaSuccess;
  const RotaryParams p{query, key, cos, sin, query_stride, key_stride, num_heads, num_kv_heads, head_dim};
  return FASTLLM_DISPATCH_CUDA_FLOAT(dtype, [&] { return launch<scalar_t>(p, num_tokens, stream); });
}

}  // namespace fastllm::cuda

#include <algorithm>

#include "fastllm/cuda/launchers.h"
#include "fastllm/cuda/nvtx.h"
#include "fastllm/cuda/reshape_and_cache.cuh"

namespace fastllm::cuda {

template <typename VecT>
static cudaError_t launch(const void* key, const void* value, void* k_cache, void* v_cache,
                          const int64_t* slot_mapping, int64_t num_tokens, int64_t row_bytes,
                          cudaStream_t stream) {
  const int64_t vecs = row_bytes / static_cast<int64_t>(sizeof(VecT));
  const int threads = static_cast<int>(std::min<int64_t>(256, ((vecs + 31) / 32) * 32));
  reshape_and_cache_kernel<VecT><<<static_cast<unsigned>(num_tokens), threads, 0, stream>>>(
      static_cast<const VecT*>(key), static_cast<const VecT*>(value), static_cast<VecT*>(k_cache),
      static_cast<VecT*>(v_cache), slot_mapping, vecs);
  return cudaGetLastError();
}

static bool aligned(const void* p, uintptr_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; }

cudaError_t reshape_and_cache(const void* key, const void* value, void* k_cache, void* v_cache,
                              const int64_t* slot_mapping, int64_t num_tokens, int64_t row_bytes,
                              cudaStream_t stream) {
  FASTLLM_NVTX_RANGE("reshape_and_cache");
  if (num_tokens == 0) return cudaSuccess;
  const bool vec16 = row_bytes % 16 == 0 && aligned(key, 16) && aligned(value, 16) &&
                     aligned(k_cache, 16) && aligned(v_cache, 16);
  if (vec16) return launch<uint4>(key, value, k_cache, v_cache, slot_mapping, num_tokens, row_bytes, stream);
  if (row_bytes % 4 == 0) return launch<uint32_t>(key, value, k_cache, v_cache, slot_mapping, num_tokens, row_bytes, stream);
  return launch<uint16_t>(key, value, k_cache, v_cache, slot_mapping, num_tokens, row_bytes, stream);
}

}  // namespace fastllm::cuda

#include <algorithm>

#include "fastllm/cuda/launchers.h"
#include "fastllm/cuda/nvtx.h"
#include "fastllm/cuda/reshape_and_cache.cuh"

namespace fastllm::cuda {

// Sizes and strides in bytes here; VecT divides all of them (checked by the caller).
template <typename VecT>
static cudaError_t launch(const void* key, const void* value, void* k_cache, void* v_cache,
                          const int64_t* slot_mapping, int64_t num_tokens, int64_t row_bytes,
                          int64_t key_stride_bytes, int64_t value_stride_bytes, cudaStream_t stream) {
  constexpr int64_t kVec = sizeof(VecT);
  const int64_t vecs = row_bytes / kVec;
  const int threads = static_cast<int>(std::min<int64_t>(256, ((vecs + 31) / 32) * 32));
  reshape_and_cache_kernel<VecT><<<static_cast<unsigned>(num_tokens), threads, 0, stream>>>(
      static_cast<const VecT*>(key), static_cast<const VecT*>(value), static_cast<VecT*>(k_cache),
      static_cast<VecT*>(v_cache), slot_mapping, vecs, key_stride_bytes / kVec, value_stride_bytes / kVec);
  return cudaGetLastError();
}

static bool aligned(const void* p, uintptr_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; }

cudaError_t reshape_and_cache(const void* key, const void* value, void* k_cache, void* v_cache,
                              const int64_t* slot_mapping, int64_t num_tokens, int64_t row_elems,
                              int64_t key_stride, int64_t value_stride, int64_t elem_bytes, cudaStream_t stream) {
  FASTLLM_NVTX_RANGE("reshape_and_cache");
  if (num_tokens == 0 || row_elems == 0) return cudaSuccess;
  const int64_t row_bytes = row_elems * elem_bytes;
  const int64_t key_step = key_stride * elem_bytes, value_step = value_stride * elem_bytes;
  // The widest copy that every row start (source and cache) stays aligned to.
  const auto fits = [&](int64_t n) {
    return row_bytes % n == 0 && key_step % n == 0 && value_step % n == 0 && aligned(key, n) && aligned(value, n) &&
           aligned(k_cache, n) && aligned(v_cache, n);
  };
  if (fits(16)) {
    return launch<uint4>(key, value, k_cache, v_cache, slot_mapping, num_tokens, row_bytes, key_step, value_step, stream);
  }
  if (fits(4)) {
    return launch<uint32_t>(key, value, k_cache, v_cache, slot_mapping, num_tokens, row_bytes, key_step, value_step,
                            stream);
  }
  if (fits(2)) {
    return launch<uint16_t>(key, value, k_cache, v_cache, slot_mapping, num_tokens, row_bytes, key_step, value_step,
                            stream);
  }
  return launch<uint8_t>(key, value, k_cache, v_cache, slot_mapping, num_tokens, row_bytes, key_step, value_step,
                         stream);
}

}  // namespace fastllm::cuda

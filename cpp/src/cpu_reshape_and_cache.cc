#include <cstring>

#include "fastllm/cpu/kernels.h"
#include "fastllm/cpu/parallel.h"

namespace fastllm::cpu {

void reshape_and_cache(const void* key, const void* value, void* k_cache, void* v_cache,
                       const int64_t* slot_mapping, int64_t num_tokens, int64_t row_elems, int64_t key_stride,
                       int64_t value_stride, int64_t elem_bytes) {
  const char* k = static_cast<const char*>(key);
  const char* v = static_cast<const char*>(value);
  char* kc = static_cast<char*>(k_cache);
  char* vc = static_cast<char*>(v_cache);
  const int64_t row_bytes = row_elems * elem_bytes;
  const int64_t k_step = key_stride * elem_bytes, v_step = value_stride * elem_bytes;
  parallel_for(num_tokens, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(row_bytes, 1)),
               [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slot_mapping[t];
      if (slot < 0) continue;
      std::memcpy(kc + slot * row_bytes, k + t * k_step, row_bytes);
      std::memcpy(vc + slot * row_bytes, v + t * v_step, row_bytes);
    }
  });
}

}  // namespace fastllm::cpu

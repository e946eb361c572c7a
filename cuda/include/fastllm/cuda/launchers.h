// Host-side launchers of the CUDA kernels: raw pointers, sizes and a stream in, a
// cudaError_t out. Plain C++ (no CUDA syntax), so the core's dispatch can call them.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastllm::cuda {

// Number of usable GPUs; 0 when there is no driver or device (never throws).
int device_count();

// key/value [num_tokens, row_bytes] -> caches at slot_mapping (slot -1 skipped).
cudaError_t reshape_and_cache(const void* key, const void* value, void* k_cache, void* v_cache,
                              const int64_t* slot_mapping, int64_t num_tokens, int64_t row_bytes,
                              cudaStream_t stream);

}  // namespace fastllm::cuda

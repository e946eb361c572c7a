#include <cstdint>

#include "fastllm/cuda/launchers.h"
#include "fastllm/cuda/nvtx.h"
#include "fastllm/dispatch.h"
#include "fastllm/cuda/silu_and_mul.cuh"

namespace fastllm::cuda {

static bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, int VEC>
static cudaError_t launch_vec(void* out, const void* x, int64_t num_tokens, int64_t inter, cudaStream_t stream) {
  constexpr int kThreads = 128;  // small CTAs: a decode row (T = 1) still spreads over several SMs
  const int64_t chunks_per_row = inter / VEC;
  const int64_t blocks_per_row = (chunks_per_row + kThreads - 1) / kThreads;
  if (num_tokens > INT32_MAX || blocks_per_row > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(num_tokens), static_cast<unsigned>(blocks_per_row));
  silu_and_mul_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(static_cast<T*>(out), static_cast<const T*>(x), inter);
  return cudaGetLastError();
}

template <typename T>
static cudaError_t launch(void* out, const void* x, int64_t num_tokens, int64_t inter, cudaStream_t stream) {
  constexpr int kVec = VecTraits<T>::kSize;
  if (inter % kVec == 0 && aligned16(out) && aligned16(x)) return launch_vec<T, kVec>(out, x, num_tokens, inter, stream);
  return launch_vec<T, 1>(out, x, num_tokens, inter, stream);
}

cudaError_t silu_and_mul(ScalarType dtype, void* out, const void* x, int64_t num_tokens, int64_t inter,
                         cudaStream_t stream) {
  FASTLLM_NVTX_RANGE("silu_and_mul");
  if (num_tokens == 0 || inter == 0) return cudaSuccess;
  return FASTLLM_DISPATCH_CUDA_FLOAT(dtype, [&] { return launch<scalar_t>(out, x, num_tokens, inter, stream); });
}

}  // namespace fastllm::cuda

#include <algorithm>

#include "fastllm/cuda/launchers.h"
#include "fastllm/cuda/nvtx.h"
#include "fastllm/dispatch.h"
#include "fastllm/cuda/rms_norm.cuh"

namespace fastllm::cuda {

static bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// One thread per VEC chunk of the row where possible (a 4096-wide bf16 row: 512 threads,
// one 16-byte load each), a multiple of a warp, at most 1024.
static int row_threads(int64_t num_vecs) {
  return static_cast<int>(std::clamp<int64_t>((num_vecs + 31) / 32 * 32, 32, 1024));
}

template <typename T>
static cudaError_t launch_rms_norm(void* out, const void* x, const void* weight, int64_t num_tokens, int64_t hidden,
                                   float eps, cudaStream_t stream) {
  constexpr int kVec = VecTraits<T>::kSize;
  T* o = static_cast<T*>(out);
  const T* in = static_cast<const T*>(x);
  const T* w = static_cast<const T*>(weight);
  const unsigned blocks = static_cast<unsigned>(num_tokens);
  if (hidden % kVec == 0 && aligned16(out) && aligned16(x) && aligned16(weight)) {
    rms_norm_kernel<T, kVec><<<blocks, row_threads(hidden / kVec), 0, stream>>>(o, in, w, hidden, eps);
  } else {
    rms_norm_kernel<T, 1><<<blocks, row_threads(hidden), 0, stream>>>(o, in, w, hidden, eps);
  }
  return cudaGetLastError();
}

template <typename T>
static cudaError_t launch_fused_add(void* x, void* residual, const void* weight, int64_t num_tokens, int64_t hidden,
                                   float eps, cudaStream_t stream) {
  constexpr int kVec = VecTraits<T>::kSize;
  T* xs = static_cast<T*>(x);
  T* res = static_cast<T*>(residual);
  const T* w = static_cast<const T*>(weight);
  const unsigned blocks = static_cast<unsigned>(num_tokens);
  if (hidden % kVec == 0 && aligned16(x) && aligned16(residual) && aligned16(weight)) {
    fused_add_rms_norm_kernel<T, kVec><<<blocks, row_threads(hidden / kVec), 0, stream>>>(xs, res, w, hidden, eps);
  } else {
    fused_add_rms_norm_kernel<T, 1><<<blocks, row_threads(hidden), 0, stream>>>(xs, res, w, hidden, eps);
  }
  return cudaGetLastError();
}

cudaError_t rms_norm(ScalarType dtype, void* out, const void* x, const void* weight, int64_t num_tokens,
                     int64_t hidden, float eps, cudaStream_t stream) {
  FASTLLM_NVTX_RANGE("rms_norm");
  if (num_tokens == 0 || hidden == 0) return cudaSuccess;
  return FASTLLM_DISPATCH_CUDA_FLOAT(
      dtype, [&] { return launch_rms_norm<scalar_t>(out, x, weight, num_tokens, hidden, eps, stream); });
}

cudaError_t fused_add_rms_norm(ScalarType dtype, void* x, void* residual, const void* weight, int64_t num_tokens,
                               int64_t hidden, float eps, cudaStream_t stream) {
  FASTLLM_NVTX_RANGE("fused_add_rms_norm");
  if (num_tokens == 0 || hidden == 0) return cudaSuccess;
  return FASTLLM_DISPATCH_CUDA_FLOAT(
      dtype, [&] { return launch_fused_add<scalar_t>(x, residual, weight, num_tokens, hidden, eps, stream); });
}

}  // namespace fastllm::cuda

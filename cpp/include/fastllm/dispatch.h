// The dispatch macros (DESIGN §2: in one header): a runtime dtype or head dim to a
// compile-time type or constant, and the tail every CUDA op of ops.cc ends with.
//
//   FASTLLM_DISPATCH_CPU_FLOAT(dtype, [&] { kernel<scalar_t>(...); });
//   return FASTLLM_DISPATCH_CUDA_FLOAT(dtype, [&] {
//     return FASTLLM_DISPATCH_HEAD_DIM(head_dim, cudaErrorInvalidValue, [&] { return launch<scalar_t, HEAD_DIM>(p); });
//   });
//   FASTLLM_CUDA_CALL("op", tensor.device_id, cuda::op(...));   // ops.cc
#pragma once
#include <string>

#include "fastllm/dtype.h"
#include "fastllm/errors.h"
#include "fastllm/paged_attention.h"

// Calls the lambda __VA_ARGS__ with `using scalar_t` = the C++ type of a float DType
// (HALF_T, BFLOAT16_T: the 16-bit types of the calling code's device); runs the
// statement `otherwise` for any other dtype. Evaluates to what the lambda returns.
#define FASTLLM_DISPATCH_FLOAT_TYPES(dtype, HALF_T, BFLOAT16_T, otherwise, ...) \
  [&] {                                                                        \
    switch (dtype) {                                                           \
      case ::fastllm::DType::kF32: {                                           \
        using scalar_t = float;                                                \
        return __VA_ARGS__();                                                  \
      }                                                                        \
      case ::fastllm::DType::kF16: {                                           \
        using scalar_t = HALF_T;                                               \
        return __VA_ARGS__();                                                  \
      }                                                                        \
      case ::fastllm::DType::kBF16: {                                          \
        using scalar_t = BFLOAT16_T;                                           \
        return __VA_ARGS__();                                                  \
      }                                                                        \
      default:                                                                 \
        otherwise;                                                             \
    }                                                                          \
  }()

// CPU kernels (fastllm/cpu/float16.h types); ArgTypeError for a non-float dtype.
#define FASTLLM_DISPATCH_CPU_FLOAT(dtype, ...)                                                  \
  FASTLLM_DISPATCH_FLOAT_TYPES(dtype, ::fastllm::cpu::Half, ::fastllm::cpu::BFloat16,             \
                               throw ::fastllm::ArgTypeError(std::string("unsupported dtype ") + \
                                                             ::fastllm::dtype_name(dtype)),      \
                               __VA_ARGS__)

// CUDA launchers (cuda_fp16.h / cuda_bf16.h types); cudaErrorInvalidValue otherwise.
#define FASTLLM_DISPATCH_CUDA_FLOAT(dtype, ...) \
  FASTLLM_DISPATCH_FLOAT_TYPES(dtype, __half, __nv_bfloat16, return cudaErrorInvalidValue, __VA_ARGS__)

#define FASTLLM_HEAD_DIM_CASE_(D, ...) \
  case D: {                            \
    constexpr int HEAD_DIM = D;        \
    return __VA_ARGS__();              \
  }

// Calls the lambda __VA_ARGS__ with `constexpr int HEAD_DIM` = head_dim, one of the
// table in paged_attention.h; evaluates to `otherwise` (same type) for another.
#define FASTLLM_DISPATCH_HEAD_DIM(head_dim, otherwise, ...)                           \
  [&] {                                                                               \
    switch (head_dim) {                                                               \
      FASTLLM_FOR_EACH_PAGED_ATTENTION_HEAD_DIM(FASTLLM_HEAD_DIM_CASE_, __VA_ARGS__)   \
      default:                                                                        \
        return otherwise;                                                             \
    }                                                                                 \
  }()

// FASTLLM_CUDA_CALL(op, device_id, launch): runs the launcher call `launch` (a
// cudaError_t expression) with device_id current -- kernels launch on the current
// device, which need not hold the tensors -- and raises std::runtime_error naming `op`
// when the switch or the launch fails. In a build without CUDA, `launch` is not
// compiled and the call raises ValueError ("this build has no CUDA kernels").
#ifdef FASTLLM_WITH_CUDA
#include <cuda_runtime_api.h>

#include <stdexcept>

#include "fastllm/cuda/launchers.h"

namespace fastllm::detail {
inline void check_cuda(cudaError_t err, const char* op) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(op) + ": CUDA error: " + cudaGetErrorString(err));
}
}  // namespace fastllm::detail

#define FASTLLM_CUDA_CALL(op, device_id, ...)                                    \
  do {                                                                           \
    const ::fastllm::cuda::DeviceGuard fastllm_device_guard_(device_id);         \
    ::fastllm::detail::check_cuda(fastllm_device_guard_.status(), op);           \
    ::fastllm::detail::check_cuda(__VA_ARGS__, op);                              \
  } while (0)
#else
namespace fastllm::detail {
[[noreturn]] inline void no_cuda_kernel(const char* op) {
  throw ArgValueError(std::string(op) + ": CUDA tensors given but this build has no CUDA kernels");
}
}  // namespace fastllm::detail

#define FASTLLM_CUDA_CALL(op, device_id, ...) ::fastllm::detail::no_cuda_kernel(op)
#endif

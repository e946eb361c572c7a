#include <cstdint>

#include "fastllm/cuda/nvtx.h"
#include "fastllm/cuda/quant_launchers.h"
#include "fastllm/cuda/quant_matmul.cuh"

namespace fastllm::cuda {

template <int TYPE>
static cudaError_t launch(const float* x, int64_t ldx, const uint8_t* weight, int64_t row_bytes, const float* bias,
                          float* y, int64_t ldy, int64_t T, int64_t K, int64_t N, cudaStream_t stream) {
  const int64_t row_ctas = (N + kQuantWarps - 1) / kQuantWarps;
  const int64_t token_ctas = (T + kQuantTokens - 1) / kQuantTokens;
  if (row_ctas > INT32_MAX || token_ctas > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(row_ctas), static_cast<unsigned>(token_ctas));
  quant_matmul_kernel<TYPE><<<grid, 32 * kQuantWarps, 0, stream>>>(x, ldx, weight, row_bytes, bias, y, ldy, T, K, N);
  return cudaGetLastError();
}

cudaError_t quant_matmul(const float* x, int64_t ldx, const uint8_t* weight, const float* bias, float* y,
                         int64_t ldy, int64_t T, int64_t K, int64_t N, int ggml_type, cudaStream_t stream) {
  FASTLLM_NVTX_RANGE("quant_matmul");
  if (T == 0 || N == 0) return cudaSuccess;
  int block_elems = 0, block_bytes = 0;
  switch (ggml_type) {
    case kGgmlF32: block_elems = 1; block_bytes = 4; break;
    case kGgmlF16: case kGgmlBF16: block_elems = 1; block_bytes = 2; break;
    case kGgmlQ4_0: block_elems = 32; block_bytes = 18; break;
    case kGgmlQ4_1: block_elems = 32; block_bytes = 20; break;
    case kGgmlQ5_0: block_elems = 32; block_bytes = 22; break;
    case kGgmlQ5_1: block_elems = 32; block_bytes = 24; break;
    case kGgmlQ8_0: block_elems = 32; block_bytes = 34; break;
    case kGgmlQ4_K: block_elems = 256; block_bytes = 144; break;
    case kGgmlQ5_K: block_elems = 256; block_bytes = 176; break;
    case kGgmlQ6_K: block_elems = 256; block_bytes = 210; break;
    default: return cudaErrorInvalidValue;
  }
  const int64_t row_bytes = K / block_elems * block_bytes;
#define FASTLLM_QUANT_CASE(TYPE) \
  case TYPE: return launch<TYPE>(x, ldx, weight, row_bytes, bias, y, ldy, T, K, N, stream);
  switch (ggml_type) {
    FASTLLM_QUANT_CASE(kGgmlF32)
    FASTLLM_QUANT_CASE(kGgmlF16)
    FASTLLM_QUANT_CASE(kGgmlBF16)
    FASTLLM_QUANT_CASE(kGgmlQ4_0)
    FASTLLM_QUANT_CASE(kGgmlQ4_1)
    FASTLLM_QUANT_CASE(kGgmlQ5_0)
    FASTLLM_QUANT_CASE(kGgmlQ5_1)
    FASTLLM_QUANT_CASE(kGgmlQ8_0)
    FASTLLM_QUANT_CASE(kGgmlQ4_K)
    FASTLLM_QUANT_CASE(kGgmlQ5_K)
    FASTLLM_QUANT_CASE(kGgmlQ6_K)
  }
#undef FASTLLM_QUANT_CASE
  return cudaErrorInvalidValue;
}

}  // namespace fastllm::cuda

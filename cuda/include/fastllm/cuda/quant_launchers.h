// Host-side launcher of the quantized linear kernel (quant_matmul.cuh): raw pointers,
// sizes, a ggml type id and a stream in, a cudaError_t out. Plain C++.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastllm::cuda {

// y [T, N] (row stride ldy) = x [T, K] (row stride ldx) @ W^T + bias; W [N, K] as rows of
// ggml blocks of `ggml_type` (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K); bias
// float32 [N] or null. cudaErrorInvalidValue for another type.
cudaError_t quant_matmul(const float* x, int64_t ldx, const uint8_t* weight, const float* bias, float* y,
                         int64_t ldy, int64_t T, int64_t K, int64_t N, int ggml_type, cudaStream_t stream);

}  // namespace fastllm::cuda

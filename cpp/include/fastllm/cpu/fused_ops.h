// The decoder layer's elementwise ops on the CPU, fp32 (the dtype the CPU model runs in;
// fp16/bf16 CPU tensors keep fastllm.ops' torch reference). Same math as the CUDA kernels
// and reference.py: norms in fp32 (one rsqrt per row), silu(g) = g / (1 + exp(-g)),
// rotate-half RoPE. One call does a whole step's rows; rows spread over the shared pool
// only when there are enough of them (a decode step's single row runs inline).
#pragma once
#include <cstdint>

namespace fastllm::cpu {

// out [T, H] = weight [H] * x * rsqrt(mean(x^2) + eps); out may be x (in place).
void rms_norm_f32(float* out, const float* x, const float* weight, int64_t T, int64_t H, float eps);

// residual [T, H] += x; then x = rms_norm(residual).
void fused_add_rms_norm_f32(float* x, float* residual, const float* weight, int64_t T, int64_t H, float eps);

// x [T, 2I] = [gate | up] -> out [T, I] = silu(gate) * up.
void silu_and_mul_f32(float* out, const float* x, int64_t T, int64_t I);

// In place on query [T, Hq, D] and key [T, Hk, D] (token strides q_stride / k_stride
// elements, each token's [heads, D] dense); cos, sin [T, D/2].
void rotary_embedding_f32(float* query, float* key, const float* cos, const float* sin, int64_t T, int64_t Hq,
                          int64_t Hk, int64_t D, int64_t q_stride, int64_t k_stride);

}  // namespace fastllm::cpu

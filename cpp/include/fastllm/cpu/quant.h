// Linear layers on weights kept in GGUF's block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K,
// Q5_K, Q6_K, and plain F32/F16/BF16 rows),
// on the CPU: y[T, N] = x[T, K] @ W[N, K]^T (+ bias), fp32 activations and accumulation.
// Each weight row is K / block_elems blocks of block_bytes, laid out exactly as ggml
// stores them (so a GGUF tensor's bytes are the weight, untouched). Blocks are decoded to
// fp32 in small L1-resident tiles and consumed at once by an FMA micro-kernel; an AVX2+FMA
// build of the kernels is picked at run time when the CPU has it, else portable C++.
#pragma once
#include <cstdint>

namespace fastllm::cpu {

// ggml's type ids (gguf.GGMLQuantizationType), the ones these kernels handle.
enum class QuantType : int {
  kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14, kBF16 = 30,
};

struct QuantFormat {
  int block_elems;  // weights per block (1 for the float types)
  int block_bytes;  // bytes per block
};

// False when `ggml_type` is not one of QuantType.
bool quant_format(int ggml_type, QuantFormat* format);

// Which kernel build runs: "avx2" or "generic".
const char* quant_isa();
// Force the portable kernels (tests compare both builds); false = pick by the CPU again.
// Covers every CPU kernel with an AVX2 build: quantized matmul, fp32 paged attention,
// silu_and_mul.
void quant_force_generic(bool generic);
// Whether quant_force_generic(true) is in effect.
bool cpu_generic_forced();
// Whether the AVX2 kernels of Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q6_K round each row of x to
// int8 blocks (llama.cpp's arithmetic, cpu_quant_q8_*_avx2.inc; the default) or keep it fp32.
void quant_set_int8_activations(bool on);
bool quant_int8_activations();

// y [T, N] (row stride ldy) = x [T, K] (row stride ldx) @ W^T + bias; W [N, K] in `type`'s
// blocks (K a multiple of block_elems), bias [N] or nullptr. Runs on the shared pool.
void quant_matmul(const float* x, int64_t ldx, const uint8_t* weight, const float* bias, float* y, int64_t ldy,
                  int64_t T, int64_t K, int64_t N, QuantType type);

// out [rows, K] = the fp32 values of `rows` weight rows (reference and fallback use).
void quant_dequantize(const uint8_t* weight, float* out, int64_t rows, int64_t K, QuantType type);

}  // namespace fastllm::cpu

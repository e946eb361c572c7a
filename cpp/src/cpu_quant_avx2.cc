// AVX2 + FMA (+ F16C, which every AVX2 CPU has) build of the quantized matmul kernels (cpu_quant_impl.inc). Only this file's
// own functions get the target (the pragma comes after every standard header), and they
// run only when __builtin_cpu_supports says the CPU has AVX2 and FMA, so the module still
// imports and runs on a CPU without them. Non-x86 or non-GCC/Clang builds: not supported.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>

#include "fastllm/cpu/float16.h"
#include "fastllm/cpu/quant.h"
#include "fastllm/cpu/thread_pool.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define FASTLLM_HAVE_AVX2_BUILD 1
#include <immintrin.h>
#endif

namespace fastllm::cpu::quant_avx2 {

#ifdef FASTLLM_HAVE_AVX2_BUILD
bool supported() {
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
}

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#define FASTLLM_QUANT_AVX2 1
namespace impl {
#include "cpu_quant_impl.inc"
}  // namespace impl
void matmul(const float* x, int64_t ldx, const uint8_t* weight, const float* bias, float* y, int64_t ldy,
            int64_t T, int64_t K, int64_t N, QuantType type) {
  impl::matmul(x, ldx, weight, bias, y, ldy, T, K, N, type);
}
void dequantize(const uint8_t* weight, float* out, int64_t rows, int64_t K, QuantType type) {
  impl::dequantize(weight, out, rows, K, type);
}
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // no x86 AVX2 build: the dispatcher always takes the portable kernels
bool supported() { return false; }
void matmul(const float*, int64_t, const uint8_t*, const float*, float*, int64_t, int64_t, int64_t, int64_t,
            QuantType) {}
void dequantize(const uint8_t*, float*, int64_t, int64_t, QuantType) {}
#endif

}  // namespace fastllm::cpu::quant_avx2

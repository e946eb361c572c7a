// AVX2 + FMA (+ F16C, which every AVX2 CPU has) build of the quantized matmul kernels (cpu_quant_impl.inc). Only this file's
// own functions get the target (the pragma comes after every standard header), and they
// run only when __builtin_cpu_supports says the CPU has AVX2 and FMA, so the module still
// imports and runs on a CPU without them. Non-x86 or non-GCC/Clang builds: not supported.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>

#include "fastllm/cpu/float16.h"
#include "fastllm/cpu/quant.h"
#include "fastllm/cpu/avx2_target.h"
#include "fastllm/cpu/thread_pool.h"

namespace fastllm::cpu::quant_avx2 {

#ifdef FASTLLM_CPU_AVX2_BUILD
bool supported() { return cpu_has_avx2(); }

FASTLLM_AVX2_TARGET_BEGIN
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
FASTLLM_AVX2_TARGET_END

#else  // no x86 AVX2 build: the dispatcher always takes the portable kernels
bool supported() { return false; }
void matmul(const float*, int64_t, const uint8_t*, const float*, float*, int64_t, int64_t, int64_t, int64_t,
            QuantType) {}
void dequantize(const uint8_t*, float*, int64_t, int64_t, QuantType) {}
#endif

}  // namespace fastllm::cpu::quant_avx2

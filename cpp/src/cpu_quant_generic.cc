// Portable build of the quantized matmul kernels (see cpu_quant_impl.inc), plus the
// format table and the run-time choice between this build and the AVX2 one.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#include "fastllm/cpu/float16.h"
#include "fastllm/cpu/quant.h"
#include "fastllm/cpu/thread_pool.h"

namespace fastllm::cpu {

namespace quant_avx2 {
bool supported();
void matmul(const float* x, int64_t ldx, const uint8_t* weight, const float* bias, float* y, int64_t ldy,
            int64_t T, int64_t K, int64_t N, QuantType type);
void dequantize(const uint8_t* weight, float* out, int64_t rows, int64_t K, QuantType type);
}  // namespace quant_avx2

namespace quant_generic {
#include "cpu_quant_impl.inc"
}  // namespace quant_generic

bool quant_format(int ggml_type, QuantFormat* format) {
  switch (static_cast<QuantType>(ggml_type)) {
    case QuantType::kF32: *format = {1, 4}; return true;
    case QuantType::kF16: *format = {1, 2}; return true;
    case QuantType::kBF16: *format = {1, 2}; return true;
    case QuantType::kQ4_0: *format = {32, 18}; return true;
    case QuantType::kQ4_1: *format = {32, 20}; return true;
    case QuantType::kQ5_0: *format = {32, 22}; return true;
    case QuantType::kQ5_1: *format = {32, 24}; return true;
    case QuantType::kQ8_0: *format = {32, 34}; return true;
    case QuantType::kQ4_K: *format = {256, 144}; return true;
    case QuantType::kQ5_K: *format = {256, 176}; return true;
    case QuantType::kQ6_K: *format = {256, 210}; return true;
  }
  return false;
}

namespace {
std::atomic<bool> force_generic{false};
std::atomic<bool> int8_activations{true};
bool use_avx2() { return !force_generic.load() && quant_avx2::supported(); }
}  // namespace

const char* quant_isa() { return use_avx2() ? "avx2" : "generic"; }
void quant_force_generic(bool generic) { force_generic.store(generic); }
bool cpu_generic_forced() { return force_generic.load(); }
void quant_set_int8_activations(bool on) { int8_activations.store(on); }
bool quant_int8_activations() { return int8_activations.load(); }

void quant_matmul(const float* x, int64_t ldx, const uint8_t* weight, const float* bias, float* y, int64_t ldy,
                  int64_t T, int64_t K, int64_t N, QuantType type) {
  if (use_avx2()) {
    quant_avx2::matmul(x, ldx, weight, bias, y, ldy, T, K, N, type);
  } else {
    quant_generic::matmul(x, ldx, weight, bias, y, ldy, T, K, N, type);
  }
}

void quant_dequantize(const uint8_t* weight, float* out, int64_t rows, int64_t K, QuantType type) {
  if (use_avx2()) {
    quant_avx2::dequantize(weight, out, rows, K, type);
  } else {
    quant_generic::dequantize(weight, out, rows, K, type);
  }
}

}  // namespace fastllm::cpu

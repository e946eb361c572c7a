// AVX2 + FMA rows of the fused elementwise ops (cpu_fused_ops.cc picks them at run time
// when the CPU has AVX2/FMA): silu_and_mul with a vectorized exp, 8 lanes at a time.
#include <cmath>
#include <cstdint>

#include "fastllm/cpu/avx2_target.h"

namespace fastllm::cpu {

#ifdef FASTLLM_CPU_AVX2_BUILD
bool fused_ops_avx2_supported() { return cpu_has_avx2(); }

FASTLLM_AVX2_TARGET_BEGIN
#include "fastllm/cpu/avx2_exp.h"

// out[0:I] = silu(gate[0:I]) * up[0:I].
void silu_and_mul_row_avx2(float* out, const float* gate, const float* up, int64_t I) {
  int64_t i = 0;
  for (; i + 8 <= I; i += 8) _mm256_storeu_ps(out + i, silu_mul(_mm256_loadu_ps(gate + i), _mm256_loadu_ps(up + i)));
  for (; i < I; ++i) out[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

FASTLLM_AVX2_TARGET_END

#else
bool fused_ops_avx2_supported() { return false; }
void silu_and_mul_row_avx2(float*, const float*, const float*, int64_t) {}
#endif

}  // namespace fastllm::cpu

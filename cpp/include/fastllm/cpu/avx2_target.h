// The CPU kernels' AVX2 builds, in one place: whether this compiler can build them
// (FASTLLM_CPU_AVX2_BUILD), whether this CPU runs them, and the region that gives a file's
// own functions the target. Open the region after every standard header (their inline
// templates must not get AVX2 code the portable build could share) and close it before
// the file's portable fallbacks.
#pragma once

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define FASTLLM_CPU_AVX2_BUILD 1
#include <immintrin.h>

#if defined(__clang__)
#define FASTLLM_AVX2_TARGET_BEGIN \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,f16c\"))), apply_to = function)")
#define FASTLLM_AVX2_TARGET_END _Pragma("clang attribute pop")
#else
#define FASTLLM_AVX2_TARGET_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define FASTLLM_AVX2_TARGET_END _Pragma("GCC pop_options")
#endif

namespace fastllm::cpu {
// AVX2 + FMA + F16C (every AVX2 CPU has F16C): what the AVX2 builds are compiled for.
inline bool cpu_has_avx2() {
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
}
}  // namespace fastllm::cpu
#endif

// AVX2 + FMA build of one fp32 paged-attention work item (a query token's GQA group over
// its keys), picked at run time by cpu_paged_attention.cc when the CPU has AVX2/FMA. Same
// algorithm as the portable loop there (tiles of kTile keys, online softmax per head),
// with the q.k dots and the p*v updates 8 lanes wide and the tile's exp vectorized.
// Only this file's functions get the target; it uses no std:: templates (their shared
// out-of-line copies could otherwise carry AVX2 code into the portable build).
#include <cmath>
#include <cstdint>

#include "fastllm/paged_attention.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTLLM_ATTN_AVX2 1
#endif

namespace fastllm::cpu {

#ifdef FASTLLM_ATTN_AVX2
bool attention_avx2_supported() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#include "fastllm/cpu/avx2_exp.h"

namespace {
constexpr int64_t kTile = 32;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float dot(const float* a, const float* b, int64_t D) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), acc1);
  }
  for (; d + 8 <= D; d += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
  float s = hsum(_mm256_add_ps(acc0, acc1));
  for (; d < D; ++d) s += a[d] * b[d];
  return s;
}

// acc[0:D] = acc * correction + sum_j p[j] * v_rows[j][0:D].
inline void scale_and_accumulate(float* acc, float correction, const float* p, const float* const* v_rows,
                                 int64_t n, int64_t D) {
  int64_t d = 0;
  const __m256 c = _mm256_set1_ps(correction);
  for (; d + 32 <= D; d += 32) {  // four vectors of acc stay in registers over the tile
    __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(acc + d), c), a1 = _mm256_mul_ps(_mm256_loadu_ps(acc + d + 8), c);
    __m256 a2 = _mm256_mul_ps(_mm256_loadu_ps(acc + d + 16), c), a3 = _mm256_mul_ps(_mm256_loadu_ps(acc + d + 24), c);
    for (int64_t j = 0; j < n; ++j) {
      const __m256 pj = _mm256_set1_ps(p[j]);
      const float* vj = v_rows[j] + d;
      a0 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj), a0);
      a1 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8), a1);
      a2 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 16), a2);
      a3 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 24), a3);
    }
    _mm256_storeu_ps(acc + d, a0);
    _mm256_storeu_ps(acc + d + 8, a1);
    _mm256_storeu_ps(acc + d + 16, a2);
    _mm256_storeu_ps(acc + d + 24, a3);
  }
  for (; d < D; ++d) {
    float a = acc[d] * correction;
    for (int64_t j = 0; j < n; ++j) a += p[j] * v_rows[j][d];
    acc[d] = a;
  }
}
}  // namespace

// One work item: the `group` query heads q [group, D] (already scaled) of one token over
// its first num_keys cached keys of KV head kvh. scratch: group * (D + 2) floats.
void attend_item_f32_avx2(float* out, const float* q, const float* k_cache, const float* v_cache,
                          const int32_t* table, int64_t num_keys, const PagedAttentionShape& s, int64_t kvh,
                          float* scratch) {
  const int64_t D = s.head_dim, group = s.num_heads / s.num_kv_heads, kv_row = s.num_kv_heads * D;
  float* acc = scratch;               // [group, D]
  float* m = scratch + group * D;     // [group] running max
  float* l = m + group;               // [group] running sum
  for (int64_t i = 0; i < group * D; ++i) acc[i] = 0.f;
  for (int64_t g = 0; g < group; ++g) { m[g] = -INFINITY; l[g] = 0.f; }
  const float* k_rows[kTile];
  const float* v_rows[kTile];
  alignas(32) float p[kTile];
  for (int64_t j0 = 0; j0 < num_keys; j0 += kTile) {
    const int64_t n = num_keys - j0 < kTile ? num_keys - j0 : kTile;
    for (int64_t jj = 0; jj < n; ++jj) {
      const int64_t j = j0 + jj;
      const int64_t slot = static_cast<int64_t>(table[j / s.block_size]) * s.block_size + j % s.block_size;
      k_rows[jj] = k_cache + slot * kv_row + kvh * D;
      v_rows[jj] = v_cache + slot * kv_row + kvh * D;
    }
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q + g * D;
      float tile_max = -INFINITY;
      for (int64_t jj = 0; jj < n; ++jj) {
        p[jj] = dot(qg, k_rows[jj], D);
        tile_max = p[jj] > tile_max ? p[jj] : tile_max;
      }
      for (int64_t jj = n; jj < kTile; ++jj) p[jj] = -INFINITY;  // padding lanes: exp -> 0
      const float new_max = m[g] > tile_max ? m[g] : tile_max;
      const float correction = m[g] == -INFINITY ? 0.f : std::exp(m[g] - new_max);
      const __m256 mx = _mm256_set1_ps(new_max);
      __m256 sum = _mm256_setzero_ps();
      for (int64_t jj = 0; jj < kTile; jj += 8) {
        const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_load_ps(p + jj), mx));
        _mm256_store_ps(p + jj, e);
        sum = _mm256_add_ps(sum, e);
      }
      l[g] = l[g] * correction + hsum(sum);
      scale_and_accumulate(acc + g * D, correction, p, v_rows, n, D);
      m[g] = new_max;
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = acc[g * D + d] * inv;
  }
}

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else
bool attention_avx2_supported() { return false; }
void attend_item_f32_avx2(float*, const float*, const float*, const float*, const int32_t*, int64_t,
                          const PagedAttentionShape&, int64_t, float*) {}
#endif

}  // namespace fastllm::cpu

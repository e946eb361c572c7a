// AVX2 + FMA build of one fp32 paged-attention work item (a query token's GQA group over
// its keys), picked at run time by cpu_paged_attention.cc when the CPU has AVX2/FMA. Same
// algorithm as the portable loop there (tiles of kTile keys, online softmax per head),
// with the q.k dots and the p*v updates 8 lanes wide and the tile's exp vectorized.
// Only this file's functions get the target; it uses no std:: templates (their shared
// out-of-line copies could otherwise carry AVX2 code into the portable build).
#include <cmath>
#include <cstdint>

#include "fastllm/cpu/avx2_target.h"
#include "fastllm/paged_attention.h"

namespace fastllm::cpu {

#ifdef FASTLLM_CPU_AVX2_BUILD
bool attention_avx2_supported() { return cpu_has_avx2(); }

FASTLLM_AVX2_TARGET_BEGIN
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

// -- prefill: several query tokens per work item --------------------------------------------
// A block's R = nq * group query rows (row r: token r / group, head r % group) meet each
// tile of kKeyTile keys together: the tile's K is transposed once into kT [D, kKeyTile],
// so S = Q K^T is a small register-blocked GEMM (keys across the lanes, no horizontal
// sums), and each V row is read from L1 by every row block. That is what lifts prefill
// from the decode item's GEMV-like q.k dots to GEMM-like arithmetic per K/V byte.
namespace {
constexpr int64_t kKeyTile = 16;  // keys per tile (32 measured no faster)
constexpr int kKeyVecs = kKeyTile / 8;
constexpr int kQkRows = 12 / kKeyVecs;  // rows per QK register block: 12 accumulators
constexpr int kPvRows = 6;            // rows per PV register block: 6 x 2 accumulators

// r0..r7 (8 keys' dims d..d+7) -> r0..r7 (dim d+i of the 8 keys).
inline void transpose8(__m256& r0, __m256& r1, __m256& r2, __m256& r3, __m256& r4, __m256& r5, __m256& r6,
                       __m256& r7) {
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r0 = _mm256_permute2f128_ps(u0, u4, 0x20);
  r1 = _mm256_permute2f128_ps(u1, u5, 0x20);
  r2 = _mm256_permute2f128_ps(u2, u6, 0x20);
  r3 = _mm256_permute2f128_ps(u3, u7, 0x20);
  r4 = _mm256_permute2f128_ps(u0, u4, 0x31);
  r5 = _mm256_permute2f128_ps(u1, u5, 0x31);
  r6 = _mm256_permute2f128_ps(u2, u6, 0x31);
  r7 = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// kT [D, kKeyTile] <- the tile's key rows (kKeyTile pointers; absent keys point at zeros).
inline void transpose_key_tile(float* kT, const float* const* k_rows, int64_t D) {
  for (int64_t half = 0; half < kKeyTile; half += 8) {
    const float* const* k = k_rows + half;
    for (int64_t d = 0; d < D; d += 8) {
      __m256 r0 = _mm256_loadu_ps(k[0] + d), r1 = _mm256_loadu_ps(k[1] + d), r2 = _mm256_loadu_ps(k[2] + d);
      __m256 r3 = _mm256_loadu_ps(k[3] + d), r4 = _mm256_loadu_ps(k[4] + d), r5 = _mm256_loadu_ps(k[5] + d);
      __m256 r6 = _mm256_loadu_ps(k[6] + d), r7 = _mm256_loadu_ps(k[7] + d);
      transpose8(r0, r1, r2, r3, r4, r5, r6, r7);
      float* dst = kT + d * kKeyTile + half;
      _mm256_store_ps(dst, r0);
      _mm256_store_ps(dst + kKeyTile, r1);
      _mm256_store_ps(dst + 2 * kKeyTile, r2);
      _mm256_store_ps(dst + 3 * kKeyTile, r3);
      _mm256_store_ps(dst + 4 * kKeyTile, r4);
      _mm256_store_ps(dst + 5 * kKeyTile, r5);
      _mm256_store_ps(dst + 6 * kKeyTile, r6);
      _mm256_store_ps(dst + 7 * kKeyTile, r7);
    }
  }
}

// S [RB, kKeyTile] = q [RB, D] (row stride D) x kT.
template <int RB>
inline void qk_block(float* S, const float* q, const float* kT, int64_t D) {
  __m256 a[RB][kKeyVecs];
  for (int r = 0; r < RB; ++r) {
    for (int v = 0; v < kKeyVecs; ++v) a[r][v] = _mm256_setzero_ps();
  }
  for (int64_t d = 0; d < D; ++d) {
    __m256 k[kKeyVecs];
    for (int v = 0; v < kKeyVecs; ++v) k[v] = _mm256_load_ps(kT + d * kKeyTile + 8 * v);
    for (int r = 0; r < RB; ++r) {
      const __m256 b = _mm256_broadcast_ss(q + r * D + d);
      for (int v = 0; v < kKeyVecs; ++v) a[r][v] = _mm256_fmadd_ps(b, k[v], a[r][v]);
    }
  }
  for (int r = 0; r < RB; ++r) {
    for (int v = 0; v < kKeyVecs; ++v) _mm256_store_ps(S + r * kKeyTile + 8 * v, a[r][v]);
  }
}

void qk_rows(float* S, const float* q, const float* kT, int64_t rows, int64_t D) {
  int64_t r = 0;
  for (; r + kQkRows <= rows; r += kQkRows) qk_block<kQkRows>(S + r * kKeyTile, q + r * D, kT, D);
  switch (rows - r) {  // the last rows: < kQkRows
    case 5: if constexpr (kQkRows > 5) qk_block<5>(S + r * kKeyTile, q + r * D, kT, D); break;
    case 4: if constexpr (kQkRows > 4) qk_block<4>(S + r * kKeyTile, q + r * D, kT, D); break;
    case 3: if constexpr (kQkRows > 3) qk_block<3>(S + r * kKeyTile, q + r * D, kT, D); break;
    case 2: qk_block<2>(S + r * kKeyTile, q + r * D, kT, D); break;
    case 1: qk_block<1>(S + r * kKeyTile, q + r * D, kT, D); break;
    default: break;
  }
}

// acc [RB, D] = acc * corr[r] + P [RB, kKeyTile] x V (n rows), for dims [d0, d0 + 8 NV):
// RB x NV accumulators, NV vectors of each V row and one broadcast p in registers.
template <int RB, int NV>
inline void pv_block(float* acc, const float* corr, const float* P, const float* const* v_rows, int64_t n,
                     int64_t D, int64_t d0) {
  __m256 a[RB][NV];
  for (int r = 0; r < RB; ++r) {
    const __m256 c = _mm256_set1_ps(corr[r]);
    for (int v = 0; v < NV; ++v) a[r][v] = _mm256_mul_ps(_mm256_loadu_ps(acc + r * D + d0 + 8 * v), c);
  }
  for (int64_t j = 0; j < n; ++j) {
    __m256 vj[NV];
    for (int v = 0; v < NV; ++v) vj[v] = _mm256_loadu_ps(v_rows[j] + d0 + 8 * v);
    for (int r = 0; r < RB; ++r) {
      const __m256 p = _mm256_broadcast_ss(P + r * kKeyTile + j);
      for (int v = 0; v < NV; ++v) a[r][v] = _mm256_fmadd_ps(p, vj[v], a[r][v]);
    }
  }
  for (int r = 0; r < RB; ++r) {
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(acc + r * D + d0 + 8 * v, a[r][v]);
  }
}

template <int RB>
inline void pv_rows_of(float* acc, const float* corr, const float* P, const float* const* v_rows, int64_t n,
                       int64_t D) {
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) pv_block<RB, 2>(acc, corr, P, v_rows, n, D, d);
  if (d < D) pv_block<RB, 1>(acc, corr, P, v_rows, n, D, d);  // D % 16 == 8
}

void pv_rows(float* acc, const float* corr, const float* P, const float* const* v_rows, int64_t n, int64_t rows,
             int64_t D) {
  int64_t r = 0;
  for (; r + kPvRows <= rows; r += kPvRows) pv_rows_of<kPvRows>(acc + r * D, corr + r, P + r * kKeyTile, v_rows, n, D);
  float* a = acc + r * D;
  const float* c = corr + r;
  const float* p = P + r * kKeyTile;
  switch (rows - r) {  // the last rows: < kPvRows
    case 5: pv_rows_of<5>(a, c, p, v_rows, n, D); break;
    case 4: pv_rows_of<4>(a, c, p, v_rows, n, D); break;
    case 3: pv_rows_of<3>(a, c, p, v_rows, n, D); break;
    case 2: pv_rows_of<2>(a, c, p, v_rows, n, D); break;
    case 1: pv_rows_of<1>(a, c, p, v_rows, n, D); break;
    default: break;
  }
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// Scores of row r (its token at position pos) -> probabilities under the running max m,
// keys after pos masked out; returns the correction of the row's earlier sums.
inline float softmax_tile_row(float* S_row, float& m, float& l, int64_t j0, int64_t pos) {
  __m256 sv[kKeyVecs];
  for (int v = 0; v < kKeyVecs; ++v) sv[v] = _mm256_load_ps(S_row + 8 * v);
  if (j0 + kKeyTile - 1 > pos) {  // the tile reaches past this row's position: mask
    const __m256 limit = _mm256_set1_ps(static_cast<float>(pos - j0));
    const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    for (int v = 0; v < kKeyVecs; ++v) {
      const __m256 idx = _mm256_add_ps(lane, _mm256_set1_ps(8.f * v));
      sv[v] = _mm256_blendv_ps(sv[v], _mm256_set1_ps(-INFINITY), _mm256_cmp_ps(idx, limit, _CMP_GT_OQ));
    }
  }
  __m256 vmax = sv[0];
  for (int v = 1; v < kKeyVecs; ++v) vmax = _mm256_max_ps(vmax, sv[v]);
  const float tile_max = hmax(vmax);
  const float new_max = m > tile_max ? m : tile_max;  // finite: key 0 is in every row's first tile
  const float correction = m == -INFINITY ? 0.f : std::exp(m - new_max);
  const __m256 mx = _mm256_set1_ps(new_max);
  __m256 sum = _mm256_setzero_ps();
  for (int v = 0; v < kKeyVecs; ++v) {
    const __m256 p = exp_nonpositive(_mm256_sub_ps(sv[v], mx));
    _mm256_store_ps(S_row + 8 * v, p);
    sum = _mm256_add_ps(sum, p);
  }
  l = l * correction + hsum(sum);
  m = new_max;
  return correction;
}
}  // namespace

int64_t attend_block_scratch_floats(int64_t rows, int64_t head_dim) {
  // q, acc [rows, D]; S [rows, kKeyTile]; kT [D, kKeyTile]; m, l, corr [rows]; a zero
  // row [D]; + 8 for the 32-byte alignment of the start.
  return 2 * rows * head_dim + rows * kKeyTile + head_dim * kKeyTile + 3 * rows + head_dim + 8;
}

// nq consecutive query tokens of one sequence (query / out rows at token strides q_stride
// / o_stride, the first at position first_pos), the group of heads of KV head kvh, over
// keys [0, first_pos + nq). D % 8 == 0. scratch: attend_block_scratch_floats(nq * group, D).
void attend_block_f32_avx2(float* out, int64_t o_stride, const float* query, int64_t q_stride, const float* k_cache,
                           const float* v_cache, const int32_t* table, int64_t first_pos, int64_t nq,
                           const PagedAttentionShape& s, int64_t kvh, float scale, float* scratch) {
  const int64_t D = s.head_dim, group = s.num_heads / s.num_kv_heads, kv_row = s.num_kv_heads * D;
  const int64_t rows = nq * group, num_keys = first_pos + nq;
  float* base = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(scratch) + 31) & ~uintptr_t{31});
  float* kT = base;                        // [D, kKeyTile] (32-byte aligned rows)
  float* S = kT + D * kKeyTile;            // [rows, kKeyTile]
  float* q = S + rows * kKeyTile;          // [rows, D] scaled
  float* acc = q + rows * D;               // [rows, D]
  float* m = acc + rows * D;
  float* l = m + rows;
  float* corr = l + rows;
  float* zeros = corr + rows;              // [D]: the rows of absent keys
  for (int64_t d = 0; d < D; ++d) zeros[d] = 0.f;
  for (int64_t i = 0; i < nq; ++i) {
    const float* src = query + i * q_stride + kvh * group * D;  // the group's heads are adjacent
    for (int64_t e = 0; e < group * D; ++e) { q[i * group * D + e] = src[e] * scale; acc[i * group * D + e] = 0.f; }
  }
  for (int64_t r = 0; r < rows; ++r) { m[r] = -INFINITY; l[r] = 0.f; }
  const float* k_rows[kKeyTile];
  const float* v_rows[kKeyTile];
  for (int64_t j0 = 0; j0 < num_keys; j0 += kKeyTile) {
    const int64_t n = num_keys - j0 < kKeyTile ? num_keys - j0 : kKeyTile;
    for (int64_t jj = 0; jj < kKeyTile; ++jj) {
      if (jj < n) {
        const int64_t j = j0 + jj;
        const int64_t slot = static_cast<int64_t>(table[j / s.block_size]) * s.block_size + j % s.block_size;
        k_rows[jj] = k_cache + slot * kv_row + kvh * D;
        v_rows[jj] = v_cache + slot * kv_row + kvh * D;
      } else {
        k_rows[jj] = zeros;
      }
    }
    transpose_key_tile(kT, k_rows, D);
    // Rows whose token sits before this tile see none of it: only the rows from the
    // first token at position >= j0 take part (the same tokens for every later tile).
    const int64_t first_token = j0 > first_pos ? j0 - first_pos : 0;
    const int64_t r0 = first_token * group;
    qk_rows(S + r0 * kKeyTile, q + r0 * D, kT, rows - r0, D);
    for (int64_t r = r0; r < rows; ++r) {
      corr[r] = softmax_tile_row(S + r * kKeyTile, m[r], l[r], j0, first_pos + r / group);
    }
    pv_rows(acc + r0 * D, corr + r0, S + r0 * kKeyTile, v_rows, n, rows - r0, D);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = 1.f / l[r];  // > 0: every row sees key 0
    float* o = out + (r / group) * o_stride + (kvh * group + r % group) * D;
    const float* a = acc + r * D;
    for (int64_t d = 0; d < D; ++d) o[d] = a[d] * inv;
  }
}

FASTLLM_AVX2_TARGET_END

#else
bool attention_avx2_supported() { return false; }
int64_t attend_block_scratch_floats(int64_t, int64_t) { return 0; }
void attend_block_f32_avx2(float*, int64_t, const float*, int64_t, const float*, const float*, const int32_t*, int64_t,
                           int64_t, const PagedAttentionShape&, int64_t, float, float*) {}
void attend_item_f32_avx2(float*, const float*, const float*, const float*, const int32_t*, int64_t,
                          const PagedAttentionShape&, int64_t, float*) {}
#endif

}  // namespace fastllm::cpu

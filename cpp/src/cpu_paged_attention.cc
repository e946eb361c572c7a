// One work item per (query token, KV head): the GQA group's query heads walk the keys
// the token may see in tiles of kTile rows, so each K/V row is read and converted once
// for the whole group. Per head an online softmax (running max m, sum l, acc[D]) is
// rescaled once per tile. Query i of a sequence with q_len queries and seq_len cached
// tokens sits at position seq_len - q_len + i and sees keys [0, that position].
// fp32 steps with a prefill chunk on an AVX2 CPU take the blocked path instead: items of
// several query tokens (kBlockRows query rows) per KV head, whose K/V tiles serve every
// row (attend_block_f32_avx2), claimed largest first by the pool.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "fastllm/cpu/float16.h"
#include "fastllm/cpu/kernels.h"
#include "fastllm/cpu/parallel.h"
#include "fastllm/cpu/quant.h"

namespace fastllm::cpu {

// cpu_paged_attention_avx2.cc: the fp32 work item in AVX2 + FMA, where the CPU has them.
bool attention_avx2_supported();
void attend_item_f32_avx2(float* out, const float* q, const float* k_cache, const float* v_cache,
                          const int32_t* table, int64_t num_keys, const PagedAttentionShape& s, int64_t kvh,
                          float* scratch);
// ... and the prefill block: several query tokens of one sequence per item (D % 8 == 0).
int64_t attend_block_scratch_floats(int64_t rows, int64_t head_dim);
void attend_block_f32_avx2(float* out, int64_t o_stride, const float* query, int64_t q_stride, const float* k_cache,
                           const float* v_cache, const int32_t* table, int64_t first_pos, int64_t nq,
                           const PagedAttentionShape& s, int64_t kvh, float scale, float* scratch);

namespace {
constexpr int64_t kTile = 32;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Query rows (tokens x the GQA group's heads) of one prefill work item: enough that each
// K/V tile serves many rows, few enough that the rows' q and acc stay in L1.
constexpr int64_t kBlockRows = 24;

// One item of the tiled fp32 path: nq tokens from token t0 of sequence seq, KV head kvh.
struct BlockItem {
  int64_t cost;  // rows x keys: the items run longest first, so the pool ends together
  int32_t seq, t0, nq, kvh;
};

float* thread_scratch(int64_t floats) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < floats) buf.resize(floats);
  return buf.data();
}

// fp32 with AVX2 when some sequence has several queries: decode tokens keep the one-token
// item, prefill chunks go in blocks of tokens (attend_block_f32_avx2), all on one pool
// run whose tasks are claimed largest first (causal rows differ up to q_len-fold in work).
void paged_attention_blocked_f32(float* out, const float* query, int64_t q_stride, const float* k_cache,
                                 const float* v_cache, const int32_t* block_tables, const int32_t* seq_lens,
                                 const int32_t* query_start_loc, const PagedAttentionShape& s, float scale) {
  const int64_t D = s.head_dim, group = s.num_heads / s.num_kv_heads;
  const int64_t tokens_per_block = std::max<int64_t>(1, kBlockRows / group);
  std::vector<BlockItem> items;
  int64_t total = 0;
  for (int64_t seq = 0; seq < s.num_seqs; ++seq) {
    const int64_t q0 = query_start_loc[seq], q_len = query_start_loc[seq + 1] - q0, ctx = seq_lens[seq] - q_len;
    for (int64_t i = 0; i < q_len; i += tokens_per_block) {
      const int64_t nq = std::min(tokens_per_block, q_len - i);
      const int64_t cost = nq * group * (ctx + i + nq);
      for (int64_t kvh = 0; kvh < s.num_kv_heads; ++kvh) {
        items.push_back({cost, static_cast<int32_t>(seq), static_cast<int32_t>(q0 + i), static_cast<int32_t>(nq),
                         static_cast<int32_t>(kvh)});
        total += cost;
      }
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const BlockItem& a, const BlockItem& b) { return a.cost > b.cost; });
  const int64_t scratch_floats = std::max(attend_block_scratch_floats(tokens_per_block * group, D), group * (D + 2));
  auto run = [&](int64_t index) {
    const BlockItem& it = items[index];
    const int32_t* table = block_tables + it.seq * s.max_blocks_per_seq;
    const int64_t q_len = query_start_loc[it.seq + 1] - query_start_loc[it.seq];
    const int64_t first_pos = seq_lens[it.seq] - q_len + (it.t0 - query_start_loc[it.seq]);
    float* scratch = thread_scratch(scratch_floats + group * D);
    if (it.nq == 1) {  // a decode token (or a chunk's last): the one-token item
      float* q = scratch + scratch_floats;
      const float* src = query + it.t0 * q_stride + it.kvh * group * D;
      for (int64_t e = 0; e < group * D; ++e) q[e] = src[e] * scale;
      attend_item_f32_avx2(out + (it.t0 * s.num_heads + it.kvh * group) * D, q, k_cache, v_cache, table,
                           first_pos + 1, s, it.kvh, scratch);
      return;
    }
    attend_block_f32_avx2(out + it.t0 * s.num_heads * D, s.num_heads * D, query + it.t0 * q_stride, q_stride,
                          k_cache, v_cache, table, first_pos, it.nq, s, it.kvh, scale, scratch);
  };
  // Under ~64k multiply-adds (a short chunk) the pool's hand-off costs more than it saves.
  if (total * D < (int64_t{1} << 16) || num_threads() <= 1) {
    for (int64_t i = 0; i < static_cast<int64_t>(items.size()); ++i) run(i);
  } else {
    pool_run(static_cast<int64_t>(items.size()), run);
  }
}
}  // namespace

template <typename T>
void paged_attention(T* out, const T* query, const T* k_cache, const T* v_cache,
                     const int32_t* block_tables, const int32_t* seq_lens,
                     const int32_t* query_start_loc, const PagedAttentionShape& s, float scale,
                     int64_t q_token_stride) {
  std::vector<int32_t> seq_of_token(s.num_tokens);
  int64_t total_keys = 0;  // sum over query tokens of the keys each sees
  int64_t max_q_len = 0;
  for (int64_t seq = 0; seq < s.num_seqs; ++seq) {
    const int64_t q_len = query_start_loc[seq + 1] - query_start_loc[seq];
    for (int32_t t = query_start_loc[seq]; t < query_start_loc[seq + 1]; ++t) seq_of_token[t] = static_cast<int32_t>(seq);
    total_keys += q_len * (seq_lens[seq] - q_len) + q_len * (q_len + 1) / 2;
    max_q_len = std::max(max_q_len, q_len);
  }
  const int64_t D = s.head_dim, group = s.num_heads / s.num_kv_heads;
  const int64_t q_stride = q_token_stride > 0 ? q_token_stride : s.num_heads * D;
  const int64_t kv_row = s.num_kv_heads * D;  // elements per cached token
  // Chunks of >= ~256k flops (tens of us; a hand-off to the pool costs a few): decode over
  // a short context runs inline, long contexts and prefills spread out.
  const int64_t flops_per_item = std::max<int64_t>(1, 4 * D * group * total_keys / std::max<int64_t>(1, s.num_tokens));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / flops_per_item);
  bool use_avx2 = false;
  if constexpr (std::is_same_v<T, float>) {
    use_avx2 = attention_avx2_supported() && !cpu_generic_forced();
    if (use_avx2 && max_q_len > 1 && D % 8 == 0) {
      paged_attention_blocked_f32(out, query, q_stride, k_cache, v_cache, block_tables, seq_lens, query_start_loc, s,
                                  scale);
      return;
    }
  }

  parallel_for(s.num_tokens * s.num_kv_heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> q(group * D), acc(group * D), k(kTile * D), v(kTile * D), scores(kTile), m(group), l(group);
    std::vector<float> scratch;
    const float* k_rows[kTile];
    const float* v_rows[kTile];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / s.num_kv_heads, kvh = item % s.num_kv_heads;
      const int64_t seq = seq_of_token[t];
      const int64_t q_len = query_start_loc[seq + 1] - query_start_loc[seq];
      const int64_t num_keys = seq_lens[seq] - q_len + (t - query_start_loc[seq]) + 1;
      const int32_t* table = block_tables + seq * s.max_blocks_per_seq;
      const T* q_rows = query + t * q_stride + kvh * group * D;  // the group's heads are adjacent
      for (int64_t i = 0; i < group * D; ++i) { q[i] = to_float(q_rows[i]) * scale; acc[i] = 0.f; }
      if constexpr (std::is_same_v<T, float>) {
        if (use_avx2) {  // scratch: acc [group, D] then m, l [group] (contiguous in `acc`, `m`)
          scratch.resize(group * (D + 2));
          attend_item_f32_avx2(out + (t * s.num_heads + kvh * group) * D, q.data(), k_cache, v_cache, table, num_keys,
                               s, kvh, scratch.data());
          continue;
        }
      }
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.f);

      for (int64_t j0 = 0; j0 < num_keys; j0 += kTile) {
        const int64_t n = std::min(kTile, num_keys - j0);
        for (int64_t jj = 0; jj < n; ++jj) {  // the tile's K/V rows as float: in place for fp32
          const int64_t j = j0 + jj;
          const int64_t slot = static_cast<int64_t>(table[j / s.block_size]) * s.block_size + j % s.block_size;
          const T* k_src = k_cache + slot * kv_row + kvh * D;
          const T* v_src = v_cache + slot * kv_row + kvh * D;
          if constexpr (std::is_same_v<T, float>) {
            k_rows[jj] = k_src;
            v_rows[jj] = v_src;
          } else {
            for (int64_t d = 0; d < D; ++d) { k[jj * D + d] = to_float(k_src[d]); v[jj * D + d] = to_float(v_src[d]); }
            k_rows[jj] = k.data() + jj * D;
            v_rows[jj] = v.data() + jj * D;
          }
        }
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = q.data() + g * D;
          float tile_max = kNegInf;
          for (int64_t jj = 0; jj < n; ++jj) {
            const float* kj = k_rows[jj];
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < D; ++d) dot += qg[d] * kj[d];
            scores[jj] = dot;
            tile_max = std::max(tile_max, dot);
          }
          const float new_max = std::max(m[g], tile_max);
          const float correction = m[g] == kNegInf ? 0.f : std::exp(m[g] - new_max);
          float* ag = acc.data() + g * D;
          l[g] *= correction;
          for (int64_t d = 0; d < D; ++d) ag[d] *= correction;
          for (int64_t jj = 0; jj < n; ++jj) {
            const float p = std::exp(scores[jj] - new_max);
            l[g] += p;
            const float* vj = v_rows[jj];
            for (int64_t d = 0; d < D; ++d) ag[d] += p * vj[d];
          }
          m[g] = new_max;
        }
      }
      T* o = out + (t * s.num_heads + kvh * group) * D;
      for (int64_t g = 0; g < group; ++g) {
        const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
        for (int64_t d = 0; d < D; ++d) o[g * D + d] = from_float<T>(acc[g * D + d] * inv);
      }
    }
  });
}

#define FASTLLM_INSTANTIATE(T)                                                                        \
  template void paged_attention<T>(T*, const T*, const T*, const T*, const int32_t*, const int32_t*, \
                                   const int32_t*, const PagedAttentionShape&, float, int64_t);
FASTLLM_INSTANTIATE(float)
FASTLLM_INSTANTIATE(Half)
FASTLLM_INSTANTIATE(BFloat16)
#undef FASTLLM_INSTANTIATE

}  // namespace fastllm::cpu

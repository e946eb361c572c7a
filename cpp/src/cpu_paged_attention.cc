// One work item per (query token, head): an online softmax over the keys it may see,
// read through the block table. Query i of a sequence with q_len queries and seq_len
// cached tokens sits at position seq_len - q_len + i and sees keys [0, that position].
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "fastllm/cpu/float16.h"
#include "fastllm/cpu/kernels.h"
#include "fastllm/cpu/parallel.h"

namespace fastllm::cpu {

template <typename T>
void paged_attention(T* out, const T* query, const T* k_cache, const T* v_cache,
                     const int32_t* block_tables, const int32_t* seq_lens,
                     const int32_t* query_start_loc, const PagedAttentionShape& s, float scale) {
  std::vector<int32_t> seq_of_token(s.num_tokens);
  for (int64_t seq = 0; seq < s.num_seqs; ++seq) {
    for (int32_t t = query_start_loc[seq]; t < query_start_loc[seq + 1]; ++t) seq_of_token[t] = static_cast<int32_t>(seq);
  }
  const int64_t D = s.head_dim, group = s.num_heads / s.num_kv_heads;
  const int64_t kv_row = s.num_kv_heads * D;  // elements per cached token

  // Threads pay off only past ~100 us of work per chunk (starting one costs tens of us):
  // decode over a short context runs inline, long contexts and prefills spread out.
  int64_t total_keys = 0;
  for (int64_t seq = 0; seq < s.num_seqs; ++seq) {
    const int64_t q_len = query_start_loc[seq + 1] - query_start_loc[seq];
    total_keys += q_len * (seq_lens[seq] - q_len) + q_len * (q_len + 1) / 2;
  }
  const int64_t flops_per_item = std::max<int64_t>(1, 4 * D * total_keys / std::max<int64_t>(1, s.num_tokens));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / flops_per_item);
  parallel_for(s.num_tokens * s.num_heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> q(D), acc(D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / s.num_heads, h = item % s.num_heads, kvh = h / group;
      const int64_t seq = seq_of_token[t];
      const int64_t q_len = query_start_loc[seq + 1] - query_start_loc[seq];
      const int64_t num_keys = seq_lens[seq] - q_len + (t - query_start_loc[seq]) + 1;
      const int32_t* table = block_tables + seq * s.max_blocks_per_seq;
      const T* q_row = query + (t * s.num_heads + h) * D;
      for (int64_t d = 0; d < D; ++d) { q[d] = to_float(q_row[d]) * scale; acc[d] = 0.f; }

      float running_max = -std::numeric_limits<float>::infinity(), denom = 0.f;
      for (int64_t j = 0; j < num_keys; ++j) {
        const int64_t slot = static_cast<int64_t>(table[j / s.block_size]) * s.block_size + j % s.block_size;
        const T* k = k_cache + slot * kv_row + kvh * D;
        const T* v = v_cache + slot * kv_row + kvh * D;
        float score = 0.f;
        for (int64_t d = 0; d < D; ++d) score += q[d] * to_float(k[d]);
        if (score > running_max) {  // rescale what was accumulated under the old max
          const float correction = std::exp(running_max - score);
          denom *= correction;
          for (int64_t d = 0; d < D; ++d) acc[d] *= correction;
          running_max = score;
        }
        const float p = std::exp(score - running_max);
        denom += p;
        for (int64_t d = 0; d < D; ++d) acc[d] += p * to_float(v[d]);
      }
      T* o = out + (t * s.num_heads + h) * D;
      const float inv = denom > 0.f ? 1.f / denom : 0.f;
      for (int64_t d = 0; d < D; ++d) o[d] = from_float<T>(acc[d] * inv);
    }
  });
}

#define FASTLLM_INSTANTIATE(T)                                                                        \
  template void paged_attention<T>(T*, const T*, const T*, const T*, const int32_t*, const int32_t*, \
                                   const int32_t*, const PagedAttentionShape&, float);
FASTLLM_INSTANTIATE(float)
FASTLLM_INSTANTIATE(Half)
FASTLLM_INSTANTIATE(BFloat16)
#undef FASTLLM_INSTANTIATE

}  // namespace fastllm::cpu

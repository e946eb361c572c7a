// Paged attention, flash-decoding style.
//
// Grid (num_tokens, num_heads / HEADS, num_splits); 128 threads. A CTA serves one query
// token, HEADS query heads that share one KV head (GQA: each K/V row is loaded once for
// all of them), and one split of that token's visible keys. A KV row of D elements is
// read by a "key group" of D / VEC lanes, one 16-byte load each; a key group takes
// UNROLL keys per step, so a warp covers UNROLL * 32 * VEC / D keys. Each key group keeps an online softmax (max m, sum l,
// acc[VEC] per head); key groups are merged through shared memory at the end, and
// splits by paged_attention_merge_kernel when there is more than one.
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>

#include "fastllm/cuda/vec.cuh"

namespace fastllm::cuda {

constexpr int kAttentionThreads = 128;

// What the kernels read, built by the launcher from PagedAttentionParams (launchers.h)
// and its plan (paged_attention_launch.cuh).
struct AttentionKernelParams {
  void* out;                 // [T, H, D]
  const void* query;         // [T, H, D], token stride q_token_stride elements
  const void* k_cache;       // [num_blocks, block_size, Hkv, D]
  const void* v_cache;
  const int32_t* block_tables;     // [S, max_blocks]
  const int32_t* seq_lens;         // [S]
  const int32_t* query_start_loc;  // [S + 1]
  float* split_acc;                // [T, H, num_splits, D]   (num_splits > 1 only)
  float* split_max;                // [T, H, num_splits]
  float* split_sum;                // [T, H, num_splits]
  int num_seqs, num_heads, num_kv_heads, block_size, max_blocks, num_splits, keys_per_split;
  float scale;
  int64_t q_token_stride;
  bool decode_only;  // skip the sequences paged_prefill_kernel serves (on_prefill_kernel)
};

constexpr int kPrefillRows = 64;  // packed (token, head) query rows per prefill CTA (4 warps x 16)

// Which kernel serves a sequence with q_len queries and G = num_heads / num_kv_heads:
// paged_prefill_kernel (paged_prefill.cuh) when its q_len * G packed rows fill at least one
// tile; shorter ones (decodes, short extends of a long cached prefix) stay here, where the
// context splits keep the GPU busy rather than a few prefill CTAs walking the keys serially.
__host__ __device__ inline bool on_prefill_kernel(int q_len, int group) {
  return q_len > 1 && q_len * group >= kPrefillRows;
}

// The sequence a flattened query token belongs to: binary search of query_start_loc.
__device__ __forceinline__ int seq_of_token(const int32_t* qsl, int num_seqs, int token) {
  int lo = 0, hi = num_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (qsl[mid] <= token) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <typename T, int D, int HEADS>
__global__ void __launch_bounds__(kAttentionThreads)
paged_attention_kernel(AttentionKernelParams p) {
  constexpr int VEC = VecTraits<T>::kSize;
  constexpr int LANES_PER_KEY = D / VEC;
  static_assert(LANES_PER_KEY <= 32 && 32 % LANES_PER_KEY == 0, "head_dim must fit a warp's key groups");
  constexpr int KEYS_PER_WARP = 32 / LANES_PER_KEY;
  constexpr int NUM_WARPS = kAttentionThreads / 32;
  constexpr int GROUPS = NUM_WARPS * KEYS_PER_WARP;  // key groups per CTA
  constexpr int UNROLL = 4;                          // keys per key group per step

  const int token = blockIdx.x, head0 = blockIdx.y * HEADS, split = blockIdx.z;
  const int kv_head = head0 / (p.num_heads / p.num_kv_heads);
  const int seq = seq_of_token(p.query_start_loc, p.num_seqs, token);
  const int q_len = p.query_start_loc[seq + 1] - p.query_start_loc[seq];
  if (p.decode_only && on_prefill_kernel(q_len, p.num_heads / p.num_kv_heads)) return;
  const int num_keys = p.seq_lens[seq] - q_len + (token - p.query_start_loc[seq]) + 1;  // causal
  const int key_begin = split * p.keys_per_split;
  const int key_end = min(num_keys, key_begin + p.keys_per_split);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int lane_in_key = lane % LANES_PER_KEY, group = warp * KEYS_PER_WARP + lane / LANES_PER_KEY;
  const int dim0 = lane_in_key * VEC;

  float q[HEADS][VEC], acc[HEADS][VEC], m[HEADS], l[HEADS];
#pragma unroll
  for (int h = 0; h < HEADS; ++h) {
    load_vec(static_cast<const T*>(p.query) + (int64_t)token * p.q_token_stride + (int64_t)(head0 + h) * D + dim0, q[h]);
#pragma unroll
    for (int i = 0; i < VEC; ++i) { q[h][i] *= p.scale; acc[h][i] = 0.f; }
    m[h] = -FLT_MAX;
    l[h] = 0.f;
  }

  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  const int32_t* table = p.block_tables + (int64_t)seq * p.max_blocks;
  const int64_t row_stride = (int64_t)p.num_kv_heads * D;
  // Every lane runs the same number of iterations so the shuffles below stay converged.
  // Each key group loads UNROLL keys' K and V rows before using any: enough bytes in
  // flight per SM to cover DRAM latency (the decode kernel is bandwidth-bound).
  for (int base = key_begin; base < key_end; base += GROUPS * UNROLL) {
    uint4 k_raw[UNROLL], v_raw[UNROLL];
    bool valid[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int key = base + u * GROUPS + group;
      valid[u] = key < key_end;
      k_raw[u] = v_raw[u] = make_uint4(0, 0, 0, 0);
      if (valid[u]) {
        const int64_t slot = (int64_t)table[key / p.block_size] * p.block_size + key % p.block_size;
        const int64_t offset = slot * row_stride + (int64_t)kv_head * D + dim0;
        k_raw[u] = __ldg(reinterpret_cast<const uint4*>(k_cache + offset));
        v_raw[u] = __ldg(reinterpret_cast<const uint4*>(v_cache + offset));
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      float k[VEC], v[VEC];
      unpack_vec<T>(k_raw[u], k);
      unpack_vec<T>(v_raw[u], v);
#pragma unroll
      for (int h = 0; h < HEADS; ++h) {
        float score = 0.f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) score += q[h][i] * k[i];
#pragma unroll
        for (int off = LANES_PER_KEY / 2; off > 0; off /= 2) score += __shfl_xor_sync(0xffffffffu, score, off);
        if (valid[u]) {
          const float m_new = fmaxf(m[h], score);
          const float correction = __expf(m[h] - m_new), prob = __expf(score - m_new);
          l[h] = l[h] * correction + prob;
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[h][i] = acc[h][i] * correction + prob * v[i];
          m[h] = m_new;
        }
      }
    }
  }

  // Merge the key groups: shared [HEADS][GROUPS][D] partial sums, [HEADS][GROUPS] max/sum.
  __shared__ float s_acc[HEADS][GROUPS][D];
  __shared__ float s_max[HEADS][GROUPS], s_sum[HEADS][GROUPS];
#pragma unroll
  for (int h = 0; h < HEADS; ++h) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) s_acc[h][group][dim0 + i] = acc[h][i];
    if (lane_in_key == 0) { s_max[h][group] = m[h]; s_sum[h][group] = l[h]; }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < HEADS * D; idx += kAttentionThreads) {
    const int h = idx / D, d = idx % D;
    float mx = -FLT_MAX;
    for (int g = 0; g < GROUPS; ++g) mx = fmaxf(mx, s_max[h][g]);
    float sum = 0.f, a = 0.f;
    for (int g = 0; g < GROUPS; ++g) {
      const float w = s_sum[h][g] > 0.f ? __expf(s_max[h][g] - mx) : 0.f;
      sum += w * s_sum[h][g];
      a += w * s_acc[h][g][d];
    }
    const int64_t row = (int64_t)token * p.num_heads + head0 + h;
    if (p.num_splits == 1) {
      static_cast<T*>(p.out)[row * D + d] = from_float<T>(sum > 0.f ? a / sum : 0.f);
    } else {
      p.split_acc[(row * p.num_splits + split) * D + d] = a;
      if (d == 0) {
        p.split_max[row * p.num_splits + split] = mx;
        p.split_sum[row * p.num_splits + split] = sum;
      }
    }
  }
}

// Grid (T, H), D threads: combine the splits' partial softmax results of one row.
template <typename T>
__global__ void paged_attention_merge_kernel(AttentionKernelParams p, int head_dim) {
  if (p.decode_only) {
    const int seq = seq_of_token(p.query_start_loc, p.num_seqs, blockIdx.x);
    if (on_prefill_kernel(p.query_start_loc[seq + 1] - p.query_start_loc[seq], p.num_heads / p.num_kv_heads)) return;
  }
  const int64_t row = (int64_t)blockIdx.x * p.num_heads + blockIdx.y;
  const float* mx = p.split_max + row * p.num_splits;
  const float* sm = p.split_sum + row * p.num_splits;
  float global_max = -FLT_MAX;
  for (int s = 0; s < p.num_splits; ++s) if (sm[s] > 0.f) global_max = fmaxf(global_max, mx[s]);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float sum = 0.f, a = 0.f;
    for (int s = 0; s < p.num_splits; ++s) {
      if (sm[s] <= 0.f) continue;  // an empty split (past this token's last key)
      const float w = __expf(mx[s] - global_max);
      sum += w * sm[s];
      a += w * p.split_acc[(row * p.num_splits + s) * head_dim + d];
    }
    static_cast<T*>(p.out)[row * head_dim + d] = from_float<T>(sum > 0.f ? a / sum : 0.f);
  }
}

}  // namespace fastllm::cuda

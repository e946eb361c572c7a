// Paged attention for prefill / extend (q_len > 1) on tensor cores, flash-attention-2 style.
//
// GQA packing: the G = num_heads / num_kv_heads query heads of a KV head share its keys, so
// a sequence's queries for one KV head form a matrix of q_len * G "packed rows"
// (row = token_in_seq * G + head_in_group) against one K/V stream. A CTA (4 warps) takes
// 64 packed rows of one sequence and one KV head and walks its keys in tiles of 64:
//   S = Q K^T (mma m16n8k16), online softmax in registers (base 2), O += P V.
// Each warp owns 16 rows; a lane holds rows g and g + 8 (see mma.cuh), so a row's max and
// sum are reduced over the 4 lanes of a quad. K and V tiles go global -> shared with
// cp.async through the block table; loading V(j) overlaps S(j), loading K(j+1) overlaps
// O += P V(j). Causality: packed row r sees keys 0 .. context + r / G, where
// context = seq_len - q_len (the cached prefix).
//
// Grid (prefill tiles over all sequences with q_len > 1, num_kv_heads); a CTA finds its
// (sequence, tile) by a warp prefix sum over query_start_loc, so no host-side tile list.
#pragma once
#include <cstdint>

#include "fastllm/cuda/mma.cuh"
#include "fastllm/cuda/paged_attention.cuh"

namespace fastllm::cuda {

constexpr int kPrefillKeys = 64;     // keys per shared-memory tile
constexpr int kPrefillThreads = 128;

__host__ __device__ inline int prefill_tiles(int q_len, int group) {
  return on_prefill_kernel(q_len, group) ? (q_len * group + kPrefillRows - 1) / kPrefillRows : 0;
}

// Upper bound on the CTAs (per KV head) the tiles of a batch need: each sequence's tiles
// round up once, so sum(ceil(q_len * G / 64)) <= T * G / 64 + S.
inline int prefill_grid_x(int num_tokens, int num_seqs, int group) {
  const int64_t bound = ((int64_t)num_tokens * group + kPrefillRows - 1) / kPrefillRows + num_seqs;
  return (int)bound;
}

// The (sequence, tile-in-sequence) of CTA `tile` among the prefill tiles of every sequence
// in order; false when `tile` is past the last one. Every lane of the warp must call it.
__device__ __forceinline__ bool find_prefill_tile(const int32_t* qsl, int num_seqs, int group, int tile,
                                                  int& seq, int& tile_in_seq) {
  const int lane = threadIdx.x % 32;
  int before = 0;  // tiles of the sequences scanned so far
  for (int base = 0; base < num_seqs; base += 32) {
    const int s = base + lane;
    const int n = s < num_seqs ? prefill_tiles(qsl[s + 1] - qsl[s], group) : 0;
    int inclusive = n;
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int x = __shfl_up_sync(0xffffffffu, inclusive, off);
      if (lane >= off) inclusive += x;
    }
    const int total = __shfl_sync(0xffffffffu, inclusive, 31);
    if (tile < before + total) {
      const unsigned hit = __ballot_sync(0xffffffffu, tile < before + inclusive);
      const int owner = __ffs(hit) - 1;
      seq = base + owner;
      tile_in_seq = tile - before - __shfl_sync(0xffffffffu, inclusive - n, owner);
      return true;
    }
    before += total;
  }
  return false;
}

// LDSM: K and V fragments by ldmatrix (.trans for V), four 8x8 matrices per instruction,
// else by 32-bit / 16-bit shared loads (3 loads per mma; kept as the reference variant).
template <typename T, int D, bool LDSM>
__global__ void __launch_bounds__(kPrefillThreads)
paged_prefill_kernel(AttentionKernelParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma bf16 / cp.async need sm_80; the launcher never sends work here
#else
  using Mma = MmaType<T>;
  constexpr int KC = D / 16;              // k-steps of Q K^T over head_dim
  constexpr int DC = D / 8;               // n-tiles of O (head_dim in 8s)
  constexpr int NC = kPrefillKeys / 8;    // n-tiles of S (keys in 8s)
  constexpr int CHUNKS = D / 8;           // 16-byte chunks per K/V row
  // Row stride D + 8: rows stay 16-byte aligned for cp.async, and a quad's fragment loads
  // (8 rows x 4 words) land in 32 different banks.
  constexpr int STRIDE = D + 8;
  __shared__ __align__(16) T s_k[kPrefillKeys * STRIDE];
  __shared__ __align__(16) T s_v[kPrefillKeys * STRIDE];

  const int group = p.num_heads / p.num_kv_heads;
  int seq, tile;
  if (!find_prefill_tile(p.query_start_loc, p.num_seqs, group, blockIdx.x, seq, tile)) return;
  const int kv_head = blockIdx.y;
  const int q_begin = p.query_start_loc[seq];
  const int q_len = p.query_start_loc[seq + 1] - q_begin;
  // The last tiles see the most keys (causal): run them first so the tail wave is short.
  tile = prefill_tiles(q_len, group) - 1 - tile;
  const int context = p.seq_lens[seq] - q_len;
  const int row0 = tile * kPrefillRows;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  int tok[2], head[2];
  bool valid[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = row0 + warp * 16 + g + 8 * i;
    tok[i] = r / group;
    head[i] = kv_head * group + r % group;
    valid[i] = tok[i] < q_len;
  }

  // Q as A fragments, loaded once: qf[kc] covers head_dim kc*16 .. kc*16+15.
  uint32_t qf[KC][4];
  const T* query = static_cast<const T*>(p.query);
#pragma unroll
  for (int kc = 0; kc < KC; ++kc) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        uint32_t v = 0;
        if (valid[i]) {
          const T* src = query + (int64_t)(q_begin + tok[i]) * p.q_token_stride + (int64_t)head[i] * D +
                         kc * 16 + half * 8 + 2 * t;
          v = *reinterpret_cast<const uint32_t*>(src);
        }
        qf[kc][i + 2 * half] = v;
      }
    }
  }

  // Keys this tile's rows can see (its last valid row's causal horizon).
  const int last_tok = min(q_len - 1, (row0 + kPrefillRows - 1) / group);
  const int first_pos = context + row0 / group;
  const int num_keys = context + last_tok + 1;
  const int num_key_tiles = (num_keys + kPrefillKeys - 1) / kPrefillKeys;

  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  const int32_t* table = p.block_tables + (int64_t)seq * p.max_blocks;
  auto load_tile = [&](T* dst, const T* cache, int key_base) {
    for (int c = threadIdx.x; c < kPrefillKeys * CHUNKS; c += kPrefillThreads) {
      const int key = c / CHUNKS, part = c % CHUNKS, k = key_base + key;
      const T* src = cache;  // never read: 0 source bytes zero-fill keys past the horizon
      int bytes = 0;
      if (k < num_keys) {
        const int64_t slot = (int64_t)table[k / p.block_size] * p.block_size + k % p.block_size;
        src = cache + (slot * p.num_kv_heads + kv_head) * D + part * 8;
        bytes = 16;
      }
      cp_async_16(dst + key * STRIDE + part * 8, src, bytes);
    }
    cp_async_commit();
  };

  float o[DC][4];
#pragma unroll
  for (int dc = 0; dc < DC; ++dc) o[dc][0] = o[dc][1] = o[dc][2] = o[dc][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const float scale_log2 = p.scale * 1.4426950408889634f;  // exp(x) = exp2(x * log2 e)

  load_tile(s_k, k_cache, 0);
  for (int j = 0; j < num_key_tiles; ++j) {
    const int key_base = j * kPrefillKeys;
    cp_async_wait_all();
    __syncthreads();  // K(j) landed; every warp is done with V(j-1)
    load_tile(s_v, v_cache, key_base);

    float s[NC][4];
#pragma unroll
    for (int nc = 0; nc < NC; ++nc) {
      s[nc][0] = s[nc][1] = s[nc][2] = s[nc][3] = 0.f;
      if constexpr (LDSM) {
        // Matrices (keys nc*8 .. +7) x (dims 16 kc + 0..7 | 8..15) for kc = 2 kp, 2 kp + 1
        // are b[0..1] of k-step 2 kp and b[2..3] of 2 kp + 1 (B[k][n] = K[key n][dim k]).
        const int m = lane / 8, r = lane % 8;
#pragma unroll
        for (int kp = 0; kp < KC / 2; ++kp) {
          uint32_t b[4];
          ldmatrix_x4<false>(b, s_k + (nc * 8 + r) * STRIDE + (2 * kp + m / 2) * 16 + (m % 2) * 8);
          Mma::mma(s[nc], qf[2 * kp], b);
          Mma::mma(s[nc], qf[2 * kp + 1], b + 2);
        }
      } else {
        const T* krow = s_k + (nc * 8 + g) * STRIDE + 2 * t;  // B[k][n] = K[key n][dim k]
#pragma unroll
        for (int kc = 0; kc < KC; ++kc) {
          const uint32_t b[2] = {*reinterpret_cast<const uint32_t*>(krow + kc * 16),
                                 *reinterpret_cast<const uint32_t*>(krow + kc * 16 + 8)};
          Mma::mma(s[nc], qf[kc], b);
        }
      }
    }

    const bool needs_mask = key_base + kPrefillKeys - 1 > first_pos;
#pragma unroll
    for (int nc = 0; nc < NC; ++nc) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key_base + nc * 8 + 2 * t + (e & 1);
        float x = s[nc][e] * scale_log2;
        if (needs_mask && key > context + tok[e / 2]) x = -INFINITY;
        s[nc][e] = x;
      }
    }

    // Online softmax of rows g (e = 0, 1) and g + 8 (e = 2, 3); s becomes P.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = m[i];
#pragma unroll
      for (int nc = 0; nc < NC; ++nc) mx = fmaxf(mx, fmaxf(s[nc][2 * i], s[nc][2 * i + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float base = mx == -INFINITY ? 0.f : mx;  // a row with nothing visible yet
      const float correction = exp2f(m[i] - base);
      m[i] = mx;
      l[i] *= correction;
#pragma unroll
      for (int dc = 0; dc < DC; ++dc) {
        o[dc][2 * i] *= correction;
        o[dc][2 * i + 1] *= correction;
      }
#pragma unroll
      for (int nc = 0; nc < NC; ++nc) {
        const float p0 = exp2f(s[nc][2 * i] - base), p1 = exp2f(s[nc][2 * i + 1] - base);
        s[nc][2 * i] = p0;
        s[nc][2 * i + 1] = p1;
        l[i] += p0 + p1;  // this lane's columns only; the quad is summed at the end
      }
    }

    cp_async_wait_all();
    __syncthreads();  // V(j) landed; every warp is done with K(j)
    if (j + 1 < num_key_tiles) load_tile(s_k, k_cache, key_base + kPrefillKeys);

    // O += P V: the S accumulators of key tiles 2kk, 2kk+1 are the A fragment of keys
    // kk*16 .. kk*16+15; B[k][n] = V[key k][dim n], two rows apart per register.
    [[maybe_unused]] const uint16_t* v16 = reinterpret_cast<const uint16_t*>(s_v);
#pragma unroll
    for (int kk = 0; kk < NC / 2; ++kk) {
      const uint32_t a[4] = {Mma::pack(s[2 * kk][0], s[2 * kk][1]), Mma::pack(s[2 * kk][2], s[2 * kk][3]),
                             Mma::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             Mma::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      if constexpr (LDSM) {
        // Transposed matrices (keys kk*16 + 0..7 | 8..15) x (dims 8 dc .. +7) for
        // dc = 2 dp, 2 dp + 1: b[0..1] of n-tile 2 dp, b[2..3] of 2 dp + 1.
        const int m = lane / 8, r = lane % 8;
#pragma unroll
        for (int dp = 0; dp < DC / 2; ++dp) {
          uint32_t b[4];
          ldmatrix_x4<true>(b, s_v + (kk * 16 + (m % 2) * 8 + r) * STRIDE + (2 * dp + m / 2) * 8);
          Mma::mma(o[2 * dp], a, b);
          Mma::mma(o[2 * dp + 1], a, b + 2);
        }
      } else {
        const int k0 = kk * 16 + 2 * t;
#pragma unroll
        for (int dc = 0; dc < DC; ++dc) {
          const int col = dc * 8 + g;
          const uint32_t b[2] = {pack_u16(v16[k0 * STRIDE + col], v16[(k0 + 1) * STRIDE + col]),
                                 pack_u16(v16[(k0 + 8) * STRIDE + col], v16[(k0 + 9) * STRIDE + col])};
          Mma::mma(o[dc], a, b);
        }
      }
    }
  }

  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float sum = l[i];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    if (!valid[i]) continue;
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    T* dst = out + ((int64_t)(q_begin + tok[i]) * p.num_heads + head[i]) * D + 2 * t;
#pragma unroll
    for (int dc = 0; dc < DC; ++dc) {
      *reinterpret_cast<uint32_t*>(dst + dc * 8) = Mma::pack(o[dc][2 * i] * inv, o[dc][2 * i + 1] * inv);
    }
  }
#endif
}

}  // namespace fastllm::cuda

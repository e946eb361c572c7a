// Scale + causal mask + softmax over rows of [num_rows, num_cols]; row r of a matrix of
// rows_per_matrix rows keeps columns c <= r % rows_per_matrix + causal_offset. Row r's
// scores are multiplied by scale * row_scale[r] (row_scale [num_rows] float32, or null
// for 1): per-row inverse temperatures when sampling, in the same single pass.
// Short rows (<= 1024): one warp per row, the row held in registers (one read, one write).
// Mid rows (up to 4096 16-byte chunks: 32k bf16 / 16k fp32 columns, aligned): one CTA per
// row, the row in registers, 16-byte accesses.
// Long rows (vocabulary-sized): one CTA per row, an online max/sum pass, then a write pass
// (16-byte accesses when aligned).
#pragma once
#include <cfloat>
#include <cstdint>

#include "fastllm/cuda/vec.cuh"

namespace fastllm::cuda {

struct SoftmaxParams {
  void* out;
  const void* scores;
  const float* row_scale;  // [num_rows] or nullptr
  int64_t num_rows, num_cols, rows_per_matrix, causal_offset;
  float scale;
  bool causal;
};

__device__ __forceinline__ int64_t visible_cols(const SoftmaxParams& p, int64_t row) {
  if (!p.causal) return p.num_cols;
  const int64_t v = row % p.rows_per_matrix + p.causal_offset + 1;
  return v < 0 ? 0 : (v > p.num_cols ? p.num_cols : v);
}

__device__ __forceinline__ float row_scale_of(const SoftmaxParams& p, int64_t row) {
  return p.row_scale != nullptr ? p.scale * __ldg(p.row_scale + row) : p.scale;
}

__device__ __forceinline__ float warp_max(float x) {
  for (int off = 16; off > 0; off /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int off = 16; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// PER_LANE = ceil(num_cols / 32) rounded up to a power of two (<= 32).
template <typename T, int PER_LANE>
__global__ void softmax_warp_kernel(SoftmaxParams p) {
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= p.num_rows) return;
  const int lane = threadIdx.x % 32;
  const T* x = static_cast<const T*>(p.scores) + row * p.num_cols;
  T* y = static_cast<T*>(p.out) + row * p.num_cols;
  const int64_t visible = visible_cols(p, row);
  const float scale = row_scale_of(p, row);
  float v[PER_LANE];
  float mx = -FLT_MAX;
#pragma unroll
  for (int i = 0; i < PER_LANE; ++i) {
    const int64_t c = lane + 32 * i;  // strided columns: coalesced across the warp
    v[i] = c < visible ? to_float(x[c]) * scale : -FLT_MAX;
    mx = fmaxf(mx, v[i]);
  }
  mx = warp_max(mx);
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < PER_LANE; ++i) {
    const int64_t c = lane + 32 * i;
    v[i] = c < visible ? __expf(v[i] - mx) : 0.f;
    sum += v[i];
  }
  sum = warp_sum(sum);
  const float inv = sum > 0.f ? 1.f / sum : 0.f;  // fully masked row -> zeros
#pragma unroll
  for (int i = 0; i < PER_LANE; ++i) {
    const int64_t c = lane + 32 * i;
    if (c < p.num_cols) y[c] = from_float<T>(v[i] * inv);
  }
}

template <typename T>
__global__ void softmax_block_kernel(SoftmaxParams p) {
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(p.scores) + row * p.num_cols;
  T* y = static_cast<T*>(p.out) + row * p.num_cols;
  const int64_t visible = visible_cols(p, row);
  const float scale = row_scale_of(p, row);
  // Pass 1: each thread keeps an online (max, sum) over its columns.
  float mx = -FLT_MAX, sum = 0.f;
  for (int64_t c = threadIdx.x; c < visible; c += blockDim.x) {
    const float s = to_float(x[c]) * scale;
    if (s > mx) { sum = sum * __expf(mx - s) + 1.f; mx = s; } else { sum += __expf(s - mx); }
  }
  // Reduce (max, sum) pairs: within warps, then across warps via shared memory.
  __shared__ float s_max[32], s_sum[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = blockDim.x / 32;
  float wmx = warp_max(mx);
  float wsum = warp_sum(sum > 0.f ? sum * __expf(mx - wmx) : 0.f);
  if (lane == 0) { s_max[warp] = wmx; s_sum[warp] = wsum; }
  __syncthreads();
  if (warp == 0) {
    float m2 = lane < num_warps ? s_max[lane] : -FLT_MAX;
    float s2 = lane < num_warps ? s_sum[lane] : 0.f;
    const float gm = warp_max(m2);
    s2 = warp_sum(s2 > 0.f ? s2 * __expf(m2 - gm) : 0.f);
    if (lane == 0) { s_max[0] = gm; s_sum[0] = s2; }
  }
  __syncthreads();
  const float gmax = s_max[0], gsum = s_sum[0];
  const float inv = gsum > 0.f ? 1.f / gsum : 0.f;
  // Pass 2: write probabilities (masked columns -> 0).
  for (int64_t c = threadIdx.x; c < p.num_cols; c += blockDim.x) {
    y[c] = from_float<T>(c < visible ? __expf(to_float(x[c]) * scale - gmax) * inv : 0.f);
  }
}

// One row of a CTA-per-row kernel: its input, output, visible columns and scale.
template <typename T>
struct SoftmaxRow {
  const T* x;
  T* y;
  int64_t visible;
  float scale;
  __device__ SoftmaxRow(const SoftmaxParams& p, int64_t row)
      : x(static_cast<const T*>(p.scores) + row * p.num_cols), y(static_cast<T*>(p.out) + row * p.num_cols),
        visible(visible_cols(p, row)), scale(row_scale_of(p, row)) {}
};

// Block-wide max / sum; every thread gets the result. `scratch` is this reduction's own
// __shared__ float[32] (a second reduction needs a second array: no barrier between).
__device__ __forceinline__ float block_allreduce_max(float x, float* scratch) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = blockDim.x / 32;
  x = warp_max(x);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < num_warps ? scratch[lane] : -FLT_MAX;
  return warp_max(x);
}
__device__ __forceinline__ float block_allreduce_sum(float x, float* scratch) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = blockDim.x / 32;
  x = warp_sum(x);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < num_warps ? scratch[lane] : 0.f;
  return warp_sum(x);
}

// Mid-length rows (1k .. 4096 16-byte chunks, e.g. attention scores of long prompts): one CTA per
// row holding the whole row in registers, CHUNKS 16-byte vectors per thread, so every
// element is read once and written once with 16-byte accesses. Needs num_cols % VEC == 0
// and 16-byte aligned rows (the launcher checks).
template <typename T, int CHUNKS>
__global__ void __launch_bounds__(512) softmax_block_regs_kernel(SoftmaxParams p) {
  constexpr int VEC = VecTraits<T>::kSize;
  __shared__ float s_max[32], s_sum[32];
  const SoftmaxRow<T> row(p, blockIdx.x);
  const int64_t num_chunks = p.num_cols / VEC;
  float v[CHUNKS][VEC];
  float mx = -FLT_MAX;
#pragma unroll
  for (int i = 0; i < CHUNKS; ++i) {
    const int64_t chunk = threadIdx.x + (int64_t)i * blockDim.x;
    if (chunk < num_chunks && chunk * VEC < row.visible) load_vec(row.x + chunk * VEC, v[i]);  // masked: not read
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t c = chunk * VEC + j;
      v[i][j] = chunk < num_chunks && c < row.visible ? v[i][j] * row.scale : -FLT_MAX;
      mx = fmaxf(mx, v[i][j]);
    }
  }
  mx = block_allreduce_max(mx, s_max);
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < CHUNKS; ++i) {
    const int64_t chunk = threadIdx.x + (int64_t)i * blockDim.x;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      v[i][j] = chunk < num_chunks && chunk * VEC + j < row.visible ? __expf(v[i][j] - mx) : 0.f;
      sum += v[i][j];
    }
  }
  sum = block_allreduce_sum(sum, s_sum);
  const float inv = sum > 0.f ? 1.f / sum : 0.f;  // fully masked row -> zeros
#pragma unroll
  for (int i = 0; i < CHUNKS; ++i) {
    const int64_t chunk = threadIdx.x + (int64_t)i * blockDim.x;
    if (chunk >= num_chunks) continue;
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[i][j] *= inv;
    store_vec(row.y + chunk * VEC, v[i]);
  }
}

// Vocabulary-sized rows (e.g. 128k float32 logits): the two-pass block kernel above with
// 16-byte loads and stores (same alignment needs as softmax_block_regs_kernel).
template <typename T>
__global__ void softmax_block_vec_kernel(SoftmaxParams p) {
  constexpr int VEC = VecTraits<T>::kSize;
  __shared__ float s_max[32], s_sum[32];
  const SoftmaxRow<T> row(p, blockIdx.x);
  const int64_t num_chunks = p.num_cols / VEC;
  // Pass 1: an online (max, sum) per thread over its chunks' visible columns.
  float mx = -FLT_MAX, sum = 0.f;
  for (int64_t chunk = threadIdx.x; chunk * VEC < row.visible; chunk += blockDim.x) {
    float v[VEC];
    load_vec(row.x + chunk * VEC, v);
    float cmx = -FLT_MAX;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      v[j] = chunk * VEC + j < row.visible ? v[j] * row.scale : -FLT_MAX;
      cmx = fmaxf(cmx, v[j]);
    }
    const float m_new = fmaxf(mx, cmx);
    float csum = 0.f;
#pragma unroll
    for (int j = 0; j < VEC; ++j) csum += chunk * VEC + j < row.visible ? __expf(v[j] - m_new) : 0.f;
    sum = sum * __expf(mx - m_new) + csum;
    mx = m_new;
  }
  const float gmax = block_allreduce_max(mx, s_max);
  const float gsum = block_allreduce_sum(sum > 0.f ? sum * __expf(mx - gmax) : 0.f, s_sum);
  const float inv = gsum > 0.f ? 1.f / gsum : 0.f;
  // Pass 2: write probabilities (masked columns -> 0).
  for (int64_t chunk = threadIdx.x; chunk < num_chunks; chunk += blockDim.x) {
    float v[VEC] = {};
    if (chunk * VEC < row.visible) load_vec(row.x + chunk * VEC, v);  // masked chunks: not read
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      v[j] = chunk * VEC + j < row.visible ? __expf(v[j] * row.scale - gmax) * inv : 0.f;
    }
    store_vec(row.y + chunk * VEC, v);
  }
}

}  // namespace fastllm::cuda

// Quantized linear on the GPU: one warp per weight row, a tile of kTokens activation rows
// per CTA. Each lane decodes the weights it multiplies straight from the ggml blocks in
// registers (no dequantized copy of the weight in memory) and accumulates in fp32; the
// warp then reduces. Block layouts (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, F32/F16/BF16) as in cpp/src/cpu_quant_impl.inc (ggml-common.h).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace fastllm::cuda {

enum GgmlType : int { kGgmlF32 = 0, kGgmlF16 = 1, kGgmlQ4_0 = 2, kGgmlQ4_1 = 3, kGgmlQ5_0 = 6, kGgmlQ5_1 = 7, kGgmlQ8_0 = 8,
                      kGgmlQ4_K = 12, kGgmlQ5_K = 13, kGgmlQ6_K = 14, kGgmlBF16 = 30 };

__device__ __forceinline__ float load_half(const uint8_t* p) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(p[0] | (p[1] << 8))));
}

// 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K super-block.
__device__ __forceinline__ void k_scale_min(int j, const uint8_t* s, int& scale, int& min) {
  if (j < 4) {
    scale = s[j] & 63;
    min = s[j + 4] & 63;
  } else {
    scale = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    min = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Weight k of a row (k-quant super-blocks of 256, the others of 32 or 1).
template <int TYPE>
__device__ __forceinline__ float weight_at(const uint8_t* row, int64_t k) {
  if constexpr (TYPE == kGgmlF32) {
    return reinterpret_cast<const float*>(row)[k];
  } else if constexpr (TYPE == kGgmlF16) {
    return load_half(row + 2 * k);
  } else if constexpr (TYPE == kGgmlBF16) {
    const uint8_t* p = row + 2 * k;
    return __uint_as_float(static_cast<unsigned>(p[0] | (p[1] << 8)) << 16);
  } else if constexpr (TYPE == kGgmlQ4_0 || TYPE == kGgmlQ4_1) {
    constexpr int kBytes = TYPE == kGgmlQ4_0 ? 18 : 20;
    const uint8_t* b = row + (k / 32) * kBytes;
    const int j = static_cast<int>(k % 32);
    const uint8_t* qs = b + (TYPE == kGgmlQ4_0 ? 2 : 4);
    const int q = j < 16 ? (qs[j] & 0x0F) : (qs[j - 16] >> 4);
    if constexpr (TYPE == kGgmlQ4_0) return load_half(b) * static_cast<float>(q - 8);
    else return load_half(b) * static_cast<float>(q) + load_half(b + 2);
  } else if constexpr (TYPE == kGgmlQ5_0 || TYPE == kGgmlQ5_1) {
    constexpr bool kMin = TYPE == kGgmlQ5_1;
    const uint8_t* b = row + (k / 32) * (kMin ? 24 : 22);
    const int j = static_cast<int>(k % 32);
    const uint8_t* qhp = b + (kMin ? 4 : 2);
    const uint32_t qh = qhp[0] | (qhp[1] << 8) | (qhp[2] << 16) | (static_cast<uint32_t>(qhp[3]) << 24);
    const uint8_t* qs = b + (kMin ? 8 : 6);
    const int q = (j < 16 ? (qs[j] & 0x0F) : (qs[j - 16] >> 4)) | (((qh >> j) & 1) << 4);
    const float d = load_half(b);
    return d * static_cast<float>(q) + (kMin ? load_half(b + 2) : -16.f * d);
  } else if constexpr (TYPE == kGgmlQ8_0) {
    const uint8_t* b = row + (k / 32) * 34;
    return load_half(b) * static_cast<float>(reinterpret_cast<const int8_t*>(b + 2)[k % 32]);
  } else if constexpr (TYPE == kGgmlQ4_K || TYPE == kGgmlQ5_K) {
    constexpr int kBytes = TYPE == kGgmlQ4_K ? 144 : 176;
    const uint8_t* b = row + (k / 256) * kBytes;
    const int j = static_cast<int>(k % 256), g = j / 64, within = j % 64, l = within % 32;
    const int sub = 2 * g + (within >= 32);
    const uint8_t* qs = b + (TYPE == kGgmlQ4_K ? 16 : 48);
    int q = within < 32 ? (qs[32 * g + l] & 0x0F) : (qs[32 * g + l] >> 4);
    if constexpr (TYPE == kGgmlQ5_K) q |= ((b[16 + l] >> sub) & 1) << 4;
    int scale, min;
    k_scale_min(sub, b + 4, scale, min);
    return load_half(b) * scale * static_cast<float>(q) - load_half(b + 2) * min;
  } else {  // Q6_K
    const uint8_t* b = row + (k / 256) * 210;
    const int j = static_cast<int>(k % 256), h = j / 128, r = j % 128, quarter = r / 32, l = r % 32;
    const uint8_t* ql = b + 64 * h;
    const uint8_t* qh = b + 128 + 32 * h;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192 + 8 * h);
    const int low = (quarter & 1) ? ql[l + 32] : ql[l];
    const int nibble = quarter < 2 ? (low & 0x0F) : (low >> 4);
    const int q = (nibble | (((qh[l] >> (2 * quarter)) & 3) << 4)) - 32;
    return load_half(b + 208) * sc[l / 16 + 2 * quarter] * static_cast<float>(q);
  }
}

constexpr int kQuantWarps = 4;   // weight rows per CTA
constexpr int kQuantTokens = 8;  // activation rows per CTA

// grid (ceil(N / kQuantWarps), ceil(T / kQuantTokens)), block 32 * kQuantWarps.
template <int TYPE>
__global__ void quant_matmul_kernel(const float* __restrict__ x, int64_t ldx, const uint8_t* __restrict__ weight,
                                    int64_t row_bytes, const float* __restrict__ bias, float* __restrict__ y,
                                    int64_t ldy, int64_t T, int64_t K, int64_t N) {
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kQuantWarps + threadIdx.x / 32;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * kQuantTokens;
  if (n >= N) return;
  const int tokens = static_cast<int>(T - t0 < kQuantTokens ? T - t0 : kQuantTokens);
  const uint8_t* row = weight + n * row_bytes;
  float acc[kQuantTokens];
#pragma unroll
  for (int t = 0; t < kQuantTokens; ++t) acc[t] = 0.f;
  for (int64_t k = lane; k < K; k += 32) {
    const float w = weight_at<TYPE>(row, k);
#pragma unroll
    for (int t = 0; t < kQuantTokens; ++t)
      if (t < tokens) acc[t] += w * x[(t0 + t) * ldx + k];
  }
#pragma unroll
  for (int t = 0; t < kQuantTokens; ++t) {
    float s = acc[t];
    for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
    if (lane == 0 && t < tokens) y[(t0 + t) * ldy + n] = s + (bias != nullptr ? bias[n] : 0.f);
  }
}

}  // namespace fastllm::cuda

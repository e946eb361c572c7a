// fp32 CPU kernels of the decoder layer's elementwise ops (see fused_ops.h). The loops
// are written for the compiler's vectorizer (`omp simd`); the ops are a few microseconds
// a row, so what they save is the several torch ops (and their dispatch) each replaces.
#include "fastllm/cpu/fused_ops.h"

#include <algorithm>
#include <cmath>

#include "fastllm/cpu/parallel.h"
#include "fastllm/cpu/quant.h"

namespace fastllm::cpu {

// cpu_fused_ops_avx2.cc
bool fused_ops_avx2_supported();
void silu_and_mul_row_avx2(float* out, const float* gate, const float* up, int64_t I);

namespace {

// Rows per pool chunk: ~64 KiB of activations, so a decode step's one row runs inline.
int64_t row_grain(int64_t row_elems) { return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(row_elems, 1)); }

void norm_row(float* out, const float* x, const float* weight, int64_t H, float eps) {
  // The mean of squares in double, rounded once: within an ulp of HF's fp32 mean whatever
  // order either sums in.
  double sum_sq = 0.0;
#pragma omp simd reduction(+ : sum_sq)
  for (int64_t i = 0; i < H; ++i) sum_sq += static_cast<double>(x[i]) * x[i];
  const float mean_sq = static_cast<float>(sum_sq / static_cast<double>(H));
  const float inv = 1.f / std::sqrt(mean_sq + eps);
#pragma omp simd
  for (int64_t i = 0; i < H; ++i) out[i] = weight[i] * (x[i] * inv);
}

void rotate_head(float* x, const float* cos, const float* sin, int64_t half) {
  float* x1 = x;
  float* x2 = x + half;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float a = x1[i], b = x2[i];
    x1[i] = a * cos[i] - b * sin[i];
    x2[i] = b * cos[i] + a * sin[i];
  }
}

}  // namespace

void rms_norm_f32(float* out, const float* x, const float* weight, int64_t T, int64_t H, float eps) {
  parallel_for(T, row_grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) norm_row(out + t * H, x + t * H, weight, H, eps);
  });
}

void fused_add_rms_norm_f32(float* x, float* residual, const float* weight, int64_t T, int64_t H, float eps) {
  parallel_for(T, row_grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* xr = x + t * H;
      float* rr = residual + t * H;
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) rr[i] += xr[i];
      norm_row(xr, rr, weight, H, eps);
    }
  });
}

void silu_and_mul_f32(float* out, const float* x, int64_t T, int64_t I) {
  if (fused_ops_avx2_supported() && !cpu_generic_forced()) {
    parallel_for(T, row_grain(2 * I), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) silu_and_mul_row_avx2(out + t * I, x + t * 2 * I, x + t * 2 * I + I, I);
    });
    return;
  }
  parallel_for(T, row_grain(2 * I), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* gate = x + t * 2 * I;
      const float* up = gate + I;
      float* o = out + t * I;
      for (int64_t i = 0; i < I; ++i) o[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
    }
  });
}

void rotary_embedding_f32(float* query, float* key, const float* cos, const float* sin, int64_t T, int64_t Hq,
                          int64_t Hk, int64_t D, int64_t q_stride, int64_t k_stride) {
  const int64_t half = D / 2;
  parallel_for(T, row_grain((Hq + Hk) * D), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cos + t * half;
      const float* s = sin + t * half;
      for (int64_t h = 0; h < Hq; ++h) rotate_head(query + t * q_stride + h * D, c, s, half);
      for (int64_t h = 0; h < Hk; ++h) rotate_head(key + t * k_stride + h * D, c, s, half);
    }
  });
}

}  // namespace fastllm::cpu

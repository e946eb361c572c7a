// cpu::Decoder (one Llama decoder layer, F32 weights) against a double-precision
// reference of the same math written here: RMSNorm, fused qkv (two segments, with bias),
// rotate-half RoPE, GQA causal attention over a paged cache holding earlier tokens,
// o_proj, the second norm, SiLU-gated MLP.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "fastllm/cpu/decoder.h"

using namespace fastllm::cpu;

namespace {

constexpr int64_t H = 32, Hq = 4, Hkv = 2, D = 8, I = 48, kBlock = 4, kNumBlocks = 6;
constexpr int64_t Q = Hq * D, KV = Hkv * D;
constexpr float kEps = 1e-5f;

std::vector<float> random_vector(std::mt19937& rng, int64_t n, float scale = 1.f) {
  std::normal_distribution<float> dist(0.f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// y [T, N] = x [T, K] @ W [N, K]^T (+ bias)
std::vector<double> matmul(const std::vector<double>& x, const std::vector<float>& w, const float* bias, int64_t T,
                           int64_t K, int64_t N) {
  std::vector<double> y(T * N);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t n = 0; n < N; ++n) {
      double acc = bias ? bias[n] : 0.0;
      for (int64_t k = 0; k < K; ++k) acc += x[t * K + k] * w[n * K + k];
      y[t * N + n] = acc;
    }
  }
  return y;
}

std::vector<double> rms_norm(const std::vector<double>& x, const std::vector<float>& w, int64_t T) {
  std::vector<double> y(T * H);
  for (int64_t t = 0; t < T; ++t) {
    double ss = 0;
    for (int64_t i = 0; i < H; ++i) ss += x[t * H + i] * x[t * H + i];
    const double inv = 1.0 / std::sqrt(ss / H + kEps);
    for (int64_t i = 0; i < H; ++i) y[t * H + i] = w[i] * x[t * H + i] * inv;
  }
  return y;
}

void rope(double* head, const float* cos, const float* sin) {
  for (int64_t i = 0; i < D / 2; ++i) {
    const double a = head[i], b = head[i + D / 2];
    head[i] = a * cos[i] - b * sin[i];
    head[i + D / 2] = b * cos[i] + a * sin[i];
  }
}

struct Fixture {
  std::mt19937 rng{7};
  std::vector<float> in_norm = random_vector(rng, H, 0.5f), post_norm = random_vector(rng, H, 0.5f);
  std::vector<float> w_qkv = random_vector(rng, (Q + 2 * KV) * H, 0.3f), b_qkv = random_vector(rng, Q + 2 * KV);
  std::vector<float> w_o = random_vector(rng, H * Q, 0.3f), w_gu = random_vector(rng, 2 * I * H, 0.3f);
  std::vector<float> w_down = random_vector(rng, H * I, 0.3f);
  std::vector<float> k_cache = random_vector(rng, kNumBlocks * kBlock * KV);
  std::vector<float> v_cache = random_vector(rng, kNumBlocks * kBlock * KV);
};

LinearParams linear(const std::vector<float>& w, const float* bias, int64_t in, int64_t out,
                    std::vector<int64_t> split) {
  LinearParams p{{}, bias, in, out};
  int64_t row = 0;
  for (int64_t rows : split) {
    p.segments.push_back({reinterpret_cast<const uint8_t*>(w.data() + row * in), QuantType::kF32, rows});
    row += rows;
  }
  return p;
}

}  // namespace

TEST(CpuDecoder, OneLayerMatchesDoubleReference) {
  Fixture f;
  // One sequence: P = 5 tokens already cached, T = 2 new ones; its blocks in shuffled order.
  const int64_t P = 5, T = 2, L = P + T;
  const int32_t table[2] = {4, 1};
  auto slot = [&](int64_t pos) { return int64_t{table[pos / kBlock]} * kBlock + pos % kBlock; };
  std::vector<float> hidden = random_vector(f.rng, T * H), residual(T * H);
  std::vector<float> cos(T * D / 2), sin(T * D / 2);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < D / 2; ++i) {
      cos[t * D / 2 + i] = std::cos((P + t) * 0.3f * (i + 1));
      sin[t * D / 2 + i] = std::sin((P + t) * 0.3f * (i + 1));
    }
  }
  const int64_t slots[T] = {slot(P), slot(P + 1)};
  const int32_t seq_lens[1] = {static_cast<int32_t>(L)}, qsl[2] = {0, static_cast<int32_t>(T)};

  // -- the reference, in double on the same inputs (the cache's earlier tokens included) --
  std::vector<double> x(hidden.begin(), hidden.end());
  std::vector<double> qkv = matmul(rms_norm(x, f.in_norm, T), f.w_qkv, f.b_qkv.data(), T, H, Q + 2 * KV);
  std::vector<double> keys(L * KV), values(L * KV);
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t i = 0; i < KV; ++i) {
      keys[p * KV + i] = f.k_cache[slot(p) * KV + i];
      values[p * KV + i] = f.v_cache[slot(p) * KV + i];
    }
  }
  for (int64_t t = 0; t < T; ++t) {
    double* row = qkv.data() + t * (Q + 2 * KV);
    for (int64_t h = 0; h < Hq + Hkv; ++h) rope(row + h * D, &cos[t * D / 2], &sin[t * D / 2]);
    for (int64_t i = 0; i < KV; ++i) {
      keys[(P + t) * KV + i] = row[Q + i];
      values[(P + t) * KV + i] = row[Q + KV + i];
    }
  }
  std::vector<double> attn(T * Q, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t kvh = h / (Hq / Hkv), visible = P + t + 1;
      std::vector<double> s(visible);
      double mx = -1e300, sum = 0;
      for (int64_t j = 0; j < visible; ++j) {
        double dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += qkv[t * (Q + 2 * KV) + h * D + d] * keys[j * KV + kvh * D + d];
        s[j] = dot / std::sqrt(double(D));
        mx = std::max(mx, s[j]);
      }
      for (int64_t j = 0; j < visible; ++j) sum += (s[j] = std::exp(s[j] - mx));
      for (int64_t j = 0; j < visible; ++j) {
        for (int64_t d = 0; d < D; ++d) attn[t * Q + h * D + d] += s[j] / sum * values[j * KV + kvh * D + d];
      }
    }
  }
  std::vector<double> o = matmul(attn, f.w_o, nullptr, T, Q, H), stream(T * H);
  for (int64_t i = 0; i < T * H; ++i) stream[i] = x[i] + o[i];
  std::vector<double> gu = matmul(rms_norm(stream, f.post_norm, T), f.w_gu, nullptr, T, H, 2 * I), act(T * I);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < I; ++i) {
      const double g = gu[t * 2 * I + i];
      act[t * I + i] = g / (1 + std::exp(-g)) * gu[t * 2 * I + I + i];
    }
  }
  const std::vector<double> want = matmul(act, f.w_down, nullptr, T, I, H);

  // -- the decoder: q | k and v as two weight segments, the bias across both --
  DecoderLayerParams layer;
  layer.input_norm = f.in_norm.data();
  layer.post_norm = f.post_norm.data();
  layer.qkv = linear(f.w_qkv, f.b_qkv.data(), H, Q + 2 * KV, {Q + KV, KV});
  layer.o = linear(f.w_o, nullptr, Q, H, {H});
  layer.gate_up = linear(f.w_gu, nullptr, H, 2 * I, {2 * I});
  layer.down = linear(f.w_down, nullptr, I, H, {H});
  Decoder decoder(DecoderShape{H, Hq, Hkv, D, I, kEps, 1.f / std::sqrt(float(D))}, {layer});
  decoder.bind_caches({f.k_cache.data(), f.v_cache.data()}, kBlock);
  DecoderStep step{T, hidden.data(), residual.data(), false, cos.data(), sin.data(), slots, table, seq_lens, qsl,
                   1, 2};
  decoder.forward(step);

  for (int64_t i = 0; i < T * H; ++i) {
    EXPECT_NEAR(hidden[i], want[i], 1e-4 * (1 + std::abs(want[i]))) << "hidden " << i;
    EXPECT_NEAR(residual[i], stream[i], 1e-4 * (1 + std::abs(stream[i]))) << "residual " << i;
  }
  for (int64_t t = 0; t < T; ++t) {  // the new tokens' rotated keys and values are cached
    for (int64_t i = 0; i < KV; ++i) {
      EXPECT_NEAR(f.k_cache[slots[t] * KV + i], keys[(P + t) * KV + i], 1e-4 * (1 + std::abs(keys[(P + t) * KV + i])));
      EXPECT_NEAR(f.v_cache[slots[t] * KV + i], values[(P + t) * KV + i], 1e-4 * (1 + std::abs(values[(P + t) * KV + i])));
    }
  }
}

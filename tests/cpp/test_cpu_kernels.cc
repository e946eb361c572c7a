// CPU kernels against straightforward double-precision references written here.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "fastllm/cpu/float16.h"
#include "fastllm/cpu/kernels.h"

using namespace fastllm::cpu;

TEST(Float16, RoundTripsKnownValues) {
  EXPECT_EQ(from_float<Half>(1.0f).bits, 0x3C00);
  EXPECT_EQ(from_float<Half>(-2.5f).bits, 0xC100);
  EXPECT_EQ(from_float<Half>(65504.f).bits, 0x7BFF);
  EXPECT_EQ(from_float<Half>(1e6f).bits, 0x7C00);             // overflow -> inf
  EXPECT_EQ(from_float<Half>(5.960464477539063e-08f).bits, 1);  // smallest subnormal
  EXPECT_FLOAT_EQ(to_float(Half{0x0001}), 5.960464477539063e-08f);
  EXPECT_FLOAT_EQ(to_float(Half{0x3555}), 0.333251953125f);
  EXPECT_EQ(from_float<BFloat16>(1.0f).bits, 0x3F80);
  EXPECT_FLOAT_EQ(to_float(from_float<BFloat16>(3.140625f)), 3.140625f);
  for (float x : {0.1f, -7.3f, 1234.5f, 1e-6f}) {
    EXPECT_NEAR(to_float(from_float<Half>(x)), x, std::abs(x) * 1e-3 + 1e-7);
    EXPECT_NEAR(to_float(from_float<BFloat16>(x)), x, std::abs(x) * 8e-3);
  }
}

TEST(ReshapeAndCache, WritesRowsAtSlotsAndSkipsPadding) {
  const int64_t T = 5, row = 6, num_slots = 12;
  std::vector<float> key(T * row), value(T * row), kc(num_slots * row, -1.f), vc(num_slots * row, -1.f);
  std::iota(key.begin(), key.end(), 0.f);
  std::iota(value.begin(), value.end(), 100.f);
  const int64_t slots[T] = {7, -1, 0, 11, 3};
  reshape_and_cache(key.data(), value.data(), kc.data(), vc.data(), slots, T, row, row, row, sizeof(float));
  for (int64_t t = 0; t < T; ++t) {
    if (slots[t] < 0) continue;
    for (int64_t i = 0; i < row; ++i) {
      EXPECT_EQ(kc[slots[t] * row + i], key[t * row + i]);
      EXPECT_EQ(vc[slots[t] * row + i], value[t * row + i]);
    }
  }
  EXPECT_EQ(kc[1 * row], -1.f);  // untouched slot
}

TEST(ReshapeAndCache, ReadsStridedRowsOfAFusedQkvBuffer) {
  // qkv [T, q | k | v] of 2-byte elements: k and v are views with token stride 10 and
  // rows of 3 (an odd row, so no width assumption holds), at offsets 4 and 7.
  const int64_t T = 4, q = 4, row = 3, stride = q + 2 * row, num_slots = 6;
  std::vector<uint16_t> qkv(T * stride), kc(num_slots * row, 0xFFFF), vc(num_slots * row, 0xFFFF);
  std::iota(qkv.begin(), qkv.end(), uint16_t{1});
  const int64_t slots[T] = {5, 0, -1, 2};
  reshape_and_cache(qkv.data() + q, qkv.data() + q + row, kc.data(), vc.data(), slots, T, row, stride, stride,
                    sizeof(uint16_t));
  for (int64_t t = 0; t < T; ++t) {
    if (slots[t] < 0) continue;
    for (int64_t i = 0; i < row; ++i) {
      EXPECT_EQ(kc[slots[t] * row + i], qkv[t * stride + q + i]) << "token " << t << " elem " << i;
      EXPECT_EQ(vc[slots[t] * row + i], qkv[t * stride + q + row + i]) << "token " << t << " elem " << i;
    }
  }
  for (int64_t s : {1, 3, 4}) EXPECT_EQ(kc[s * row], 0xFFFF) << "slot " << s << " was not to be written";
  // Key and value with different strides (a contiguous value beside a strided key).
  std::vector<uint16_t> value(T * row);
  std::iota(value.begin(), value.end(), uint16_t{500});
  reshape_and_cache(qkv.data() + q, value.data(), kc.data(), vc.data(), slots, T, row, stride, row, sizeof(uint16_t));
  EXPECT_EQ(vc[2 * row + 1], value[3 * row + 1]);
  EXPECT_EQ(kc[2 * row + 1], qkv[3 * stride + q + 1]);
}

struct AttentionCase {
  std::vector<int32_t> seq_lens, q_lens;
  int64_t num_heads, num_kv_heads, head_dim, block_size;
};

class PagedAttention : public ::testing::TestWithParam<AttentionCase> {};

TEST_P(PagedAttention, MatchesDoubleReference) {
  const AttentionCase c = GetParam();
  std::mt19937 rng(42);
  std::normal_distribution<float> normal;
  const int64_t S = c.seq_lens.size(), D = c.head_dim, H = c.num_heads, Hkv = c.num_kv_heads, BS = c.block_size;
  int64_t max_blocks = 0, total_blocks = 0;
  for (int32_t len : c.seq_lens) {
    max_blocks = std::max<int64_t>(max_blocks, (len + BS - 1) / BS);
    total_blocks += (len + BS - 1) / BS;
  }
  const int64_t num_blocks = total_blocks + 3;
  std::vector<int32_t> perm(num_blocks);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);  // block tables in shuffled order
  std::vector<int32_t> tables(S * max_blocks, 0), qsl(S + 1, 0);
  int64_t next = 0;
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t b = 0; b < (c.seq_lens[s] + BS - 1) / BS; ++b) tables[s * max_blocks + b] = perm[next++];
    qsl[s + 1] = qsl[s] + c.q_lens[s];
  }
  const int64_t T = qsl[S];
  std::vector<float> q(T * H * D), kc(num_blocks * BS * Hkv * D), vc(kc.size()), out(T * H * D);
  for (auto* v : {&q, &kc, &vc}) for (float& x : *v) x = normal(rng);
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  paged_attention<float>(out.data(), q.data(), kc.data(), vc.data(), tables.data(), c.seq_lens.data(), qsl.data(),
                         {T, S, H, Hkv, D, BS, max_blocks}, scale);

  for (int64_t s = 0; s < S; ++s) {
    for (int64_t i = 0; i < c.q_lens[s]; ++i) {
      const int64_t t = qsl[s] + i, pos = c.seq_lens[s] - c.q_lens[s] + i;
      for (int64_t h = 0; h < H; ++h) {
        const int64_t kvh = h / (H / Hkv);
        std::vector<double> scores(pos + 1);
        double m = -1e300, sum = 0;
        for (int64_t j = 0; j <= pos; ++j) {
          const int64_t slot = tables[s * max_blocks + j / BS] * BS + j % BS;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += double(q[(t * H + h) * D + d]) * kc[(slot * Hkv + kvh) * D + d];
          scores[j] = dot * scale;
          m = std::max(m, scores[j]);
        }
        for (double& x : scores) { x = std::exp(x - m); sum += x; }
        for (int64_t d = 0; d < D; ++d) {
          double ref = 0;
          for (int64_t j = 0; j <= pos; ++j) {
            const int64_t slot = tables[s * max_blocks + j / BS] * BS + j % BS;
            ref += scores[j] / sum * vc[(slot * Hkv + kvh) * D + d];
          }
          ASSERT_NEAR(out[(t * H + h) * D + d], ref, 1e-5 * (1 + std::abs(ref))) << "s=" << s << " i=" << i;
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, PagedAttention,
    ::testing::Values(AttentionCase{{1, 17, 33}, {1, 1, 1}, 8, 8, 64, 16},        // decode, MHA
                      AttentionCase{{9, 40}, {9, 40}, 8, 2, 64, 4},               // prefill, GQA 4
                      AttentionCase{{23, 5, 70}, {7, 1, 12}, 16, 2, 128, 16},     // chunked + decode, GQA 8
                      AttentionCase{{3, 31}, {2, 5}, 3, 1, 32, 32}));             // odd sizes, MQA

TEST(FusedSoftmax, CausalRowsMatchReferenceAndMaskedRowsAreZero) {
  const int64_t batch = 2, rows = 5, cols = 7, offset = -1;
  const float scale = 0.7f;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.f, 3.f);
  std::vector<float> x(batch * rows * cols), y(x.size());
  for (float& v : x) v = normal(rng);
  fused_softmax<float>(y.data(), x.data(), nullptr, batch * rows, cols, rows, scale, true, offset);
  for (int64_t r = 0; r < batch * rows; ++r) {
    const int64_t visible = std::max<int64_t>(0, std::min<int64_t>(cols, r % rows + offset + 1));
    double m = -1e300, sum = 0;
    for (int64_t c = 0; c < visible; ++c) m = std::max(m, double(x[r * cols + c]) * scale);
    for (int64_t c = 0; c < visible; ++c) sum += std::exp(double(x[r * cols + c]) * scale - m);
    for (int64_t c = 0; c < cols; ++c) {
      const double ref = c < visible ? std::exp(double(x[r * cols + c]) * scale - m) / sum : 0.0;
      ASSERT_NEAR(y[r * cols + c], ref, 1e-6) << "row " << r << " col " << c;
    }
  }
}

TEST(FusedSoftmax, Bfloat16WithinTolerance) {
  const int64_t rows = 3, cols = 1000;
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  std::vector<BFloat16> x(rows * cols), y(x.size());
  for (auto& v : x) v = from_float<BFloat16>(normal(rng));
  fused_softmax<BFloat16>(y.data(), x.data(), nullptr, rows, cols, rows, 1.f, false, 0);
  for (int64_t r = 0; r < rows; ++r) {
    double m = -1e300, sum = 0, total = 0;
    for (int64_t c = 0; c < cols; ++c) m = std::max(m, double(to_float(x[r * cols + c])));
    for (int64_t c = 0; c < cols; ++c) sum += std::exp(to_float(x[r * cols + c]) - m);
    for (int64_t c = 0; c < cols; ++c) {
      const double ref = std::exp(to_float(x[r * cols + c]) - m) / sum;
      ASSERT_NEAR(to_float(y[r * cols + c]), ref, 1e-2 * ref + 1e-6);
      total += to_float(y[r * cols + c]);
    }
    EXPECT_NEAR(total, 1.0, 1e-2);
  }
}

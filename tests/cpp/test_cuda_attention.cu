// CUDA paged attention (decode + tensor-core prefill paths) against the CPU kernel on the
// same bf16 inputs; skipped on machines without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "fastllm/cpu/float16.h"
#include "fastllm/cpu/kernels.h"
#include "fastllm/cuda/launchers.h"
#include "fastllm/cuda/testing.h"

namespace {

using fastllm::cpu::BFloat16;

template <typename T>
T* to_device(const std::vector<T>& host) {
  T* ptr = nullptr;
  cudaMalloc(&ptr, host.size() * sizeof(T));
  cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  return ptr;
}

enum class Variant { kLibrary, kLds };  // the prefill kernel's fragment loads: ldmatrix, or the test-only lds

// Runs one planned call on the device; returns the output.
std::vector<BFloat16> run_on_device(const fastllm::PagedAttentionShape& shape, int max_query_len, Variant variant,
                                    const std::vector<BFloat16>& q, const std::vector<BFloat16>& kc,
                                    const std::vector<BFloat16>& vc, const std::vector<int32_t>& tables,
                                    const std::vector<int32_t>& seq_lens, const std::vector<int32_t>& qsl, float scale) {
  std::vector<BFloat16> got(q.size());
  auto *dq = to_device(q), *dkc = to_device(kc), *dvc = to_device(vc), *dout = to_device(got);
  auto *dtables = to_device(tables), *dlens = to_device(seq_lens), *dqsl = to_device(qsl);
  fastllm::cuda::PagedAttentionParams params;
  params.dtype = fastllm::DType::kBF16;
  params.shape = shape;
  params.out = dout;
  params.query = dq;
  params.q_token_stride = shape.num_heads * shape.head_dim;
  params.k_cache = dkc;
  params.v_cache = dvc;
  params.block_tables = dtables;
  params.seq_lens = dlens;
  params.query_start_loc = dqsl;
  params.scale = scale;
  params.plan = fastllm::cuda::plan_paged_attention(params.dtype, shape, max_query_len);
  EXPECT_EQ(params.plan.shape, shape);
  if (params.plan.workspace_bytes) cudaMalloc(&params.workspace, params.plan.workspace_bytes);
  const cudaError_t err = variant == Variant::kLibrary ? fastllm::cuda::paged_attention(params, nullptr)
                                                       : fastllm::cuda::testing::paged_attention_lds(params, nullptr);
  EXPECT_EQ(err, cudaSuccess);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  cudaMemcpy(got.data(), dout, got.size() * sizeof(BFloat16), cudaMemcpyDeviceToHost);
  for (void* p : {(void*)dq, (void*)dkc, (void*)dvc, (void*)dout, (void*)dtables, (void*)dlens, (void*)dqsl,
                  params.workspace})
    cudaFree(p);
  return got;
}

// One mixed step: a decode, a 150-token prompt (several 64-row query tiles per KV head),
// and a 70-token chunk over a 200-token prefix; shuffled blocks of 16. Returns the
// device output after checking it against the CPU kernel.
std::vector<BFloat16> run_case(int num_heads, int num_kv_heads, int head_dim, int max_query_len, Variant variant) {
  const std::vector<int32_t> seq_lens{33, 150, 270}, q_lens{1, 150, 70};
  const int S = 3, BS = 16;
  std::vector<int32_t> qsl(S + 1, 0);
  for (int s = 0; s < S; ++s) qsl[s + 1] = qsl[s] + q_lens[s];
  const int T = qsl[S];
  int max_blocks = 0, num_blocks = 0;
  for (int n : seq_lens) max_blocks = std::max(max_blocks, (n + BS - 1) / BS), num_blocks += (n + BS - 1) / BS;
  std::vector<int32_t> perm(num_blocks);
  std::iota(perm.begin(), perm.end(), 0);
  std::mt19937 rng(3);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int32_t> tables(S * max_blocks, 0);
  for (int s = 0, next = 0; s < S; ++s)
    for (int b = 0; b < (seq_lens[s] + BS - 1) / BS; ++b) tables[s * max_blocks + b] = perm[next++];
  std::normal_distribution<float> normal;
  auto random_bf16 = [&](size_t n) {
    std::vector<BFloat16> v(n);
    for (auto& x : v) x = fastllm::cpu::from_float<BFloat16>(normal(rng));
    return v;
  };
  const size_t cache_elems = size_t(num_blocks) * BS * num_kv_heads * head_dim;
  auto q = random_bf16(size_t(T) * num_heads * head_dim), kc = random_bf16(cache_elems), vc = random_bf16(cache_elems);
  std::vector<BFloat16> ref(q.size());
  const float scale = 1.f / std::sqrt(float(head_dim));
  const fastllm::PagedAttentionShape shape{T, S, num_heads, num_kv_heads, head_dim, BS, max_blocks};
  fastllm::cpu::paged_attention(ref.data(), q.data(), kc.data(), vc.data(), tables.data(), seq_lens.data(), qsl.data(),
                                shape, scale);
  const auto got = run_on_device(shape, max_query_len, variant, q, kc, vc, tables, seq_lens, qsl, scale);
  double err = 0, norm = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = double(fastllm::cpu::to_float(got[i])) - fastllm::cpu::to_float(ref[i]);
    err += d * d;
    norm += double(fastllm::cpu::to_float(ref[i])) * fastllm::cpu::to_float(ref[i]);
  }
  EXPECT_LT(std::sqrt(err / norm), 1e-2) << "H=" << num_heads << " Hkv=" << num_kv_heads << " D=" << head_dim
                                         << " max_query_len=" << max_query_len
                                         << " lds=" << (variant == Variant::kLds);
  return got;
}

bool bitwise_equal(const std::vector<BFloat16>& a, const std::vector<BFloat16>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(BFloat16)) == 0;
}

}  // namespace

TEST(CudaPagedAttention, MixedStepMatchesCpu) {
  if (fastllm::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (Variant variant : {Variant::kLibrary, Variant::kLds}) {  // both fragment loads of the prefill kernel
    for (int max_query_len : {150, 1, -1}) {  // tensor-core prefill + decode; decode kernel alone; unknown
      run_case(32, 8, 128, max_query_len, variant);
      run_case(9, 3, 64, max_query_len, variant);
      run_case(4, 4, 64, max_query_len, variant);
    }
  }
}

// ldmatrix and plain shared loads fill the same fragments, fed to the same mma in the
// same order: any difference is a fragment-layout bug, not rounding.
TEST(CudaPagedAttention, PrefillVariantsAreBitwiseEqual) {
  if (fastllm::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (int head_dim : fastllm::kPagedAttentionHeadDims) {
    EXPECT_TRUE(bitwise_equal(run_case(32, 8, head_dim, 150, Variant::kLibrary),
                              run_case(32, 8, head_dim, 150, Variant::kLds)))
        << "head_dim " << head_dim;
  }
}

// The plan: decode-only steps stay off the prefill kernel; a prompt in bf16 goes to it;
// a batch-1 decode over a long context splits, with a workspace sized for the partials.
TEST(CudaPagedAttention, PlanPicksKernelsAndSplits) {
  if (fastllm::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  using fastllm::DType;
  const fastllm::PagedAttentionShape decode{1, 1, 32, 8, 128, 16, 2048};
  const auto p = fastllm::cuda::plan_paged_attention(DType::kBF16, decode, 1);
  EXPECT_FALSE(p.prefill_kernel);
  EXPECT_GT(p.num_splits, 1);
  EXPECT_EQ(p.workspace_bytes, int64_t(1) * 32 * p.num_splits * (128 + 2) * 4);
  EXPECT_EQ(p.keys_per_split % 256, 0);
  EXPECT_GE(p.keys_per_split * p.num_splits, 2048 * 16);
  const fastllm::PagedAttentionShape prompt{512, 1, 32, 8, 128, 16, 32};
  EXPECT_TRUE(fastllm::cuda::plan_paged_attention(DType::kBF16, prompt, 512).prefill_kernel);
  EXPECT_TRUE(fastllm::cuda::plan_paged_attention(DType::kBF16, prompt, -1).prefill_kernel);
  EXPECT_FALSE(fastllm::cuda::plan_paged_attention(DType::kF32, prompt, 512).prefill_kernel);
  EXPECT_FALSE(fastllm::cuda::plan_paged_attention(DType::kBF16, prompt, 1).prefill_kernel);
}

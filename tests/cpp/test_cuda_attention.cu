// CUDA paged attention (decode + tensor-core prefill paths) against the CPU kernel on the
// same bf16 inputs; skipped on machines without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "fastllm/cpu/float16.h"
#include "fastllm/cpu/kernels.h"
#include "fastllm/cuda/launchers.h"

namespace {

using fastllm::cpu::BFloat16;

template <typename T>
T* to_device(const std::vector<T>& host) {
  T* ptr = nullptr;
  cudaMalloc(&ptr, host.size() * sizeof(T));
  cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  return ptr;
}

// One mixed step: a decode, a 150-token prompt (several 64-row query tiles per KV head),
// and a 70-token chunk over a 200-token prefix; shuffled blocks of 16.
void run_case(int num_heads, int num_kv_heads, int head_dim, int max_query_len) {
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
  std::vector<BFloat16> ref(q.size()), got(q.size());
  const float scale = 1.f / std::sqrt(float(head_dim));
  fastllm::cpu::paged_attention(ref.data(), q.data(), kc.data(), vc.data(), tables.data(), seq_lens.data(), qsl.data(),
                                {T, S, num_heads, num_kv_heads, head_dim, BS, max_blocks}, scale);

  auto *dq = to_device(q), *dkc = to_device(kc), *dvc = to_device(vc), *dout = to_device(got);
  auto *dtables = to_device(tables), *dlens = to_device(seq_lens), *dqsl = to_device(qsl);
  const size_t ws_bytes = fastllm::cuda::paged_attention_workspace_bytes(T, num_heads, head_dim, max_blocks, BS);
  void* ws = nullptr;
  if (ws_bytes) cudaMalloc(&ws, ws_bytes);
  ASSERT_EQ(fastllm::cuda::paged_attention(fastllm::cuda::ScalarType::kBF16, dout, dq, int64_t(num_heads) * head_dim,
                                           dkc, dvc, dtables, dlens, dqsl, T, S, max_query_len, num_heads,
                                           num_kv_heads, head_dim, BS, max_blocks, scale, ws, ws_bytes, nullptr),
            cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  cudaMemcpy(got.data(), dout, got.size() * sizeof(BFloat16), cudaMemcpyDeviceToHost);
  double err = 0, norm = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = double(fastllm::cpu::to_float(got[i])) - fastllm::cpu::to_float(ref[i]);
    err += d * d;
    norm += double(fastllm::cpu::to_float(ref[i])) * fastllm::cpu::to_float(ref[i]);
  }
  EXPECT_LT(std::sqrt(err / norm), 1e-2) << "H=" << num_heads << " Hkv=" << num_kv_heads << " D=" << head_dim
                                         << " max_query_len=" << max_query_len;
  for (void* p : {(void*)dq, (void*)dkc, (void*)dvc, (void*)dout, (void*)dtables, (void*)dlens, (void*)dqsl, ws})
    cudaFree(p);
}

}  // namespace

TEST(CudaPagedAttention, MixedStepMatchesCpu) {
  if (fastllm::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (bool ldmatrix : {true, false}) {  // both fragment-load variants of the prefill kernel
    fastllm::cuda::set_paged_prefill_ldmatrix(ldmatrix);
    for (int max_query_len : {150, 1, -1}) {  // tensor-core prefill + decode; decode kernel alone; unknown
      run_case(32, 8, 128, max_query_len);
      run_case(9, 3, 64, max_query_len);
      run_case(4, 4, 64, max_query_len);
    }
  }
  fastllm::cuda::set_paged_prefill_ldmatrix(true);
}

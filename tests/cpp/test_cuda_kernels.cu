// CUDA kernels against the CPU kernels; skipped on machines without a GPU.
#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "fastllm/cpu/kernels.h"
#include "fastllm/cuda/launchers.h"

#define SKIP_WITHOUT_GPU() \
  if (fastllm::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"

TEST(CudaReshapeAndCache, MatchesCpu) {
  SKIP_WITHOUT_GPU();
  for (int64_t row_elems : {128, 6, 1024}) {  // 16-byte, 4-byte and wide rows
    const int64_t T = 9, num_slots = 40;
    std::vector<float> key(T * row_elems), value(key.size()), kc(num_slots * row_elems, 0.f), vc(kc.size(), 0.f);
    std::iota(key.begin(), key.end(), 1.f);
    std::iota(value.begin(), value.end(), -5000.f);
    std::vector<int64_t> slots{3, -1, 39, 0, 17, 18, 5, -1, 22};
    std::vector<float> ref_k = kc, ref_v = vc;
    fastllm::cpu::reshape_and_cache(key.data(), value.data(), ref_k.data(), ref_v.data(), slots.data(), T,
                                    row_elems * sizeof(float));
    float *dk, *dv, *dkc, *dvc;
    int64_t* ds;
    ASSERT_EQ(cudaMalloc(&dk, key.size() * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&dv, value.size() * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&dkc, kc.size() * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&dvc, vc.size() * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&ds, slots.size() * 8), cudaSuccess);
    cudaMemcpy(dk, key.data(), key.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(dv, value.data(), value.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(dkc, kc.data(), kc.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(dvc, vc.data(), vc.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(ds, slots.data(), slots.size() * 8, cudaMemcpyHostToDevice);
    ASSERT_EQ(fastllm::cuda::reshape_and_cache(dk, dv, dkc, dvc, ds, T, row_elems * 4, nullptr), cudaSuccess);
    cudaMemcpy(kc.data(), dkc, kc.size() * 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(vc.data(), dvc, vc.size() * 4, cudaMemcpyDeviceToHost);
    EXPECT_EQ(kc, ref_k);
    EXPECT_EQ(vc, ref_v);
    for (void* p : {(void*)dk, (void*)dv, (void*)dkc, (void*)dvc, (void*)ds}) cudaFree(p);
  }
}

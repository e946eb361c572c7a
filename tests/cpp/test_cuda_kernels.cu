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
    fastllm::cpu::reshape_and_cache(key.data(), value.data(), ref_k.data(), ref_v.data(), slots.data(), T, row_elems,
                                    row_elems, row_elems, sizeof(float));
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
    ASSERT_EQ(fastllm::cuda::reshape_and_cache(dk, dv, dkc, dvc, ds, T, row_elems, row_elems, row_elems, 4, nullptr),
              cudaSuccess);
    cudaMemcpy(kc.data(), dkc, kc.size() * 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(vc.data(), dvc, vc.size() * 4, cudaMemcpyDeviceToHost);
    EXPECT_EQ(kc, ref_k);
    EXPECT_EQ(vc, ref_v);
    for (void* p : {(void*)dk, (void*)dv, (void*)dkc, (void*)dvc, (void*)ds}) cudaFree(p);
  }
}

TEST(CudaReshapeAndCache, StridedRowsMatchCpu) {
  SKIP_WITHOUT_GPU();
  // Views of a 2-byte [T, q | k | v] buffer: 16-byte aligned rows (row 64, stride 256)
  // take the vector path; row 6 / stride 21 / offset 3 falls back to 2-byte copies.
  struct Case { int64_t q, row; };
  for (Case c : {Case{128, 64}, Case{3, 6}, Case{8, 8}}) {
    const int64_t T = 7, stride = c.q + 2 * c.row + (c.row == 6 ? 3 : 0), num_slots = 16;
    std::vector<uint16_t> qkv(T * stride), kc(num_slots * c.row, 0), vc(kc.size(), 0);
    std::iota(qkv.begin(), qkv.end(), uint16_t{1});
    std::vector<int64_t> slots{3, -1, 15, 0, 9, 10, 4};
    std::vector<uint16_t> ref_k = kc, ref_v = vc;
    fastllm::cpu::reshape_and_cache(qkv.data() + c.q, qkv.data() + c.q + c.row, ref_k.data(), ref_v.data(),
                                    slots.data(), T, c.row, stride, stride, 2);
    uint16_t *dqkv, *dkc, *dvc;
    int64_t* ds;
    ASSERT_EQ(cudaMalloc(&dqkv, qkv.size() * 2), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&dkc, kc.size() * 2), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&dvc, vc.size() * 2), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&ds, slots.size() * 8), cudaSuccess);
    cudaMemcpy(dqkv, qkv.data(), qkv.size() * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(dkc, kc.data(), kc.size() * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(dvc, vc.data(), vc.size() * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(ds, slots.data(), slots.size() * 8, cudaMemcpyHostToDevice);
    ASSERT_EQ(fastllm::cuda::reshape_and_cache(dqkv + c.q, dqkv + c.q + c.row, dkc, dvc, ds, T, c.row, stride, stride,
                                               2, nullptr),
              cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    cudaMemcpy(kc.data(), dkc, kc.size() * 2, cudaMemcpyDeviceToHost);
    cudaMemcpy(vc.data(), dvc, vc.size() * 2, cudaMemcpyDeviceToHost);
    EXPECT_EQ(kc, ref_k) << "q " << c.q << " row " << c.row;
    EXPECT_EQ(vc, ref_v) << "q " << c.q << " row " << c.row;
    for (void* p : {(void*)dqkv, (void*)dkc, (void*)dvc, (void*)ds}) cudaFree(p);
  }
}

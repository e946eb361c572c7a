#include <cstdint>

#include "fastllm/cuda/fused_softmax.cuh"
#include "fastllm/cuda/launchers.h"
#include "fastllm/cuda/nvtx.h"
#include "fastllm/dispatch.h"

namespace fastllm::cuda {

template <typename T, int PER_LANE>
static cudaError_t launch_warp(const SoftmaxParams& p, cudaStream_t stream) {
  constexpr int kRowsPerCta = 4;  // 4 warps, one row each
  const unsigned blocks = static_cast<unsigned>((p.num_rows + kRowsPerCta - 1) / kRowsPerCta);
  softmax_warp_kernel<T, PER_LANE><<<blocks, 32 * kRowsPerCta, 0, stream>>>(p);
  return cudaGetLastError();
}

// Row in registers: the fewest chunks per thread (1..8) that fit 512 threads, and as
// many threads (a multiple of 32) as the row's 16-byte chunks need.
template <typename T>
static cudaError_t launch_block_regs(const SoftmaxParams& p, int64_t num_chunks, cudaStream_t stream) {
  const unsigned rows = static_cast<unsigned>(p.num_rows);
  int chunks = 1;
  while ((int64_t)chunks * 512 < num_chunks) chunks *= 2;
  const int64_t per_thread = (num_chunks + chunks - 1) / chunks;
  const unsigned threads = static_cast<unsigned>((per_thread + 31) / 32 * 32);
  switch (chunks) {
    case 1: softmax_block_regs_kernel<T, 1><<<rows, threads, 0, stream>>>(p); break;
    case 2: softmax_block_regs_kernel<T, 2><<<rows, threads, 0, stream>>>(p); break;
    case 4: softmax_block_regs_kernel<T, 4><<<rows, threads, 0, stream>>>(p); break;
    default: softmax_block_regs_kernel<T, 8><<<rows, threads, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

template <typename T>
static cudaError_t launch(const SoftmaxParams& p, cudaStream_t stream) {
  const int64_t per_lane = (p.num_cols + 31) / 32;
  if (per_lane <= 1) return launch_warp<T, 1>(p, stream);
  if (per_lane <= 2) return launch_warp<T, 2>(p, stream);
  if (per_lane <= 4) return launch_warp<T, 4>(p, stream);
  if (per_lane <= 8) return launch_warp<T, 8>(p, stream);
  if (per_lane <= 16) return launch_warp<T, 16>(p, stream);
  if (per_lane <= 32) return launch_warp<T, 32>(p, stream);
  constexpr int VEC = VecTraits<T>::kSize;
  const bool aligned = p.num_cols % VEC == 0 && reinterpret_cast<uintptr_t>(p.scores) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(p.out) % 16 == 0;
  const int64_t num_chunks = p.num_cols / VEC;
  if (aligned && num_chunks <= 8 * 512) return launch_block_regs<T>(p, num_chunks, stream);
  if (aligned) {
    softmax_block_vec_kernel<T><<<static_cast<unsigned>(p.num_rows), 1024, 0, stream>>>(p);
  } else {
    softmax_block_kernel<T><<<static_cast<unsigned>(p.num_rows), 1024, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t fused_softmax(ScalarType dtype, void* out, const void* scores, const float* row_scale, int64_t num_rows,
                          int64_t num_cols, int64_t rows_per_matrix, float scale, bool causal, int64_t causal_offset,
                          cudaStream_t stream) {
  FASTLLM_NVTX_RANGE("fused_softmax");
  if (num_rows == 0 || num_cols == 0) return cudaSuccess;
  if (num_rows > INT32_MAX) return cudaErrorInvalidValue;  // rows are grid.x blocks (or warps of them)
  const SoftmaxParams p{out, scores, row_scale, num_rows, num_cols, rows_per_matrix, causal_offset, scale, causal};
  return FASTLLM_DISPATCH_CUDA_FLOAT(dtype, [&] { return launch<scalar_t>(p, stream); });
}

}  // namespace fastllm::cuda

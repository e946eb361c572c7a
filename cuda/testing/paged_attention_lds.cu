#include "fastllm/cuda/paged_attention_launch.cuh"
#include "fastllm/cuda/testing.h"

namespace fastllm::cuda::testing {

cudaError_t paged_attention_lds(const PagedAttentionParams& params, cudaStream_t stream) {
  return run_paged_attention</*LDSM=*/false>(params, stream);
}

}  // namespace fastllm::cuda::testing

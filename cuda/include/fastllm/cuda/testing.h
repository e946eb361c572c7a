// Entry points for the C++ tests and benches only (built from cuda/testing/, never into
// fastllm._C): kernel variants the library does not ship.
#pragma once
#include "fastllm/cuda/launchers.h"

namespace fastllm::cuda::testing {

// paged_attention with the tensor-core prefill kernel's K/V fragments read by plain
// 32-/16-bit shared loads instead of ldmatrix: the reference variant, which must agree
// with the library's bit for bit (same fragments, same mma order).
cudaError_t paged_attention_lds(const PagedAttentionParams& params, cudaStream_t stream);

}  // namespace fastllm::cuda::testing

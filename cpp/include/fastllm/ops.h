// The ops as the bindings see them: validated TensorViews in, dispatched to the CPU
// kernels or the CUDA launchers by device. `stream` is a cudaStream_t as an integer
// (0 = default stream; ignored on CPU).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "fastllm/paged_attention.h"
#include "fastllm/tensor_view.h"

namespace fastllm {

bool cuda_compiled();                  // built with CUDA kernels
bool cuda_available();                 // ... and a GPU + driver can run them
std::vector<std::string> cuda_ops();   // ops with a CUDA kernel in this build
std::string cuda_archs();              // the archs compiled for ("" without CUDA)

// key/value [T, Hkv, D] may be views of the fused qkv projection output: any token
// stride, the [Hkv, D] dims of each token contiguous.
void reshape_and_cache(const TensorView& key, const TensorView& value, const TensorView& k_cache,
                       const TensorView& v_cache, const TensorView& slot_mapping, int64_t stream);

// How a step's paged attention runs (fastllm/paged_attention.h), planned once per step
// for the step's sizes and the layers' shape, and passed to every layer's call.
// `device`: the CUDA device the calls will run on (its SM count sets the split count),
// or -1 for CPU tensors. `max_query_len`: the step's longest q_len, known on the host
// (-1: unknown); 1 keeps a decode step on the decode kernel alone (CUDA graphs).
// ValueError/TypeError naming the field for sizes no kernel can run.
PagedAttentionPlan plan_paged_attention(DType dtype, const PagedAttentionShape& shape, int64_t max_query_len,
                                        int device);
std::string describe(const PagedAttentionPlan& plan);  // sizes, dtype, device, and the CUDA choices

// `query` may have any token stride (a view of the fused qkv output) on CUDA; the CPU
// kernel needs it contiguous. `plan` (CUDA: required; CPU: may be null) must have been
// made for this call's sizes, dtype and device. `workspace` (CUDA only; null when
// plan->workspace_bytes is 0): float32, at least plan->workspace_bytes bytes, for the
// split-context partial results.
void paged_attention(const TensorView& out, const TensorView& query, const TensorView& k_cache,
                     const TensorView& v_cache, const TensorView& block_tables, const TensorView& seq_lens,
                     const TensorView& query_start_loc, float scale, const PagedAttentionPlan* plan,
                     const TensorView* workspace, int64_t stream);

// `row_scale` (may be null): float32 [num_rows] (num_rows = scores.numel() / last dim),
// multiplied into each row's scale (per-row inverse temperatures when sampling).
void fused_softmax(const TensorView& out, const TensorView& scores, float scale, bool causal,
                   int64_t causal_offset, const TensorView* row_scale, int64_t stream);

// ---- fused elementwise ops of the decoder layer ---------------------------------------
// CUDA kernels only. On CPU, fastllm.ops runs the torch reference (HF's rounding points;
// the model's CPU output is unchanged bit for bit) after calling check_<op>, the same
// argument validation the CUDA op runs first; the op itself refuses CPU tensors.

// out, x [T, hidden]; weight [hidden]:
// out = dtype(weight * dtype(x * rsqrt(mean(x^2) + eps))), in float32 (LlamaRMSNorm).
void check_rms_norm(const TensorView& out, const TensorView& x, const TensorView& weight);
void rms_norm(const TensorView& out, const TensorView& x, const TensorView& weight, float eps, int64_t stream);

// In place (vLLM's semantics): residual = dtype(residual + x); x = rms_norm(residual).
void check_fused_add_rms_norm(const TensorView& x, const TensorView& residual, const TensorView& weight);
void fused_add_rms_norm(const TensorView& x, const TensorView& residual, const TensorView& weight, float eps,
                        int64_t stream);

// x [T, 2I] = [gate | up] -> out [T, I] = dtype(dtype(silu(gate)) * up).
void check_silu_and_mul(const TensorView& out, const TensorView& x);
void silu_and_mul(const TensorView& out, const TensorView& x, int64_t stream);

// In place neox (rotate-half) RoPE of query [T, H, D] and key [T, Hkv, D], which may be
// views of the fused qkv output (any token stride, [heads, D] contiguous); cos, sin
// [T, D/2] in the query's dtype. Rounds after every multiply and add, as torch does.
void check_rotary_embedding(const TensorView& query, const TensorView& key, const TensorView& cos,
                            const TensorView& sin);
void rotary_embedding(const TensorView& query, const TensorView& key, const TensorView& cos, const TensorView& sin,
                      int64_t stream);

}  // namespace fastllm

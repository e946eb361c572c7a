// Argument checks shared by every device, then dispatch. Value checks that need to
// read index tensors (slot ranges, query_start_loc) run on CPU only: on the GPU they
// would cost a device sync per call.
#include "fastllm/ops.h"

#include <algorithm>
#include <stdexcept>
#include <utility>

#include "fastllm/cpu/float16.h"
#include "fastllm/cpu/fused_ops.h"
#include "fastllm/cpu/kernels.h"
#include "fastllm/dispatch.h"
#include "fastllm/errors.h"
#include "fastllm/op_checks.h"
#ifdef FASTLLM_WITH_CUDA
#include "fastllm/cuda/launchers.h"
#endif

namespace fastllm {

bool cuda_compiled() {
#ifdef FASTLLM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool cuda_available() {
#ifdef FASTLLM_WITH_CUDA
  return cuda::device_count() > 0;
#else
  return false;
#endif
}

std::vector<std::string> cuda_ops() {
#ifdef FASTLLM_WITH_CUDA
  return {"reshape_and_cache", "paged_attention", "fused_softmax",
          "rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding", "quant_linear"};
#else
  return {};
#endif
}

std::string cuda_archs() {
#ifdef FASTLLM_CUDA_ARCHS
  return FASTLLM_CUDA_ARCHS;
#else
  return "";
#endif
}

// The CUDA kernels read rows with 16-byte loads.
static void check_aligned(const TensorView& t) {
  if (reinterpret_cast<uintptr_t>(t.data) % 16 != 0) {
    throw ArgValueError(t.name + ": CUDA kernels need 16-byte aligned data (call .contiguous() on a fresh tensor)");
  }
}

static std::string strides_str(const TensorView& t) {
  std::string s = "[";
  for (size_t i = 0; i < t.strides.size(); ++i) s += (i ? ", " : "") + std::to_string(t.strides[i]);
  return s + "]";
}

// Token stride (elements) of a [T, heads, head_dim] tensor whose [heads, head_dim] dims
// are contiguous: a contiguous tensor, or a view of the fused qkv projection output.
static int64_t token_stride(const TensorView& t) {
  const int64_t heads = t.size(1), D = t.size(2);
  const bool inner_contiguous = (D == 1 || t.strides[2] == 1) && (heads == 1 || t.strides[1] == D);
  if (!inner_contiguous) {
    throw ArgValueError(t.name + ": the [heads, head_dim] dims of each token must be contiguous, got strides " +
                        strides_str(t) + " for shape " + t.shape_str());
  }
  if (t.size(0) <= 1) return heads * D;
  if (t.strides[0] < heads * D) {
    throw ArgValueError(t.name + ": token stride " + std::to_string(t.strides[0]) +
                        " is below heads * head_dim = " + std::to_string(heads * D) + " (rows would overlap)");
  }
  return t.strides[0];
}

void reshape_and_cache(const TensorView& key, const TensorView& value, const TensorView& k_cache,
                       const TensorView& v_cache, const TensorView& slot_mapping, [[maybe_unused]] int64_t stream) {
  key.check_rank(3).check_float();
  const int64_t T = key.size(0), Hkv = key.size(1), D = key.size(2);
  value.check_rank(3).check_dtype(key.dtype).check_same_device(key);
  value.check_size(0, T, "num_tokens").check_size(1, Hkv, "num_kv_heads").check_size(2, D, "head_dim");
  const int64_t key_stride = token_stride(key), value_stride = token_stride(value);
  for (const TensorView* c : {&k_cache, &v_cache}) {
    c->check_rank(4).check_dtype(key.dtype).check_contiguous().check_same_device(key);
    c->check_size(2, Hkv, "num_kv_heads").check_size(3, D, "head_dim");
  }
  v_cache.check_size(0, k_cache.size(0), "num_blocks").check_size(1, k_cache.size(1), "block_size");
  slot_mapping.check_rank(1).check_dtype(DType::kI64).check_contiguous().check_same_device(key);
  slot_mapping.check_size(0, T, "num_tokens");
  const int64_t row_elems = Hkv * D, elem_bytes = static_cast<int64_t>(dtype_size(key.dtype));

  if (key.device == Device::kCPU) {
    check_slot_mapping(slot_mapping, k_cache.size(0) * k_cache.size(1));
    cpu::reshape_and_cache(key.data, value.data, k_cache.data, v_cache.data, slot_mapping.ptr<int64_t>(), T,
                           row_elems, key_stride, value_stride, elem_bytes);
    return;
  }
  FASTLLM_CUDA_CALL("reshape_and_cache", key.device_id,
                    cuda::reshape_and_cache(key.data, value.data, k_cache.data, v_cache.data,
                                            slot_mapping.ptr<int64_t>(), T, row_elems, key_stride, value_stride,
                                            elem_bytes, reinterpret_cast<cudaStream_t>(stream)));
}

void check_slot_mapping(const TensorView& slot_mapping, int64_t num_slots) {
  const int64_t* slots = slot_mapping.ptr<int64_t>();
  for (int64_t t = 0; t < slot_mapping.size(0); ++t) {
    if (slots[t] < -1 || slots[t] >= num_slots) {
      throw ArgValueError("slot_mapping: slot " + std::to_string(slots[t]) + " at token " + std::to_string(t) +
                          " is outside the cache's " + std::to_string(num_slots) + " slots");
    }
  }
}

void check_attention_metadata(const TensorView& query, const TensorView& k_cache,
                                     const TensorView& block_tables, const TensorView& seq_lens,
                                     const TensorView& query_start_loc) {
  const int64_t T = query.size(0), S = seq_lens.size(0), max_blocks = block_tables.size(1);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1);
  const int32_t* qsl = query_start_loc.ptr<int32_t>();
  const int32_t* lens = seq_lens.ptr<int32_t>();
  const int32_t* tables = block_tables.ptr<int32_t>();
  if (qsl[0] != 0 || qsl[S] != T) {
    throw ArgValueError("query_start_loc: must start at 0 and end at num_tokens (" + std::to_string(T) + ")");
  }
  for (int64_t s = 0; s < S; ++s) {
    const int64_t q_len = qsl[s + 1] - qsl[s];
    if (q_len < 0) throw ArgValueError("query_start_loc: must be non-decreasing");
    if (q_len > lens[s]) {
      throw ArgValueError("seq_lens: sequence " + std::to_string(s) + " has " + std::to_string(q_len) +
                          " queries but seq_len " + std::to_string(lens[s]));
    }
    const int64_t used_blocks = (lens[s] + block_size - 1) / block_size;
    if (used_blocks > max_blocks) {
      throw ArgValueError("block_tables: sequence " + std::to_string(s) + " needs " + std::to_string(used_blocks) +
                          " blocks but the table has " + std::to_string(max_blocks) + " columns");
    }
    for (int64_t b = 0; b < used_blocks; ++b) {
      const int32_t id = tables[s * max_blocks + b];
      if (id < 0 || id >= num_blocks) {
        throw ArgValueError("block_tables: block id " + std::to_string(id) + " of sequence " + std::to_string(s) +
                            " is outside the cache's " + std::to_string(num_blocks) + " blocks");
      }
    }
  }
}

std::string describe(const PagedAttentionPlan& plan) {
  const PagedAttentionShape& s = plan.shape;
  std::string text = "num_tokens=" + std::to_string(s.num_tokens) + " num_seqs=" + std::to_string(s.num_seqs) +
                     " num_heads=" + std::to_string(s.num_heads) + " num_kv_heads=" + std::to_string(s.num_kv_heads) +
                     " head_dim=" + std::to_string(s.head_dim) + " block_size=" + std::to_string(s.block_size) +
                     " max_blocks_per_seq=" + std::to_string(s.max_blocks_per_seq) + " " + dtype_name(plan.dtype) +
                     (plan.device < 0 ? std::string(" cpu") : " cuda:" + std::to_string(plan.device));
  if (plan.device >= 0) {
    text += std::string(plan.prefill_kernel ? " prefill+decode" : " decode") + " kernels, num_splits=" +
            std::to_string(plan.num_splits) + " workspace_bytes=" + std::to_string(plan.workspace_bytes);
  }
  return text;
}

static std::string head_dims_str() {
  std::string s;
  for (int d : kPagedAttentionHeadDims) s += (s.empty() ? "" : ", ") + std::to_string(d);
  return s;
}

PagedAttentionPlan plan_paged_attention(DType dtype, const PagedAttentionShape& shape, int64_t max_query_len,
                                        int device) {
  if (dtype != DType::kF32 && dtype != DType::kF16 && dtype != DType::kBF16) {
    throw ArgTypeError(std::string("dtype: expected float32, float16 or bfloat16, got ") + dtype_name(dtype));
  }
  const std::pair<const char*, int64_t> sizes[] = {
      {"num_tokens", shape.num_tokens}, {"num_seqs", shape.num_seqs}, {"max_blocks_per_seq", shape.max_blocks_per_seq}};
  for (const auto& [name, value] : sizes) {
    if (value < 0) throw ArgValueError(std::string(name) + ": must be >= 0, got " + std::to_string(value));
  }
  const std::pair<const char*, int64_t> positive[] = {
      {"num_heads", shape.num_heads}, {"num_kv_heads", shape.num_kv_heads}, {"head_dim", shape.head_dim},
      {"block_size", shape.block_size}};
  for (const auto& [name, value] : positive) {
    if (value <= 0) throw ArgValueError(std::string(name) + ": must be positive, got " + std::to_string(value));
  }
  if (shape.num_heads % shape.num_kv_heads != 0) {
    throw ArgValueError("num_heads (" + std::to_string(shape.num_heads) + ") must be a multiple of num_kv_heads (" +
                        std::to_string(shape.num_kv_heads) + ")");
  }
  if (device < 0) {  // the CPU kernel needs no plan beyond the shape it will be called with
    PagedAttentionPlan plan;
    plan.shape = shape;
    plan.dtype = dtype;
    return plan;
  }
  if (!cuda_paged_attention_supports(shape.head_dim)) {
    throw ArgValueError("head_dim: the CUDA paged_attention supports head_dim " + head_dims_str() + ", got " +
                        std::to_string(shape.head_dim));
  }
#ifdef FASTLLM_WITH_CUDA
  const cuda::DeviceGuard device_guard(device);  // the split count follows that GPU's SM count
  detail::check_cuda(device_guard.status(), "plan_paged_attention");
  return cuda::plan_paged_attention(dtype, shape, max_query_len);
#else
  (void)max_query_len;
  detail::no_cuda_kernel("plan_paged_attention");
#endif
}

// The one check of a call against its plan: what the plan's split layout and workspace
// size were computed for must be what the call runs on.
static void check_plan(const PagedAttentionPlan& plan, const PagedAttentionShape& shape, const TensorView& query) {
  PagedAttentionPlan call = plan;
  call.shape = shape;
  call.dtype = query.dtype;
  call.device = query.device == Device::kCPU ? -1 : query.device_id;
  if (plan.shape != call.shape || plan.dtype != call.dtype || plan.device != call.device) {
    throw ArgValueError("plan: made for " + describe(plan) + ", but the call has " + describe(call) +
                        " (plan once per step, for the step's sizes and the layers' shape)");
  }
}

// The plan's split-context workspace: a float32 buffer on the query's device of at least
// plan.workspace_bytes bytes (null when the plan needs none).
static void* checked_workspace(const TensorView* workspace, const PagedAttentionPlan& plan, const TensorView& query) {
  int64_t workspace_bytes = 0;
  if (workspace != nullptr) {
    workspace->check_dtype(DType::kF32).check_contiguous().check_same_device(query);
    check_aligned(*workspace);
    workspace_bytes = workspace->numel() * static_cast<int64_t>(sizeof(float));
  }
  if (workspace_bytes < plan.workspace_bytes) {
    throw ArgValueError("workspace: the plan needs " + std::to_string(plan.workspace_bytes) + " bytes, got " +
                        std::to_string(workspace_bytes));
  }
  return workspace != nullptr ? workspace->data : nullptr;
}

void paged_attention(const TensorView& out, const TensorView& query, const TensorView& k_cache,
                     const TensorView& v_cache, const TensorView& block_tables, const TensorView& seq_lens,
                     const TensorView& query_start_loc, float scale, const PagedAttentionPlan* plan,
                     const TensorView* workspace, [[maybe_unused]] int64_t stream) {
  query.check_rank(3).check_float();
  const int64_t T = query.size(0), H = query.size(1), D = query.size(2);
  // query may be a view into the fused qkv projection: any token stride, [H, D] dense.
  const bool rows_dense = (D == 1 || query.strides[2] == 1) && (H == 1 || query.strides[1] == D);
  if (!rows_dense || (T > 1 && query.strides[0] < H * D)) {
    throw ArgValueError("query: each token's [num_heads, head_dim] must be contiguous, got strides " +
                        std::to_string(query.strides[0]) + ", " + std::to_string(query.strides[1]) + ", " +
                        std::to_string(query.strides[2]));
  }
  const int64_t q_token_stride = T > 1 ? query.strides[0] : H * D;
  out.check_rank(3).check_dtype(query.dtype).check_contiguous().check_same_device(query);
  out.check_size(0, T, "num_tokens").check_size(1, H, "num_heads").check_size(2, D, "head_dim");
  for (const TensorView* c : {&k_cache, &v_cache}) {
    c->check_rank(4).check_dtype(query.dtype).check_contiguous().check_same_device(query).check_size(3, D, "head_dim");
  }
  const int64_t Hkv = k_cache.size(2);
  v_cache.check_size(0, k_cache.size(0), "num_blocks").check_size(1, k_cache.size(1), "block_size")
      .check_size(2, Hkv, "num_kv_heads");
  if (Hkv <= 0 || H % Hkv != 0) {
    throw ArgValueError("query: num_heads (" + std::to_string(H) + ") must be a multiple of k_cache's num_kv_heads (" +
                        std::to_string(Hkv) + ")");
  }
  block_tables.check_rank(2).check_dtype(DType::kI32).check_contiguous().check_same_device(query);
  const int64_t S = block_tables.size(0);
  seq_lens.check_rank(1).check_dtype(DType::kI32).check_contiguous().check_same_device(query)
      .check_size(0, S, "num_seqs");
  query_start_loc.check_rank(1).check_dtype(DType::kI32).check_contiguous().check_same_device(query)
      .check_size(0, S + 1, "num_seqs + 1");
  const PagedAttentionShape shape{T, S, H, Hkv, D, k_cache.size(1), block_tables.size(1)};
  if (plan != nullptr) check_plan(*plan, shape, query);

  if (query.device == Device::kCPU) {
    check_attention_metadata(query, k_cache, block_tables, seq_lens, query_start_loc);
    FASTLLM_DISPATCH_CPU_FLOAT(query.dtype, [&] {
      cpu::paged_attention<scalar_t>(out.ptr<scalar_t>(), query.ptr<scalar_t>(), k_cache.ptr<scalar_t>(),
                                     v_cache.ptr<scalar_t>(), block_tables.ptr<int32_t>(), seq_lens.ptr<int32_t>(),
                                     query_start_loc.ptr<int32_t>(), shape, scale, q_token_stride);
    });
    return;
  }
  if (plan == nullptr) {
    throw ArgValueError("plan: the CUDA paged_attention runs on a plan (plan_paged_attention, once per step)");
  }
  for (const TensorView* t : {&out, &query, &k_cache, &v_cache}) check_aligned(*t);
  if ((q_token_stride * static_cast<int64_t>(dtype_size(query.dtype))) % 16 != 0) {
    throw ArgValueError("query: CUDA kernels need 16-byte aligned token rows, got a token stride of " +
                        std::to_string(q_token_stride) + " elements");
  }
  [[maybe_unused]] void* workspace_data = checked_workspace(workspace, *plan, query);
  FASTLLM_CUDA_CALL("paged_attention", query.device_id,
                    cuda::paged_attention({query.dtype, shape, out.data, query.data, q_token_stride, k_cache.data,
                                           v_cache.data, block_tables.ptr<int32_t>(), seq_lens.ptr<int32_t>(),
                                           query_start_loc.ptr<int32_t>(), scale, *plan, workspace_data},
                                          reinterpret_cast<cudaStream_t>(stream)));
}

void fused_softmax(const TensorView& out, const TensorView& scores, float scale, bool causal,
                   int64_t causal_offset, const TensorView* row_scale, [[maybe_unused]] int64_t stream) {
  scores.check_float().check_contiguous();
  if (scores.dim() < (causal ? 2 : 1)) {
    throw ArgValueError(std::string("scores: expected at least ") + (causal ? "2" : "1") + " dims, got shape " +
                        scores.shape_str());
  }
  out.check_dtype(scores.dtype).check_contiguous().check_same_device(scores);
  if (out.shape != scores.shape) {
    throw ArgValueError("out: shape " + out.shape_str() + " must equal scores' shape " + scores.shape_str());
  }
  const int64_t cols = scores.size(-1);
  const int64_t rows = cols == 0 ? 0 : scores.numel() / cols;
  const int64_t rows_per_matrix = scores.dim() >= 2 ? scores.size(-2) : 1;
  const float* row_scale_ptr = nullptr;
  if (row_scale != nullptr) {
    int64_t leading = 1;  // == rows, also when the last dim is 0
    for (int64_t d = 0; d + 1 < scores.dim(); ++d) leading *= scores.size(d);
    row_scale->check_rank(1).check_dtype(DType::kF32).check_contiguous().check_same_device(scores)
        .check_size(0, leading, "num_rows = scores.numel() / last dim");
    row_scale_ptr = row_scale->ptr<float>();
  }
  if (scores.device == Device::kCPU) {
    FASTLLM_DISPATCH_CPU_FLOAT(scores.dtype, [&] {
      cpu::fused_softmax<scalar_t>(out.ptr<scalar_t>(), scores.ptr<scalar_t>(), row_scale_ptr, rows, cols,
                                   rows_per_matrix, scale, causal, causal_offset);
    });
    return;
  }
  FASTLLM_CUDA_CALL("fused_softmax", out.device_id,
                    cuda::fused_softmax(scores.dtype, out.data, scores.data, row_scale_ptr, rows, cols, rows_per_matrix,
                                        scale, causal, causal_offset, reinterpret_cast<cudaStream_t>(stream)));
}

// ---- fused elementwise ops of the decoder layer (CUDA kernels; CPU: fp32 kernels) ----

// True for an fp32 CPU tensor (cpu/fused_ops.h runs the op). Other CPU dtypes are
// refused: fastllm.ops validates them with check_<op> and runs the torch reference.
static bool on_cpu_f32(const TensorView& t, const char* op) {
  if (t.device == Device::kCPU) {
    if (t.dtype == DType::kF32) return true;
    throw ArgValueError(std::string(op) + ": " + t.name + " is a " + dtype_name(t.dtype) +
                        " CPU tensor; the CPU kernel is float32 only (fastllm.ops runs the torch reference "
                        "for the other dtypes)");
  }
  return false;
}

static void require_cuda(const TensorView& t, const char* op) {
  if (t.device != Device::kCUDA) {
    throw ArgValueError(std::string(op) + ": " + t.name + " must be a CPU or CUDA tensor");
  }
#ifndef FASTLLM_WITH_CUDA
  detail::no_cuda_kernel(op);
#endif
}

static void check_norm_weight(const TensorView& weight, const TensorView& x) {
  weight.check_rank(1).check_dtype(x.dtype).check_contiguous().check_same_device(x);
  weight.check_size(0, x.size(1), "hidden_size");
}

// Whether two views may share a byte (a partial overlap of in-place operands would race).
// Views of one buffer that interleave by token (q and k of the fused qkv output) do not:
// with the same token stride S, their rows sit at offsets d apart modulo S.
static bool overlaps(const TensorView& a, const TensorView& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  // [begin, end) of the whole view, and the bytes one token's row spans.
  auto extent = [](const TensorView& t, int64_t first_dim) {
    int64_t last = 0;
    for (int64_t d = first_dim; d < t.dim(); ++d) last += (t.shape[d] - 1) * t.strides[d];
    return (last + 1) * static_cast<int64_t>(dtype_size(t.dtype));
  };
  const auto a0 = reinterpret_cast<intptr_t>(a.data), b0 = reinterpret_cast<intptr_t>(b.data);
  if (a0 >= b0 + extent(b, 0) || b0 >= a0 + extent(a, 0)) return false;
  const int64_t stride_a = a.dim() > 1 && a.shape[0] > 1 ? a.strides[0] * static_cast<int64_t>(dtype_size(a.dtype)) : 0;
  const int64_t stride_b = b.dim() > 1 && b.shape[0] > 1 ? b.strides[0] * static_cast<int64_t>(dtype_size(b.dtype)) : 0;
  if (stride_a <= 0 || stride_a != stride_b) return true;  // conservative
  const int64_t row_a = extent(a, 1), row_b = extent(b, 1);
  const int64_t d = (((b0 - a0) % stride_a) + stride_a) % stride_a;  // b's row start within a's period
  return d < row_a || stride_a - d < row_b;
}

void check_rms_norm(const TensorView& out, const TensorView& x, const TensorView& weight) {
  x.check_rank(2).check_float().check_contiguous();
  out.check_rank(2).check_dtype(x.dtype).check_contiguous().check_same_device(x);
  out.check_size(0, x.size(0), "num_tokens").check_size(1, x.size(1), "hidden_size");
  if (out.data != x.data && overlaps(out, x)) {
    throw ArgValueError("out: overlaps x (in place is fine: pass x itself)");
  }
  check_norm_weight(weight, x);
}

void rms_norm(const TensorView& out, const TensorView& x, const TensorView& weight, [[maybe_unused]] float eps,
              [[maybe_unused]] int64_t stream) {
  check_rms_norm(out, x, weight);
  if (on_cpu_f32(x, "rms_norm")) {
    cpu::rms_norm_f32(out.ptr<float>(), x.ptr<const float>(), weight.ptr<const float>(), x.size(0), x.size(1), eps);
    return;
  }
  require_cuda(x, "rms_norm");
  FASTLLM_CUDA_CALL("rms_norm", out.device_id,
                    cuda::rms_norm(x.dtype, out.data, x.data, weight.data, x.size(0), x.size(1), eps,
                                   reinterpret_cast<cudaStream_t>(stream)));
}

void check_fused_add_rms_norm(const TensorView& x, const TensorView& residual, const TensorView& weight) {
  x.check_rank(2).check_float().check_contiguous();
  residual.check_rank(2).check_dtype(x.dtype).check_contiguous().check_same_device(x);
  residual.check_size(0, x.size(0), "num_tokens").check_size(1, x.size(1), "hidden_size");
  if (overlaps(residual, x)) {
    throw ArgValueError("residual: must be a different tensor from x (both are updated in place)");
  }
  check_norm_weight(weight, x);
}

void fused_add_rms_norm(const TensorView& x, const TensorView& residual, const TensorView& weight,
                        [[maybe_unused]] float eps, [[maybe_unused]] int64_t stream) {
  check_fused_add_rms_norm(x, residual, weight);
  if (on_cpu_f32(x, "fused_add_rms_norm")) {
    cpu::fused_add_rms_norm_f32(x.ptr<float>(), residual.ptr<float>(), weight.ptr<const float>(), x.size(0),
                                x.size(1), eps);
    return;
  }
  require_cuda(x, "fused_add_rms_norm");
  FASTLLM_CUDA_CALL("fused_add_rms_norm", x.device_id,
                    cuda::fused_add_rms_norm(x.dtype, x.data, residual.data, weight.data, x.size(0), x.size(1), eps,
                                             reinterpret_cast<cudaStream_t>(stream)));
}

void check_silu_and_mul(const TensorView& out, const TensorView& x) {
  x.check_rank(2).check_float().check_contiguous();
  if (x.size(1) % 2 != 0) {
    throw ArgValueError("x: the last dim holds [gate | up] and must be even, got shape " + x.shape_str());
  }
  out.check_rank(2).check_dtype(x.dtype).check_contiguous().check_same_device(x);
  out.check_size(0, x.size(0), "num_tokens").check_size(1, x.size(1) / 2, "intermediate_size");
  if (overlaps(out, x)) throw ArgValueError("out: overlaps x (other CTAs may still read what it overwrites)");
}

void silu_and_mul(const TensorView& out, const TensorView& x, [[maybe_unused]] int64_t stream) {
  check_silu_and_mul(out, x);
  if (on_cpu_f32(x, "silu_and_mul")) {
    cpu::silu_and_mul_f32(out.ptr<float>(), x.ptr<const float>(), x.size(0), x.size(1) / 2);
    return;
  }
  require_cuda(x, "silu_and_mul");
  FASTLLM_CUDA_CALL("silu_and_mul", out.device_id,
                    cuda::silu_and_mul(x.dtype, out.data, x.data, x.size(0), x.size(1) / 2,
                                       reinterpret_cast<cudaStream_t>(stream)));
}

void check_rotary_embedding(const TensorView& query, const TensorView& key, const TensorView& cos,
                            const TensorView& sin) {
  query.check_rank(3).check_float();
  const int64_t T = query.size(0), D = query.size(2);
  if (D % 2 != 0) throw ArgValueError("query: head_dim must be even for rotate-half RoPE, got shape " + query.shape_str());
  key.check_rank(3).check_dtype(query.dtype).check_same_device(query);
  key.check_size(0, T, "num_tokens").check_size(2, D, "head_dim");
  token_stride(query);
  token_stride(key);
  if (overlaps(key, query)) {
    throw ArgValueError("key: must not alias query (both are rotated in place)");
  }
  for (const TensorView* t : {&cos, &sin}) {
    t->check_rank(2).check_dtype(query.dtype).check_contiguous().check_same_device(query);
    t->check_size(0, T, "num_tokens").check_size(1, D / 2, "head_dim / 2");
  }
}

void rotary_embedding(const TensorView& query, const TensorView& key, const TensorView& cos, const TensorView& sin,
                      [[maybe_unused]] int64_t stream) {
  check_rotary_embedding(query, key, cos, sin);
  if (on_cpu_f32(query, "rotary_embedding")) {
    cpu::rotary_embedding_f32(query.ptr<float>(), key.ptr<float>(), cos.ptr<const float>(), sin.ptr<const float>(),
                              query.size(0), query.size(1), key.size(1), query.size(2), token_stride(query),
                              token_stride(key));
    return;
  }
  require_cuda(query, "rotary_embedding");
  FASTLLM_CUDA_CALL("rotary_embedding", query.device_id,
                    cuda::rotary_embedding(query.dtype, query.data, key.data, cos.data, sin.data, query.size(0),
                                           static_cast<int>(query.size(1)), static_cast<int>(key.size(1)),
                                           static_cast<int>(query.size(2)), token_stride(query), token_stride(key),
                                           reinterpret_cast<cudaStream_t>(stream)));
}

}  // namespace fastllm

// CpuDecoderOp: the checks that make cpu::Decoder safe to call with a model's tensors.
// Weights and caches are checked once (build, bind); a step checks only its own tensors
// and the index values its kernels would follow (slots, block ids, query offsets).
#include "fastllm/cpu_decoder_op.h"

#include <cmath>
#include <string>

#include "fastllm/cpu/quant.h"
#include "fastllm/errors.h"
#include "fastllm/op_checks.h"

namespace fastllm {
namespace {

// A dtype mismatch is bad input here like any other: ValueError (TensorView's check_dtype
// raises TypeError, which the decoder's callers would have to catch apart).
void expect(const TensorView& t, DType dtype, int64_t rank) {
  if (t.device != Device::kCPU) throw ArgValueError(t.name + ": the CPU decoder needs a CPU tensor");
  if (t.dtype != dtype) {
    throw ArgValueError(t.name + ": expected dtype " + dtype_name(dtype) + ", got " + dtype_name(t.dtype));
  }
  t.check_rank(rank).check_contiguous();
}

TensorView named(const TensorView& t, const std::string& name) {
  TensorView v = t;
  v.name = name;
  return v;
}

void check_shape(const cpu::DecoderShape& s) {
  const std::pair<const char*, int64_t> sizes[] = {{"hidden_size", s.hidden}, {"num_heads", s.num_heads},
                                                   {"num_kv_heads", s.num_kv_heads}, {"head_dim", s.head_dim},
                                                   {"intermediate_size", s.intermediate}};
  for (const auto& [name, value] : sizes) {
    if (value <= 0) throw ArgValueError(std::string(name) + ": must be positive, got " + std::to_string(value));
  }
  if (s.num_heads % s.num_kv_heads != 0) throw ArgValueError("num_heads: must be a multiple of num_kv_heads");
  if (s.head_dim % 2 != 0) throw ArgValueError("head_dim: must be even for rotate-half RoPE");
  if (!(s.eps > 0.f) || !std::isfinite(s.scale)) throw ArgValueError("eps, scale: expected eps > 0 and a finite scale");
}

// One linear's segments against (in_features, out_features): each a whole number of
// blocks per row, the rows adding up to out_features.
cpu::LinearParams checked_linear(const LinearTensors& t, const std::string& name, int64_t in, int64_t out) {
  if (t.segments.empty()) throw ArgValueError(name + ": no weight segments");
  cpu::LinearParams p;
  p.in_features = in;
  p.out_features = out;
  int64_t rows = 0;
  for (size_t i = 0; i < t.segments.size(); ++i) {
    const auto& [tensor, ggml_type] = t.segments[i];
    const TensorView w = named(tensor, name + ".segment" + std::to_string(i));
    cpu::QuantFormat f{};
    if (!cpu::quant_format(ggml_type, &f)) {
      throw ArgValueError(w.name + ": ggml type " + std::to_string(ggml_type) + " is not supported");
    }
    expect(w, DType::kU8, 2);
    if (in % f.block_elems != 0) {
      throw ArgValueError(w.name + ": in_features " + std::to_string(in) + " is not a multiple of its block size " +
                          std::to_string(f.block_elems));
    }
    w.check_size(1, in / f.block_elems * f.block_bytes, "bytes per row = in_features / block_elems * block_bytes");
    p.segments.push_back({w.ptr<const uint8_t>(), static_cast<cpu::QuantType>(ggml_type), w.size(0)});
    rows += w.size(0);
  }
  if (rows != out) {
    throw ArgValueError(name + ": the segments hold " + std::to_string(rows) + " rows, expected out_features " +
                        std::to_string(out));
  }
  if (t.bias) {
    const TensorView b = named(*t.bias, name + ".bias");
    expect(b, DType::kF32, 1);
    b.check_size(0, out, "out_features");
    p.bias = b.ptr<const float>();
  }
  return p;
}

const float* checked_norm(const TensorView& t, const std::string& name, int64_t hidden) {
  const TensorView w = named(t, name);
  expect(w, DType::kF32, 1);
  w.check_size(0, hidden, "hidden_size");
  return w.ptr<const float>();
}

std::vector<cpu::DecoderLayerParams> checked_layers(const cpu::DecoderShape& s,
                                                    const std::vector<DecoderLayerTensors>& layers) {
  check_shape(s);
  if (layers.empty()) throw ArgValueError("layers: the decoder needs at least one layer");
  const int64_t q = s.num_heads * s.head_dim, kv = s.num_kv_heads * s.head_dim;
  std::vector<cpu::DecoderLayerParams> out;
  for (size_t i = 0; i < layers.size(); ++i) {
    const std::string prefix = "layers." + std::to_string(i) + ".";
    const DecoderLayerTensors& l = layers[i];
    cpu::DecoderLayerParams p;
    p.input_norm = checked_norm(l.input_norm, prefix + "input_layernorm.weight", s.hidden);
    p.post_norm = checked_norm(l.post_norm, prefix + "post_attention_layernorm.weight", s.hidden);
    p.qkv = checked_linear(l.qkv, prefix + "self_attn.qkv_proj", s.hidden, q + 2 * kv);
    p.o = checked_linear(l.o, prefix + "self_attn.o_proj", q, s.hidden);
    p.gate_up = checked_linear(l.gate_up, prefix + "mlp.gate_up_proj", s.hidden, 2 * s.intermediate);
    p.down = checked_linear(l.down, prefix + "mlp.down_proj", s.intermediate, s.hidden);
    out.push_back(std::move(p));
  }
  return out;
}

}  // namespace

CpuDecoderOp::CpuDecoderOp(const cpu::DecoderShape& shape, const std::vector<DecoderLayerTensors>& layers)
    : decoder_(shape, checked_layers(shape, layers)) {}

void CpuDecoderOp::bind_kv_caches(const std::vector<std::pair<TensorView, TensorView>>& caches) {
  const cpu::DecoderShape& s = decoder_.shape();
  if (static_cast<int64_t>(caches.size()) != num_layers()) {
    throw ArgValueError("kv_caches: " + std::to_string(caches.size()) + " (k_cache, v_cache) pairs for " +
                        std::to_string(num_layers()) + " layers");
  }
  if (!caches.empty() && (caches[0].first.dim() != 4 || caches[0].first.size(0) <= 0 || caches[0].first.size(1) <= 0)) {
    throw ArgValueError("kv_caches[0].k_cache: expected [num_blocks > 0, block_size > 0, num_kv_heads, head_dim], got " +
                        caches[0].first.shape_str());
  }
  std::vector<float*> pointers;
  for (size_t i = 0; i < caches.size(); ++i) {
    for (int kind = 0; kind < 2; ++kind) {
      const TensorView c = named(kind ? caches[i].second : caches[i].first,
                                 "kv_caches[" + std::to_string(i) + "]." + (kind ? "v_cache" : "k_cache"));
      expect(c, DType::kF32, 4);
      c.check_size(2, s.num_kv_heads, "num_kv_heads").check_size(3, s.head_dim, "head_dim");
      const TensorView& first = caches[0].first;  // every cache the shape of layer 0's K cache
      c.check_size(0, first.size(0), "num_blocks (layer 0's)").check_size(1, first.size(1), "block_size (layer 0's)");
      pointers.push_back(c.ptr<float>());
    }
  }
  std::lock_guard<std::mutex> lock(mutex_);
  decoder_.bind_caches(pointers, caches[0].first.size(1));
  k_cache0_ = named(caches[0].first, "k_cache");
}

cpu::DecoderStep CpuDecoderOp::checked_step(const DecoderStepTensors& t) const {
  const cpu::DecoderShape& s = decoder_.shape();
  if (!k_cache0_) throw ArgValueError("kv_caches: bind the KV caches before the first step");
  expect(t.hidden, DType::kF32, 2);
  t.hidden.check_size(1, s.hidden, "hidden_size");
  const int64_t T = t.hidden.size(0);
  expect(t.residual, DType::kF32, 2);
  t.residual.check_size(0, T, "num_tokens").check_size(1, s.hidden, "hidden_size");
  const auto* h = t.hidden.ptr<const float>();
  const auto* r = t.residual.ptr<const float>();
  if (T > 0 && h < r + T * s.hidden && r < h + T * s.hidden) {
    throw ArgValueError("residual: must not overlap hidden (both are updated in place)");
  }
  for (const TensorView* c : {&t.cos, &t.sin}) {
    expect(*c, DType::kF32, 2);
    c->check_size(0, T, "num_tokens").check_size(1, s.head_dim / 2, "head_dim / 2");
  }
  expect(t.slot_mapping, DType::kI64, 1);
  t.slot_mapping.check_size(0, T, "num_tokens");
  expect(t.block_tables, DType::kI32, 2);
  const int64_t S = t.block_tables.size(0);
  expect(t.seq_lens, DType::kI32, 1);
  t.seq_lens.check_size(0, S, "num_seqs");
  expect(t.query_start_loc, DType::kI32, 1);
  t.query_start_loc.check_size(0, S + 1, "num_seqs + 1");
  check_slot_mapping(t.slot_mapping, k_cache0_->size(0) * k_cache0_->size(1));
  check_attention_metadata(t.hidden, *k_cache0_, t.block_tables, t.seq_lens, t.query_start_loc);
  return {T, t.hidden.ptr<float>(), t.residual.ptr<float>(), t.has_residual, t.cos.ptr<const float>(),
          t.sin.ptr<const float>(), t.slot_mapping.ptr<const int64_t>(), t.block_tables.ptr<const int32_t>(),
          t.seq_lens.ptr<const int32_t>(), t.query_start_loc.ptr<const int32_t>(), S, t.block_tables.size(1)};
}

void CpuDecoderOp::forward(const DecoderStepTensors& step) {
  std::lock_guard<std::mutex> lock(mutex_);
  decoder_.forward(checked_step(step));
}

}  // namespace fastllm

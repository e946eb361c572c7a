// Decoder::forward: DecoderLayer.forward (python/fastllm/model/layers.py) per layer, on
// the kernels its modules call, in the same order and with the same arguments, so the
// step's numbers are the module path's. What goes away is the per-op cost around them:
// ~10 Python -> C++ crossings, tensor allocations and module dispatch per layer.
#include "fastllm/cpu/decoder.h"

#include <algorithm>
#include <stdexcept>
#include <utility>

#include "fastllm/cpu/fused_ops.h"
#include "fastllm/cpu/kernels.h"

namespace fastllm::cpu {

Decoder::Decoder(const DecoderShape& shape, std::vector<DecoderLayerParams> layers)
    : shape_(shape), layers_(std::move(layers)) {}

void Decoder::bind_caches(const std::vector<float*>& caches, int64_t block_size) {
  if (caches.size() != 2 * layers_.size() || block_size <= 0) {
    throw std::invalid_argument("Decoder::bind_caches: expected one K and one V cache per layer, block_size > 0");
  }
  shape_.block_size = block_size;
  for (size_t i = 0; i < layers_.size(); ++i) {
    layers_[i].k_cache = caches[2 * i];
    layers_[i].v_cache = caches[2 * i + 1];
  }
  caches_bound_ = true;
}

// Each segment writes its columns of y (row stride out_features), as QuantLinear's
// per-segment calls do; its bias is the matching slice.
void Decoder::linear(const LinearParams& p, const float* x, float* y, int64_t T) {
  int64_t row = 0;
  for (const LinearSegment& s : p.segments) {
    quant_matmul(x, p.in_features, s.weight, p.bias ? p.bias + row : nullptr, y + row, p.out_features, T,
                 p.in_features, s.rows, s.type);
    row += s.rows;
  }
}

void Decoder::reserve(int64_t T) {
  const int64_t q = shape_.num_heads * shape_.head_dim, kv = shape_.num_kv_heads * shape_.head_dim;
  auto grow = [](std::vector<float>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  };
  grow(qkv_, T * (q + 2 * kv));
  grow(query_, T > 1 ? T * q : 0);
  grow(attn_, T * q);
  grow(gate_up_, T * 2 * shape_.intermediate);
  grow(act_, T * shape_.intermediate);
}

void Decoder::forward(const DecoderStep& step) {
  if (!caches_bound_) throw std::logic_error("Decoder::forward: bind_caches first");
  if (step.num_tokens <= 0) return;
  reserve(step.num_tokens);
  DecoderStep s = step;
  for (const DecoderLayerParams& layer : layers_) {
    layer_forward(layer, s);
    s.has_residual = true;
  }
}

// Attention's part of a layer: qkv projection, RoPE on q and k in place in the qkv rows,
// k/v into the cache, attention into attn_ [T, Hq, D].
void Decoder::attention(const DecoderLayerParams& layer, const DecoderStep& step) {
  const int64_t T = step.num_tokens, D = shape_.head_dim;
  const int64_t q = shape_.num_heads * D, kv = shape_.num_kv_heads * D, stride = q + 2 * kv;
  float* qkv = qkv_.data();
  linear(layer.qkv, step.hidden, qkv, T);
  rotary_embedding_f32(qkv, qkv + q, step.cos, step.sin, T, shape_.num_heads, shape_.num_kv_heads, D, stride, stride);
  reshape_and_cache(qkv + q, qkv + q + kv, layer.k_cache, layer.v_cache, step.slot_mapping, T, kv, stride, stride,
                    sizeof(float));
  // The CPU attention reads a contiguous query: q rows out of the qkv rows when T > 1.
  const float* query = qkv;
  if (T > 1) {
    for (int64_t t = 0; t < T; ++t) std::copy(qkv + t * stride, qkv + t * stride + q, query_.data() + t * q);
    query = query_.data();
  }
  const PagedAttentionShape shape{T, step.num_seqs, shape_.num_heads, shape_.num_kv_heads, D, shape_.block_size,
                                  step.max_blocks_per_seq};
  paged_attention<float>(attn_.data(), query, layer.k_cache, layer.v_cache, step.block_tables, step.seq_lens,
                         step.query_start_loc, shape, shape_.scale);
}

void Decoder::layer_forward(const DecoderLayerParams& layer, const DecoderStep& step) {
  const int64_t T = step.num_tokens, H = shape_.hidden, I = shape_.intermediate;
  if (!step.has_residual) {  // the stream starts at the embeddings: residual = hidden
    std::copy(step.hidden, step.hidden + T * H, step.residual);
    rms_norm_f32(step.hidden, step.residual, layer.input_norm, T, H, shape_.eps);
  } else {
    fused_add_rms_norm_f32(step.hidden, step.residual, layer.input_norm, T, H, shape_.eps);
  }
  attention(layer, step);
  linear(layer.o, attn_.data(), step.hidden, T);
  fused_add_rms_norm_f32(step.hidden, step.residual, layer.post_norm, T, H, shape_.eps);
  linear(layer.gate_up, step.hidden, gate_up_.data(), T);
  silu_and_mul_f32(act_.data(), gate_up_.data(), T, I);
  linear(layer.down, act_.data(), step.hidden, T);
}

}  // namespace fastllm::cpu

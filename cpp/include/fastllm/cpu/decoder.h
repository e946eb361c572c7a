// The Llama-family decoder layers of one CPU step in one call: the math of
// python/fastllm/model/layers.py's DecoderLayer.forward on fp32 activations, run on the
// same kernels its modules call (quant_matmul, the fused elementwise ops, reshape_and_cache,
// paged_attention), with no Python between them. Plain pointers and sizes, no framework
// types; fastllm/cpu_decoder_op.h checks the tensors that fill these structs.
#pragma once
#include <cstdint>
#include <vector>

#include "fastllm/cpu/quant.h"

namespace fastllm::cpu {

// A run of output rows stored in one type: weight [rows, row_bytes] (GGUF blocks, or
// F32/F16/BF16 rows read as bytes).
struct LinearSegment {
  const uint8_t* weight = nullptr;
  QuantType type = QuantType::kF32;
  int64_t rows = 0;
};

// y [T, out] = x [T, in] @ W^T + bias; W the segments in output-row order (a fused q|k|v
// whose parts were stored in different types is several segments).
struct LinearParams {
  std::vector<LinearSegment> segments;
  const float* bias = nullptr;  // fp32 [out_features] or null
  int64_t in_features = 0, out_features = 0;
};

struct DecoderLayerParams {
  const float* input_norm = nullptr;  // [hidden]
  const float* post_norm = nullptr;   // [hidden]
  LinearParams qkv;                   // hidden -> [q (Hq*D) | k (Hkv*D) | v (Hkv*D)]
  LinearParams o;                     // Hq*D -> hidden
  LinearParams gate_up;               // hidden -> [gate (I) | up (I)]
  LinearParams down;                  // I -> hidden
  float* k_cache = nullptr;           // [num_blocks, block_size, Hkv, D] (bind_caches)
  float* v_cache = nullptr;
};

struct DecoderShape {
  int64_t hidden = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0, intermediate = 0;
  float eps = 1e-5f;
  float scale = 1.f;  // attention's softmax scale (head_dim^-0.5)
  int64_t block_size = 0;  // the KV caches' (set by bind_caches)
};

// One step: T tokens of S sequences, flattened as the engine lays them out.
struct DecoderStep {
  int64_t num_tokens = 0;
  float* hidden = nullptr;      // [T, hidden] in: embeddings / previous output; out: last MLP output
  float* residual = nullptr;    // [T, hidden] in (if has_residual) and out: the residual stream
  bool has_residual = false;    // false: the first layer starts the stream from `hidden`
  const float* cos = nullptr;   // [T, D/2]
  const float* sin = nullptr;   // [T, D/2]
  const int64_t* slot_mapping = nullptr;     // [T], -1 = don't cache
  const int32_t* block_tables = nullptr;     // [S, max_blocks_per_seq]
  const int32_t* seq_lens = nullptr;         // [S]
  const int32_t* query_start_loc = nullptr;  // [S + 1]
  int64_t num_seqs = 0, max_blocks_per_seq = 0;
};

// Holds the layers and the scratch buffers of a step (grown, never shrunk or freed per
// call). Not thread-safe: one step at a time per object.
class Decoder {
 public:
  Decoder(const DecoderShape& shape, std::vector<DecoderLayerParams> layers);

  const DecoderShape& shape() const { return shape_; }
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  // caches[2 * i], caches[2 * i + 1]: layer i's K and V cache, blocks of block_size tokens.
  void bind_caches(const std::vector<float*>& caches, int64_t block_size);
  bool caches_bound() const { return caches_bound_; }

  // Every layer on the step, in place on step.hidden / step.residual.
  void forward(const DecoderStep& step);

 private:
  void layer_forward(const DecoderLayerParams& layer, const DecoderStep& step);
  void attention(const DecoderLayerParams& layer, const DecoderStep& step);
  static void linear(const LinearParams& p, const float* x, float* y, int64_t T);
  void reserve(int64_t T);

  DecoderShape shape_;
  std::vector<DecoderLayerParams> layers_;
  bool caches_bound_ = false;
  std::vector<float> qkv_;      // [T, q + 2 kv]
  std::vector<float> query_;    // [T, q]: a contiguous copy of q for T > 1
  std::vector<float> attn_;     // [T, q]
  std::vector<float> gate_up_;  // [T, 2I]
  std::vector<float> act_;      // [T, I]
};

}  // namespace fastllm::cpu

// The CPU decoder (fastllm/cpu/decoder.h) as the bindings see it: built once from the
// model's weights as TensorViews, every one checked at build (CPU, dtype, contiguity,
// shape against the model shape; ValueError naming the layer and tensor); the KV caches
// checked when bound; per step only the step's tensors are checked.
#pragma once
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "fastllm/cpu/decoder.h"
#include "fastllm/tensor_view.h"

namespace fastllm {

// One linear layer: its weight segments in output-row order, each uint8 [rows, row_bytes]
// in a ggml type (GGUF blocks, or F32/F16/BF16 rows viewed as bytes), and an optional
// float32 bias [out_features].
struct LinearTensors {
  std::vector<std::pair<TensorView, int>> segments;  // (weight, ggml_type)
  std::optional<TensorView> bias;
};

struct DecoderLayerTensors {
  TensorView input_norm, post_norm;  // float32 [hidden]
  LinearTensors qkv, o, gate_up, down;
};

// The step's tensors, all CPU and contiguous: hidden, residual float32 [T, hidden]
// (distinct); cos, sin float32 [T, head_dim / 2]; slot_mapping int64 [T]; block_tables
// int32 [S, max_blocks]; seq_lens int32 [S]; query_start_loc int32 [S + 1].
struct DecoderStepTensors {
  TensorView hidden, residual, cos, sin, slot_mapping, block_tables, seq_lens, query_start_loc;
  bool has_residual = false;  // false: the first layer starts the residual stream from hidden
};

class CpuDecoderOp {
 public:
  CpuDecoderOp(const cpu::DecoderShape& shape, const std::vector<DecoderLayerTensors>& layers);

  int64_t num_layers() const { return decoder_.num_layers(); }
  // One (k_cache, v_cache) per layer, each float32 [num_blocks, block_size, Hkv, D], all the
  // same shape. Replaces the caches bound before.
  void bind_kv_caches(const std::vector<std::pair<TensorView, TensorView>>& caches);
  // Runs every layer on the step in place (hidden <- last MLP output, residual <- stream).
  void forward(const DecoderStepTensors& step);

 private:
  cpu::DecoderStep checked_step(const DecoderStepTensors& step) const;

  cpu::Decoder decoder_;
  std::optional<TensorView> k_cache0_;  // layer 0's bound K cache: the step's slots and blocks are checked on it
  std::mutex mutex_;                    // one step at a time (the scratch buffers are shared)
};

}  // namespace fastllm

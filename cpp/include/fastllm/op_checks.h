// Value checks of a step's paged-KV metadata that read the index tensors (CPU tensors
// only: on a GPU they would cost a device sync). Shared by the ops (ops.cc) and the CPU
// decoder (cpu_decoder_op.cc); ArgValueError names the tensor and the bad entry.
#pragma once
#include <cstdint>

#include "fastllm/tensor_view.h"

namespace fastllm {

// slot_mapping int64 [T]: every slot in [-1, num_slots) (-1: not cached).
void check_slot_mapping(const TensorView& slot_mapping, int64_t num_slots);

// query_start_loc [S + 1] from 0 to query.size(0), non-decreasing; q_len <= seq_len; each
// sequence's used blocks within block_tables' width and k_cache's block ids.
void check_attention_metadata(const TensorView& query, const TensorView& k_cache, const TensorView& block_tables,
                              const TensorView& seq_lens, const TensorView& query_start_loc);

}  // namespace fastllm

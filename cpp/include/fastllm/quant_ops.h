// Linear layers on GGUF-quantized weights, as the bindings see them: validated
// TensorViews in, the CPU kernels (cpu/quant.h) or the CUDA launchers by device.
#pragma once
#include <cstdint>
#include <string>

#include "fastllm/tensor_view.h"

namespace fastllm {

// out [T, N] float32 = x [T, K] float32 @ W^T + bias. weight: uint8 [N, row_bytes], each row
// K / block_elems blocks of `ggml_type` (a GGUF tensor's bytes as stored); bias: float32
// [N] or null. x and out may have any row stride (their last dim contiguous). ValueError
// names the argument on a bad shape, type or K.
void quant_linear(const TensorView& out, const TensorView& x, const TensorView& weight, const TensorView* bias,
                  int ggml_type, int64_t stream);

// out [N, K] float32 = the weight's values (CPU: the kernels' decoder; tests and fallbacks).
void quant_dequantize(const TensorView& out, const TensorView& weight, int ggml_type);

// (block_elems, block_bytes) of a ggml type; ValueError for a type these kernels lack.
std::pair<int, int> quant_block_shape(int ggml_type);

// The CPU kernels' build ("avx2" or "generic"), and a switch to force the generic one.
std::string quant_cpu_isa();
void quant_cpu_force_generic(bool generic);
// The AVX2 kernels' int8 activations (cpu/quant.h): on by default.
void quant_cpu_set_int8_activations(bool on);

// Threads of the CPU kernels' pool (the caller included).
int cpu_num_threads();
void set_cpu_num_threads(int n);

}  // namespace fastllm

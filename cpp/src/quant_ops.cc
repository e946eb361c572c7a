#include "fastllm/quant_ops.h"

#include <utility>

#include "fastllm/cpu/quant.h"
#include "fastllm/cpu/thread_pool.h"
#include "fastllm/errors.h"
#ifdef FASTLLM_WITH_CUDA
#include "fastllm/cuda/launchers.h"
#include "fastllm/cuda/quant_launchers.h"
#endif

namespace fastllm {

std::pair<int, int> quant_block_shape(int ggml_type) {
  cpu::QuantFormat f{};
  if (!cpu::quant_format(ggml_type, &f)) {
    throw ArgValueError("ggml_type: type " + std::to_string(ggml_type) +
                        " is not supported (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)");
  }
  return {f.block_elems, f.block_bytes};
}

static void check_rows(const TensorView& t) {
  t.check_rank(2).check_dtype(DType::kF32);
  if (t.size(1) > 1 && t.strides[1] != 1) throw ArgValueError(t.name + ": the last dim must be contiguous");
  if (t.size(0) > 1 && t.strides[0] < t.size(1)) throw ArgValueError(t.name + ": rows overlap (row stride < cols)");
}

// K from the weight's row bytes; checks the weight against x and the block shape.
static int64_t check_weight(const TensorView& weight, int64_t K, int ggml_type) {
  const auto [block_elems, block_bytes] = quant_block_shape(ggml_type);
  weight.check_rank(2).check_dtype(DType::kU8).check_contiguous();
  if (K % block_elems != 0) {
    throw ArgValueError("x: in_features " + std::to_string(K) + " is not a multiple of the block size " +
                        std::to_string(block_elems));
  }
  weight.check_size(1, K / block_elems * block_bytes, "bytes per row = in_features / block_elems * block_bytes");
  return K;
}

void quant_linear(const TensorView& out, const TensorView& x, const TensorView& weight, const TensorView* bias,
                  int ggml_type, int64_t stream) {
  check_rows(x);
  check_rows(out);
  const int64_t T = x.size(0), K = x.size(1);
  check_weight(weight, K, ggml_type);
  const int64_t N = weight.size(0);
  out.check_size(0, T, "num_tokens").check_size(1, N, "out_features").check_same_device(x);
  weight.check_same_device(x);
  if (bias != nullptr) bias->check_rank(1).check_dtype(DType::kF32).check_contiguous().check_size(0, N, "out_features").check_same_device(x);
  const float* b = bias ? bias->ptr<const float>() : nullptr;
  if (T == 0 || N == 0) return;
  if (x.device == Device::kCPU) {
    cpu::quant_matmul(x.ptr<const float>(), x.size(0) > 1 ? x.strides[0] : K, weight.ptr<const uint8_t>(), b,
                      out.ptr<float>(), out.size(0) > 1 ? out.strides[0] : N, T, K, N,
                      static_cast<cpu::QuantType>(ggml_type));
    return;
  }
#ifdef FASTLLM_WITH_CUDA
  const cuda::DeviceGuard device_guard(x.device_id);
  cudaError_t err = device_guard.status();
  if (err == cudaSuccess) {
    err = cuda::quant_matmul(x.ptr<const float>(), x.size(0) > 1 ? x.strides[0] : K, weight.ptr<const uint8_t>(), b,
                             out.ptr<float>(), out.size(0) > 1 ? out.strides[0] : N, T, K, N, ggml_type,
                             reinterpret_cast<cudaStream_t>(stream));
  }
  if (err != cudaSuccess) throw std::runtime_error(std::string("quant_linear: CUDA error: ") + cudaGetErrorString(err));
#else
  (void)stream;
  throw ArgValueError("x: a CUDA tensor, but fastllm._C was built without CUDA kernels");
#endif
}

void quant_dequantize(const TensorView& out, const TensorView& weight, int ggml_type) {
  out.check_rank(2).check_dtype(DType::kF32).check_contiguous();
  const int64_t K = out.size(1);
  check_weight(weight, K, ggml_type);
  const int64_t N = weight.size(0);
  out.check_size(0, N, "rows");
  if (out.device != Device::kCPU || weight.device != Device::kCPU) {
    throw ArgValueError("weight: quant_dequantize runs on CPU tensors");
  }
  cpu::quant_dequantize(weight.ptr<const uint8_t>(), out.ptr<float>(), N, K, static_cast<cpu::QuantType>(ggml_type));
}

std::string quant_cpu_isa() { return cpu::quant_isa(); }
void quant_cpu_force_generic(bool generic) { cpu::quant_force_generic(generic); }
void quant_cpu_set_int8_activations(bool on) { cpu::quant_set_int8_activations(on); }
int cpu_num_threads() { return cpu::pool_num_threads(); }
void set_cpu_num_threads(int n) { cpu::set_pool_num_threads(n); }

}  // namespace fastllm

// A borrowed, non-owning view of a DLPack tensor plus the checks every op runs on
// its arguments. The Python caller keeps the tensor alive for the call.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "fastllm/dlpack.h"

namespace fastllm {

enum class DType { kF32, kF16, kBF16, kI32, kI64, kU8, kOther };  // kU8: raw quantized blocks
enum class Device { kCPU, kCUDA };

const char* dtype_name(DType dtype);
size_t dtype_size(DType dtype);

struct TensorView {
  std::string name;  // argument name, used in error messages
  void* data = nullptr;
  DType dtype = DType::kOther;
  Device device = Device::kCPU;
  int device_id = 0;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;

  // Reads a DLTensor, refusing devices and dtypes the core does not handle.
  static TensorView from_dlpack(const DLTensor& t, std::string name);

  int64_t dim() const { return static_cast<int64_t>(shape.size()); }
  int64_t size(int64_t d) const { return shape.at(d < 0 ? d + dim() : d); }
  int64_t numel() const;
  bool is_contiguous() const;
  template <typename T> T* ptr() const { return static_cast<T*>(data); }

  // Each check throws ArgTypeError/ArgValueError naming the argument.
  const TensorView& check_rank(int64_t rank) const;
  const TensorView& check_dtype(DType expected) const;
  const TensorView& check_float() const;  // f32, f16 or bf16
  const TensorView& check_contiguous() const;
  const TensorView& check_size(int64_t d, int64_t expected, const char* what) const;
  const TensorView& check_same_device(const TensorView& other) const;
  std::string shape_str() const;
};

}  // namespace fastllm

// The element types the core handles, shared by the CPU core and the CUDA launchers.
#pragma once
#include <cstddef>
#include <string>

namespace fastllm {

enum class DType { kF32, kF16, kBF16, kI32, kI64, kU8, kOther };  // kU8: raw quantized blocks

const char* dtype_name(DType dtype);  // "float32", "bfloat16", ...
size_t dtype_size(DType dtype);
// The inverse of dtype_name for the float types; ArgTypeError for any other name.
DType float_dtype_from_name(const std::string& name);

}  // namespace fastllm

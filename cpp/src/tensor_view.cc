#include "fastllm/tensor_view.h"

#include <sstream>

#include "fastllm/errors.h"

namespace fastllm {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "float32";
    case DType::kF16: return "float16";
    case DType::kBF16: return "bfloat16";
    case DType::kI32: return "int32";
    case DType::kI64: return "int64";
    case DType::kU8: return "uint8";
    default: return "unsupported";
  }
}

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kF32: case DType::kI32: return 4;
    case DType::kF16: case DType::kBF16: return 2;
    case DType::kI64: return 8;
    case DType::kU8: return 1;
    default: return 0;
  }
}

DType float_dtype_from_name(const std::string& name) {
  for (DType d : {DType::kF32, DType::kF16, DType::kBF16}) {
    if (name == dtype_name(d)) return d;
  }
  throw ArgTypeError("dtype: expected float32, float16 or bfloat16, got '" + name + "'");
}

static DType to_dtype(DLDataType t) {
  if (t.lanes != 1) return DType::kOther;
  if (t.code == kDLFloat && t.bits == 32) return DType::kF32;
  if (t.code == kDLFloat && t.bits == 16) return DType::kF16;
  if (t.code == kDLBfloat && t.bits == 16) return DType::kBF16;
  if (t.code == kDLInt && t.bits == 32) return DType::kI32;
  if (t.code == kDLInt && t.bits == 64) return DType::kI64;
  if (t.code == kDLUInt && t.bits == 8) return DType::kU8;
  return DType::kOther;
}

TensorView TensorView::from_dlpack(const DLTensor& t, std::string name) {
  TensorView v;
  v.name = std::move(name);
  if (t.device.device_type == kDLCPU) {
    v.device = Device::kCPU;
  } else if (t.device.device_type == kDLCUDA) {
    v.device = Device::kCUDA;
  } else {
    throw ArgValueError(v.name + ": unsupported device type " + std::to_string(t.device.device_type) +
                        " (expected a CPU or CUDA tensor)");
  }
  v.device_id = t.device.device_id;
  v.dtype = to_dtype(t.dtype);
  if (v.dtype == DType::kOther) {
    throw ArgTypeError(v.name + ": unsupported dtype (code " + std::to_string(t.dtype.code) + ", " +
                       std::to_string(t.dtype.bits) + " bits); expected float32/float16/bfloat16/int32/int64/uint8");
  }
  v.data = static_cast<char*>(t.data) + t.byte_offset;
  v.shape.assign(t.shape, t.shape + t.ndim);
  if (t.strides != nullptr) {
    v.strides.assign(t.strides, t.strides + t.ndim);
  } else {
    v.strides.assign(t.ndim, 1);
    for (int i = t.ndim - 2; i >= 0; --i) v.strides[i] = v.strides[i + 1] * v.shape[i + 1];
  }
  return v;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

bool TensorView::is_contiguous() const {
  int64_t expected = 1;
  for (int64_t d = dim() - 1; d >= 0; --d) {
    if (shape[d] != 1 && strides[d] != expected) return false;  // size-1 dims may have any stride
    expected *= shape[d];
  }
  return true;
}

std::string TensorView::shape_str() const {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << "]";
  return s.str();
}

const TensorView& TensorView::check_rank(int64_t rank) const {
  if (dim() != rank) {
    throw ArgValueError(name + ": expected a " + std::to_string(rank) + "-d tensor, got shape " + shape_str());
  }
  return *this;
}

const TensorView& TensorView::check_dtype(DType expected) const {
  if (dtype != expected) {
    throw ArgTypeError(name + ": expected dtype " + dtype_name(expected) + ", got " + dtype_name(dtype));
  }
  return *this;
}

const TensorView& TensorView::check_float() const {
  if (dtype != DType::kF32 && dtype != DType::kF16 && dtype != DType::kBF16) {
    throw ArgTypeError(name + ": expected float32, float16 or bfloat16, got " + dtype_name(dtype));
  }
  return *this;
}

const TensorView& TensorView::check_contiguous() const {
  if (!is_contiguous()) throw ArgValueError(name + ": expected a contiguous tensor (call .contiguous())");
  return *this;
}

const TensorView& TensorView::check_size(int64_t d, int64_t expected, const char* what) const {
  if (size(d) != expected) {
    throw ArgValueError(name + ": dim " + std::to_string(d) + " (" + what + ") must be " +
                        std::to_string(expected) + ", got shape " + shape_str());
  }
  return *this;
}

const TensorView& TensorView::check_same_device(const TensorView& other) const {
  if (device != other.device || device_id != other.device_id) {
    throw ArgValueError(name + ": must be on the same device as " + other.name);
  }
  return *this;
}

}  // namespace fastllm

#include <gtest/gtest.h>

#include <vector>

#include "fastllm/errors.h"
#include "fastllm/tensor_view.h"

using fastllm::TensorView;

static DLTensor make(float* data, std::vector<int64_t>& shape, std::vector<int64_t>* strides, uint8_t code = kDLFloat,
                     uint8_t bits = 32) {
  DLTensor t{};
  t.data = data;
  t.device = {kDLCPU, 0};
  t.ndim = static_cast<int32_t>(shape.size());
  t.dtype = {code, bits, 1};
  t.shape = shape.data();
  t.strides = strides ? strides->data() : nullptr;
  return t;
}

TEST(TensorView, ReadsShapeDtypeAndContiguity) {
  float buf[24];
  std::vector<int64_t> shape{2, 3, 4}, strides{12, 4, 1}, transposed{1, 2, 6};
  auto v = TensorView::from_dlpack(make(buf, shape, &strides), "query");
  EXPECT_EQ(v.dtype, fastllm::DType::kF32);
  EXPECT_EQ(v.numel(), 24);
  EXPECT_TRUE(v.is_contiguous());
  EXPECT_TRUE(TensorView::from_dlpack(make(buf, shape, nullptr), "q").is_contiguous());
  EXPECT_FALSE(TensorView::from_dlpack(make(buf, shape, &transposed), "q").is_contiguous());
}

TEST(TensorView, ChecksNameTheArgument) {
  float buf[24];
  std::vector<int64_t> shape{2, 3, 4}, transposed{1, 2, 6};
  auto v = TensorView::from_dlpack(make(buf, shape, &transposed), "key");
  try {
    v.check_contiguous();
    FAIL() << "expected an error";
  } catch (const fastllm::ArgValueError& e) {
    EXPECT_NE(std::string(e.what()).find("key"), std::string::npos);
  }
  EXPECT_THROW(v.check_rank(2), fastllm::ArgValueError);
  EXPECT_THROW(v.check_dtype(fastllm::DType::kI32), fastllm::ArgTypeError);
  EXPECT_THROW(TensorView::from_dlpack(make(buf, shape, nullptr, kDLUInt, 16), "x"), fastllm::ArgTypeError);
  // uint8: the raw blocks of a quantized weight (quant_linear).
  EXPECT_EQ(TensorView::from_dlpack(make(buf, shape, nullptr, kDLUInt, 8), "w").dtype, fastllm::DType::kU8);
}

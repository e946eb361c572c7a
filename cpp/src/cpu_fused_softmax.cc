// Row-wise scale (times an optional per-row scale) + causal mask + softmax: one read and
// one write of each element.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "fastllm/cpu/float16.h"
#include "fastllm/cpu/kernels.h"
#include "fastllm/cpu/parallel.h"

namespace fastllm::cpu {

template <typename T>
void fused_softmax(T* out, const T* scores, const float* row_scale, int64_t num_rows, int64_t num_cols,
                   int64_t rows_per_matrix, float scale, bool causal, int64_t causal_offset) {
  parallel_for(num_rows, std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(num_cols, 1)), [&](int64_t begin, int64_t end) {
    std::vector<float> row(num_cols);
    for (int64_t r = begin; r < end; ++r) {
      const T* x = scores + r * num_cols;
      T* y = out + r * num_cols;
      const float row_s = row_scale != nullptr ? scale * row_scale[r] : scale;  // as the CUDA kernel rounds it
      int64_t visible = num_cols;  // columns [0, visible) survive the causal mask
      if (causal) visible = std::max<int64_t>(0, std::min<int64_t>(num_cols, r % rows_per_matrix + causal_offset + 1));
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < visible; ++c) { row[c] = to_float(x[c]) * row_s; m = std::max(m, row[c]); }
      float sum = 0.f;
      if (m != -std::numeric_limits<float>::infinity()) {
        for (int64_t c = 0; c < visible; ++c) { row[c] = std::exp(row[c] - m); sum += row[c]; }
      }
      const float inv = sum > 0.f ? 1.f / sum : 0.f;  // a fully masked row becomes zeros, not NaN
      for (int64_t c = 0; c < visible; ++c) y[c] = from_float<T>(sum > 0.f ? row[c] * inv : 0.f);
      for (int64_t c = visible; c < num_cols; ++c) y[c] = from_float<T>(0.f);
    }
  });
}

template void fused_softmax<float>(float*, const float*, const float*, int64_t, int64_t, int64_t, float, bool, int64_t);
template void fused_softmax<Half>(Half*, const Half*, const float*, int64_t, int64_t, int64_t, float, bool, int64_t);
template void fused_softmax<BFloat16>(BFloat16*, const BFloat16*, const float*, int64_t, int64_t, int64_t, float, bool, int64_t);

}  // namespace fastllm::cpu

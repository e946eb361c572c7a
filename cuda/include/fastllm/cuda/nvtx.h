// Named NVTX range for the scope of a launcher, so Nsight timelines show each kernel
// under its op name. Header-only NVTX3 from the CUDA toolkit; a no-op without a profiler.
#pragma once
#include <nvtx3/nvToolsExt.h>

namespace fastllm::cuda {

struct NvtxRange {
  explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
  ~NvtxRange() { nvtxRangePop(); }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

}  // namespace fastllm::cuda

#define FASTLLM_NVTX_CONCAT2(a, b) a##b
#define FASTLLM_NVTX_CONCAT(a, b) FASTLLM_NVTX_CONCAT2(a, b)
#define FASTLLM_NVTX_RANGE(name) ::fastllm::cuda::NvtxRange FASTLLM_NVTX_CONCAT(nvtx_range_, __LINE__)(name)

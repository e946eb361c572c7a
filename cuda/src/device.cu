#include "fastllm/cuda/launchers.h"

namespace fastllm::cuda {

int device_count() {
  int n = 0;
  // The runtime is linked statically; with no driver this returns an error, not a crash.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls are not poisoned
    return 0;
  }
  return n;
}

DeviceGuard::DeviceGuard(int device) {
  if (device < 0) return;
  int current = 0;
  status_ = cudaGetDevice(&current);
  if (status_ == cudaSuccess && current != device) {
    status_ = cudaSetDevice(device);
    if (status_ == cudaSuccess) previous_ = current;
  }
  if (status_ != cudaSuccess) cudaGetLastError();
}

DeviceGuard::~DeviceGuard() {
  if (previous_ >= 0) cudaSetDevice(previous_);
}

}  // namespace fastllm::cuda

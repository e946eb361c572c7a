// The NCCL communicator: libnccl opened at run time (dlopen), so neither the build nor
// `import fastllm` needs NCCL. Only the few NCCL types and functions used here are
// declared (nccl_communicator.cc), with the values NCCL's own nccl.h gives them.
//
// Every op enqueues on the stream it is given (a cudaStream_t as an integer) and never
// synchronises, so the ops can be captured in a CUDA graph. Tensors are CUDA tensors on
// the communicator's device, contiguous, of dtype f32/f16/bf16/i32/i64/u8.
#pragma once
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "fastllm/tensor_view.h"

namespace fastllm {

// An NCCL call failed (its ncclGetErrorString text and the op), or the library could not
// be loaded (the paths tried and why each failed). Python sees a RuntimeError.
struct NcclError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct NcclFunctions;  // the resolved symbols (nccl_communicator.cc)

// One loaded libnccl. Never unloaded: NCCL keeps process-wide state (proxy threads,
// its CUDA module) that unloading under a live communicator would break.
class NcclLibrary {
 public:
  static constexpr size_t kUniqueIdBytes = 128;  // sizeof(ncclUniqueId)

  // The first of `candidates` (file paths, or bare names for the loader's search path)
  // that opens and exports every function needed; NcclError naming each path tried and
  // why it failed when none does.
  static std::shared_ptr<NcclLibrary> open(const std::vector<std::string>& candidates);

  const std::string& path() const { return path_; }
  int version() const;            // ncclGetVersion: e.g. 22703 for 2.27.3
  std::string unique_id() const;  // ncclGetUniqueId: kUniqueIdBytes bytes, made by one rank
  const NcclFunctions& fn() const { return *fn_; }
  std::string error_text(int result) const;  // ncclGetErrorString (+ ncclGetLastError when exported)

  NcclLibrary(std::string path, std::unique_ptr<NcclFunctions> fn);
  ~NcclLibrary();

 private:
  std::string path_;
  std::unique_ptr<NcclFunctions> fn_;
};

// One rank's ncclComm_t over `world_size` ranks. Construction is collective (every rank
// calls it with the same unique id) and must run with `device` as the current CUDA device.
class NcclCommunicator {
 public:
  NcclCommunicator(std::shared_ptr<NcclLibrary> lib, const std::string& unique_id, int world_size, int rank,
                   int device);
  ~NcclCommunicator();  // aborts a communicator never closed: abort cannot hang on a dead peer
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const { return rank_; }
  int world_size() const { return world_size_; }
  int device() const { return device_; }

  void all_reduce(const TensorView& x, int64_t stream);  // in place, sum
  // out [world_size * x.numel()] elements: rank r's x at offset r * x.numel().
  void all_gather(const TensorView& out, const TensorView& x, int64_t stream);
  void broadcast(const TensorView& x, int root, int64_t stream);  // in place
  void send(const TensorView& x, int peer, int64_t stream);
  void recv(const TensorView& x, int peer, int64_t stream);

  void destroy();  // ncclCommDestroy (clean shutdown; peers should still be alive)
  void abort();    // ncclCommAbort (a peer died or hangs); both idempotent

 private:
  void check_tensor(const TensorView& t, const char* op) const;
  void check_peer(int peer, const char* what, const char* op) const;
  void check(int result, const char* op) const;
  void* live_comm(const char* op) const;

  std::shared_ptr<NcclLibrary> lib_;
  void* comm_ = nullptr;  // ncclComm_t; null once destroyed or aborted
  int world_size_, rank_, device_;
};

}  // namespace fastllm

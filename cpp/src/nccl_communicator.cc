// NCCL through dlopen: the types below mirror NCCL's nccl.h (ABI-stable since 2.x), so
// the build needs no NCCL and a machine without it only fails when a communicator is made.
#include "fastllm/nccl.h"

#include <dlfcn.h>

#include <cstring>
#include <utility>

#include "fastllm/errors.h"

namespace fastllm {

namespace {
struct UniqueId {  // ncclUniqueId: passed by value to ncclCommInitRank
  char internal[NcclLibrary::kUniqueIdBytes];
};
using Comm = void*;    // ncclComm_t (opaque pointer)
using Stream = void*;  // cudaStream_t
constexpr int kSuccess = 0;  // ncclSuccess
constexpr int kSum = 0;      // ncclSum

// ncclDataType_t values of nccl.h.
int nccl_dtype(DType dtype) {
  switch (dtype) {
    case DType::kU8: return 1;    // ncclUint8
    case DType::kI32: return 2;   // ncclInt32
    case DType::kI64: return 4;   // ncclInt64
    case DType::kF16: return 6;   // ncclFloat16
    case DType::kF32: return 7;   // ncclFloat32
    case DType::kBF16: return 9;  // ncclBfloat16
    default: return -1;
  }
}

Stream as_stream(int64_t stream) { return reinterpret_cast<Stream>(static_cast<intptr_t>(stream)); }
}  // namespace

// ncclResult_t and the enums are C enums: int-sized, passed as int.
struct NcclFunctions {
  int (*get_version)(int*);
  int (*get_unique_id)(UniqueId*);
  int (*comm_init_rank)(Comm*, int, UniqueId, int);
  int (*comm_destroy)(Comm);
  int (*comm_abort)(Comm);
  const char* (*get_error_string)(int);
  int (*all_reduce)(const void*, void*, size_t, int, int, Comm, Stream);
  int (*all_gather)(const void*, void*, size_t, int, Comm, Stream);
  int (*broadcast)(const void*, void*, size_t, int, int, Comm, Stream);
  int (*send)(const void*, size_t, int, int, Comm, Stream);
  int (*recv)(void*, size_t, int, int, Comm, Stream);
  const char* (*get_last_error)(Comm) = nullptr;  // NCCL >= 2.13; optional
};

// Resolves every needed symbol of `handle`; the name of the first one missing, or "".
static std::string resolve(void* handle, NcclFunctions& f) {
  const std::pair<const char*, void**> required[] = {
      {"ncclGetVersion", reinterpret_cast<void**>(&f.get_version)},
      {"ncclGetUniqueId", reinterpret_cast<void**>(&f.get_unique_id)},
      {"ncclCommInitRank", reinterpret_cast<void**>(&f.comm_init_rank)},
      {"ncclCommDestroy", reinterpret_cast<void**>(&f.comm_destroy)},
      {"ncclCommAbort", reinterpret_cast<void**>(&f.comm_abort)},
      {"ncclGetErrorString", reinterpret_cast<void**>(&f.get_error_string)},
      {"ncclAllReduce", reinterpret_cast<void**>(&f.all_reduce)},
      {"ncclAllGather", reinterpret_cast<void**>(&f.all_gather)},
      {"ncclBroadcast", reinterpret_cast<void**>(&f.broadcast)},
      {"ncclSend", reinterpret_cast<void**>(&f.send)},
      {"ncclRecv", reinterpret_cast<void**>(&f.recv)},
  };
  for (const auto& [name, slot] : required) {
    *slot = dlsym(handle, name);
    if (*slot == nullptr) return name;
  }
  *reinterpret_cast<void**>(&f.get_last_error) = dlsym(handle, "ncclGetLastError");
  return "";
}

std::shared_ptr<NcclLibrary> NcclLibrary::open(const std::vector<std::string>& candidates) {
  std::string tried;
  for (const std::string& path : candidates) {
    dlerror();
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      const char* err = dlerror();
      std::string why = err ? err : "";
      if (why.rfind(path + ": ", 0) == 0) why.erase(0, path.size() + 2);  // dlerror repeats the path
      tried += "\n  " + path + ": " + (why.empty() ? "dlopen failed" : why);
      continue;
    }
    auto fn = std::make_unique<NcclFunctions>();
    const std::string missing = resolve(handle, *fn);
    if (!missing.empty()) {
      dlclose(handle);  // not NCCL: nothing of it is in use
      tried += "\n  " + path + ": does not export " + missing + " (not an NCCL library)";
      continue;
    }
    return std::make_shared<NcclLibrary>(path, std::move(fn));
  }
  throw NcclError("could not load NCCL (set FASTLLM_NCCL_SO to the path of libnccl.so.2); tried:" +
                  (tried.empty() ? std::string("\n  (no candidate paths)") : tried));
}

NcclLibrary::NcclLibrary(std::string path, std::unique_ptr<NcclFunctions> fn)
    : path_(std::move(path)), fn_(std::move(fn)) {}
NcclLibrary::~NcclLibrary() = default;  // the handle stays open on purpose (nccl.h)

std::string NcclLibrary::error_text(int result) const {
  const char* text = fn_->get_error_string(result);
  std::string s = (text ? text : "unknown NCCL error") + std::string(" (ncclResult_t ") + std::to_string(result) + ")";
  const char* last = fn_->get_last_error ? fn_->get_last_error(nullptr) : nullptr;
  if (last != nullptr && last[0] != '\0') s += ": " + std::string(last);
  return s;
}

int NcclLibrary::version() const {
  int v = 0;
  const int r = fn_->get_version(&v);
  if (r != kSuccess) throw NcclError("NCCL ncclGetVersion failed: " + error_text(r));
  return v;
}

std::string NcclLibrary::unique_id() const {
  UniqueId id;
  std::memset(&id, 0, sizeof(id));
  const int r = fn_->get_unique_id(&id);
  if (r != kSuccess) throw NcclError("NCCL ncclGetUniqueId failed: " + error_text(r));
  return std::string(id.internal, sizeof(id.internal));
}

NcclCommunicator::NcclCommunicator(std::shared_ptr<NcclLibrary> lib, const std::string& unique_id, int world_size,
                                   int rank, int device)
    : lib_(std::move(lib)), world_size_(world_size), rank_(rank), device_(device) {
  if (unique_id.size() != NcclLibrary::kUniqueIdBytes) {
    throw ArgValueError("unique_id: expected " + std::to_string(NcclLibrary::kUniqueIdBytes) + " bytes, got " +
                        std::to_string(unique_id.size()));
  }
  if (world_size < 1) throw ArgValueError("world_size: must be >= 1, got " + std::to_string(world_size));
  if (rank < 0 || rank >= world_size) {
    throw ArgValueError("rank: must be in [0, " + std::to_string(world_size) + "), got " + std::to_string(rank));
  }
  if (device < 0) throw ArgValueError("device: a CUDA device index >= 0, got " + std::to_string(device));
  UniqueId id;
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
  Comm comm = nullptr;
  check(lib_->fn().comm_init_rank(&comm, world_size, id, rank), "ncclCommInitRank");
  comm_ = comm;
}

NcclCommunicator::~NcclCommunicator() {
  if (comm_ != nullptr) lib_->fn().comm_abort(comm_);  // errors ignored: nothing to report them to
}

void NcclCommunicator::destroy() {
  if (comm_ == nullptr) return;
  Comm comm = std::exchange(comm_, nullptr);
  check(lib_->fn().comm_destroy(comm), "ncclCommDestroy");
}

void NcclCommunicator::abort() {
  if (comm_ == nullptr) return;
  Comm comm = std::exchange(comm_, nullptr);
  check(lib_->fn().comm_abort(comm), "ncclCommAbort");
}

void NcclCommunicator::check(int result, const char* op) const {
  if (result != kSuccess) throw NcclError("NCCL " + std::string(op) + " failed: " + lib_->error_text(result));
}

void* NcclCommunicator::live_comm(const char* op) const {
  if (comm_ == nullptr) throw NcclError(std::string("NCCL ") + op + ": the communicator is closed");
  return comm_;
}

void NcclCommunicator::check_tensor(const TensorView& t, const char* op) const {
  if (t.device != Device::kCUDA || t.device_id != device_) {
    throw ArgValueError(std::string(op) + ": " + t.name + " must be a CUDA tensor on cuda:" +
                        std::to_string(device_) + " (the communicator's device)");
  }
  if (!t.is_contiguous()) throw ArgValueError(std::string(op) + ": " + t.name + " must be contiguous");
  if (nccl_dtype(t.dtype) < 0) throw ArgTypeError(std::string(op) + ": " + t.name + " has an unsupported dtype");
}

void NcclCommunicator::check_peer(int peer, const char* what, const char* op) const {
  if (peer < 0 || peer >= world_size_) {
    throw ArgValueError(std::string(op) + ": " + what + " must be in [0, " + std::to_string(world_size_) +
                        "), got " + std::to_string(peer));
  }
}

void NcclCommunicator::all_reduce(const TensorView& x, int64_t stream) {
  check_tensor(x, "all_reduce");
  Comm comm = live_comm("all_reduce");
  check(lib_->fn().all_reduce(x.data, x.data, x.numel(), nccl_dtype(x.dtype), kSum, comm, as_stream(stream)),
        "all_reduce (ncclAllReduce)");
}

void NcclCommunicator::all_gather(const TensorView& out, const TensorView& x, int64_t stream) {
  check_tensor(x, "all_gather");
  check_tensor(out, "all_gather");
  out.check_dtype(x.dtype);
  if (out.numel() != x.numel() * world_size_) {
    throw ArgValueError("all_gather: out must hold world_size * x.numel() = " +
                        std::to_string(x.numel() * world_size_) + " elements, got " + std::to_string(out.numel()));
  }
  Comm comm = live_comm("all_gather");
  check(lib_->fn().all_gather(x.data, out.data, x.numel(), nccl_dtype(x.dtype), comm, as_stream(stream)),
        "all_gather (ncclAllGather)");
}

void NcclCommunicator::broadcast(const TensorView& x, int root, int64_t stream) {
  check_tensor(x, "broadcast");
  check_peer(root, "src", "broadcast");
  Comm comm = live_comm("broadcast");
  check(lib_->fn().broadcast(x.data, x.data, x.numel(), nccl_dtype(x.dtype), root, comm, as_stream(stream)),
        "broadcast (ncclBroadcast)");
}

void NcclCommunicator::send(const TensorView& x, int peer, int64_t stream) {
  check_tensor(x, "send");
  check_peer(peer, "dst", "send");
  Comm comm = live_comm("send");
  check(lib_->fn().send(x.data, x.numel(), nccl_dtype(x.dtype), peer, comm, as_stream(stream)), "send (ncclSend)");
}

void NcclCommunicator::recv(const TensorView& x, int peer, int64_t stream) {
  check_tensor(x, "recv");
  check_peer(peer, "src", "recv");
  Comm comm = live_comm("recv");
  check(lib_->fn().recv(x.data, x.numel(), nccl_dtype(x.dtype), peer, comm, as_stream(stream)), "recv (ncclRecv)");
}

}  // namespace fastllm

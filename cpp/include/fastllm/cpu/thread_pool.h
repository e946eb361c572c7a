// One persistent pool for the CPU matmul kernels (quantized and float GEMV/GEMM).
// Spawning std::threads per call (parallel.h) costs tens of microseconds, more than a
// decode-step GEMV; these workers stay alive, spin briefly after a job (the next linear
// of a decode step comes within microseconds) and then sleep, so they do not hold a core
// while torch's own threads work. Size it to torch.get_num_threads() (fastllm.ops does).
#pragma once
#include <cstdint>
#include <functional>

namespace fastllm::cpu {

// Threads that run a job, the caller included (>= 1).
int pool_num_threads();
// n <= 0: the hardware's thread count.
void set_pool_num_threads(int n);
// fn(task) for every task in [0, num_tasks), spread over the pool and the caller; returns
// when all have run. Calls are serialized; a call from inside a job runs inline.
void pool_run(int64_t num_tasks, const std::function<void(int64_t)>& fn);

}  // namespace fastllm::cpu

#include "fastllm/cpu/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace fastllm::cpu {
namespace {

thread_local bool in_pool_job = false;

class ThreadPool {
 public:
  ~ThreadPool() { resize(1); }

  int size() {
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    return static_cast<int>(workers_.size()) + 1;
  }

  void resize(int threads) {
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    stop_workers();
    // The generation is read here, not in the new thread: a thread that starts late must
    // still see the first job as new.
    const uint64_t seen = generation_.load();
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this, seen] { worker_loop(seen); });
  }

  void run(int64_t num_tasks, const std::function<void(int64_t)>& fn) {
    if (num_tasks <= 0) return;
    if (in_pool_job || num_tasks == 1) {
      for (int64_t t = 0; t < num_tasks; ++t) fn(t);
      return;
    }
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    if (workers_.empty()) {
      for (int64_t t = 0; t < num_tasks; ++t) fn(t);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &fn;
      num_tasks_ = num_tasks;
      next_task_.store(0);
      finished_.store(0);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    work(fn, num_tasks);
    const int64_t workers = static_cast<int64_t>(workers_.size());
    while (finished_.load(std::memory_order_acquire) < workers) std::this_thread::yield();
  }

 private:
  void work(const std::function<void(int64_t)>& fn, int64_t num_tasks) {
    in_pool_job = true;
    for (int64_t t = next_task_.fetch_add(1); t < num_tasks; t = next_task_.fetch_add(1)) fn(t);
    in_pool_job = false;
  }

  void worker_loop(uint64_t seen) {
    for (;;) {
      // Spin ~50 us for the next job of this step, then sleep on the condition variable.
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
      while (generation_.load(std::memory_order_acquire) == seen && !stop_.load() &&
             std::chrono::steady_clock::now() < spin_until) {
        std::this_thread::yield();
      }
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_.load() || generation_.load() != seen; });
      }
      if (stop_.load()) return;
      seen = generation_.load(std::memory_order_acquire);
      work(*job_, num_tasks_);
      finished_.fetch_add(1, std::memory_order_release);
    }
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_.store(true);
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
    workers_.clear();
    stop_.store(false);
  }

  std::mutex run_mutex_;  // one job at a time
  std::mutex mutex_;
  std::condition_variable wake_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> next_task_{0};
  std::atomic<int64_t> finished_{0};
  std::atomic<bool> stop_{false};
  const std::function<void(int64_t)>* job_ = nullptr;
  int64_t num_tasks_ = 0;
};

ThreadPool& pool() {
  static ThreadPool* instance = [] {
    auto* p = new ThreadPool();  // leaked on purpose: no join races at interpreter exit
    p->resize(static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
    return p;
  }();
  return *instance;
}

}  // namespace

int pool_num_threads() { return pool().size(); }

void set_pool_num_threads(int n) {
  if (n <= 0) n = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  pool().resize(std::min(n, 256));
}

void pool_run(int64_t num_tasks, const std::function<void(int64_t)>& fn) { pool().run(num_tasks, fn); }

}  // namespace fastllm::cpu

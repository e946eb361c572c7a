#include "fastllm/cpu/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <new>
#include <thread>

#include <pthread.h>
#include <vector>

namespace fastllm::cpu {
namespace {

thread_local bool in_pool_job = false;

// One call's work. Shared by the caller and every worker that picks it up, so a worker
// that wakes late (descheduled on a busy machine) still holds a live object; it finds
// every task claimed and never touches `fn`, which lives on the caller's stack.
struct Job {
  const std::function<void(int64_t)>* fn;
  int64_t num_tasks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void work(Job& job) {
  in_pool_job = true;
  for (int64_t t = job.next.fetch_add(1); t < job.num_tasks; t = job.next.fetch_add(1)) {
    (*job.fn)(t);
    job.done.fetch_add(1, std::memory_order_release);
  }
  in_pool_job = false;
}

class ThreadPool {
 public:
  int size() {
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    return static_cast<int>(workers_.size()) + 1;
  }

  // In a forked child the workers do not exist: forget them (their std::thread objects
  // are leaked, as joining or destroying them there is undefined) and run inline until a
  // resize starts new ones. Runs in the child right after fork().
  void forget_workers_after_fork() {
    new (&run_mutex_) std::mutex();
    new (&mutex_) std::mutex();
    new (&wake_) std::condition_variable();
    new std::vector<std::thread>(std::move(workers_));
    workers_.clear();
    stop_.store(false);
  }

  void resize(int threads) {
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    stop_workers();
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { worker_loop(); });
  }

  // The caller never waits for a worker that has not started: it runs whatever tasks are
  // left itself, and waits only for tasks already running elsewhere.
  void run(int64_t num_tasks, const std::function<void(int64_t)>& fn) {
    if (num_tasks <= 0) return;
    if (in_pool_job || num_tasks == 1) {
      for (int64_t t = 0; t < num_tasks; ++t) fn(t);
      return;
    }
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    auto job = std::make_shared<Job>();
    job->fn = &fn;
    job->num_tasks = num_tasks;
    if (!workers_.empty()) {
      {
        std::lock_guard<std::mutex> lock(mutex_);
        job_ = job;
        generation_.fetch_add(1, std::memory_order_release);
      }
      wake_.notify_all();
    }
    work(*job);
    while (job->done.load(std::memory_order_acquire) < num_tasks) std::this_thread::yield();
  }

 private:
  void worker_loop() {
    uint64_t seen = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      seen = generation_.load();
      if (job_) --seen;  // started after a job was posted: take it too (it may be over)
    }
    for (;;) {
      // Spin ~50 us for the next job of this step, then sleep on the condition variable.
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
      while (generation_.load(std::memory_order_acquire) == seen && !stop_.load() &&
             std::chrono::steady_clock::now() < spin_until) {
        std::this_thread::yield();
      }
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_.load() || generation_.load() != seen; });
        if (stop_.load()) return;
        seen = generation_.load();
        job = job_;
      }
      if (job) work(*job);
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
  std::mutex mutex_;      // guards job_ and the generation bump
  std::condition_variable wake_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stop_{false};
  std::shared_ptr<Job> job_;
};

ThreadPool& pool() {
  static ThreadPool* instance = [] {
    auto* p = new ThreadPool();  // leaked on purpose: no join races at interpreter exit
    p->resize(static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
    pthread_atfork(nullptr, nullptr, [] { pool().forget_workers_after_fork(); });
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

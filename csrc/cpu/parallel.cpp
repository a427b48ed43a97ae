#include "parallel.h"

#include "edpairs/ops.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace edpairs::cpu {
namespace {

int default_threads() {
  if (const char* env = std::getenv("EDPAIRS_NUM_THREADS")) {
    const long n = std::atol(env);
    if (n >= 1) return static_cast<int>(std::min<long>(n, kMaxCpuThreads));
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n >= 1) return n;
  }
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

thread_local bool t_inside_task = false;

class Pool {
 public:
  explicit Pool(int threads) : threads_(std::max(1, threads)) {}
  ~Pool() { stop(); }

  int threads() const { return threads_; }

  void resize(int threads) {
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    stop();
    threads_ = std::max(1, threads);
  }

  void run(int64_t n_tasks, const std::function<void(int64_t, int)>& fn, int max_width) {
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    int width = static_cast<int>(std::min<int64_t>(std::min(threads_, max_width), n_tasks));
    start_workers();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_ = &fn;
      n_tasks_ = n_tasks;
      width_ = width;
      next_.store(0);
      error_ = nullptr;
      pending_ = width - 1;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    work(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return pending_ == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void start_workers() {
    if (!workers_.empty()) return;
    stopping_ = false;
    // Workers must know the generation before the first job is posted, or they miss it.
    const uint64_t start = generation_.load(std::memory_order_acquire);
    for (int t = 1; t < threads_; ++t) workers_.emplace_back([this, t, start] { loop(t, start); });
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
    workers_.clear();
  }

  void work(int thread) {
    t_inside_task = true;
    try {
      for (;;) {
        int64_t task = next_.fetch_add(1, std::memory_order_relaxed);
        if (task >= n_tasks_) break;
        (*fn_)(task, thread);
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
      next_.store(n_tasks_);  // let the others stop early
    }
    t_inside_task = false;
  }

  void loop(int thread, uint64_t seen) {
    for (;;) {
      // Spin briefly before sleeping: kernels issue parallel_for in quick succession.
      auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
      while (generation_.load(std::memory_order_acquire) == seen &&
             std::chrono::steady_clock::now() < spin_until) {
        std::this_thread::yield();
      }
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        seen = generation_.load(std::memory_order_acquire);
        if (stopping_) return;
        if (thread >= width_) continue;  // this job needs fewer threads
      }
      work(thread);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (--pending_ == 0) done_.notify_one();
      }
    }
  }

  int threads_;
  std::vector<std::thread> workers_;
  std::mutex run_mutex_;  // one parallel_for at a time
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> next_{0};
  const std::function<void(int64_t, int)>* fn_ = nullptr;
  int64_t n_tasks_ = 0;
  int width_ = 1;
  int pending_ = 0;
  bool stopping_ = false;
  std::exception_ptr error_;
};

Pool* g_pool = nullptr;
std::once_flag g_once;

void after_fork_in_child() {
  // The parent's worker threads do not exist in the child: leak the old pool, start afresh.
  int threads = g_pool ? g_pool->threads() : default_threads();
  g_pool = new Pool(threads);
}

Pool& pool() {
  std::call_once(g_once, [] {
    g_pool = new Pool(default_threads());
    pthread_atfork(nullptr, nullptr, after_fork_in_child);
  });
  return *g_pool;
}

}  // namespace

int num_threads() { return pool().threads(); }

void set_num_threads(int n) { pool().resize(n); }

int parallel_width(int64_t n_tasks) {
  if (n_tasks <= 1 || t_inside_task) return 1;
  return static_cast<int>(std::min<int64_t>(pool().threads(), n_tasks));
}

void parallel_for(int64_t n_tasks, const std::function<void(int64_t, int)>& fn, int max_width) {
  if (n_tasks <= 0) return;
  if (parallel_width(n_tasks) == 1 || max_width <= 1) {
    bool outer = !t_inside_task;
    t_inside_task = true;
    try {
      for (int64_t t = 0; t < n_tasks; ++t) fn(t, 0);
    } catch (...) {
      if (outer) t_inside_task = false;
      throw;
    }
    if (outer) t_inside_task = false;
    return;
  }
  pool().run(n_tasks, fn, max_width);
}

}  // namespace edpairs::cpu

// ---- runtime information declared in edpairs/ops.h ----
#include "edpairs/ops.h"
#include "gemm_cpu.h"

namespace edpairs {
int cpu_num_threads() { return cpu::num_threads(); }
void cpu_set_num_threads(int n) { cpu::set_num_threads(n); }
std::string cpu_kernel_isa() { return cpu::micro_kernel_isa(); }
}  // namespace edpairs

#include "thread_pool.h"

#include <immintrin.h>
#include <pthread.h>
#include <sched.h>

#include "numa.h"

namespace kt {
namespace {

// ~50-100 us of pause instructions: long enough to catch the next layer's call in decode, short
// enough that an idle pool goes to sleep almost at once.
constexpr int kSpinIterations = 20000;
thread_local bool t_inside_pool_task = false;

}  // namespace

ThreadPool::ThreadPool(int num_threads, bool pin) {
  if (num_threads < 1) num_threads = 1;
  const std::vector<int>& cpus = numa_topology().cpus;
  const bool fits = static_cast<size_t>(num_threads) <= cpus.size();
  spin_iterations_ = fits ? kSpinIterations : 0;
  if (pin && fits) cpus_.assign(cpus.end() - (num_threads - 1), cpus.end());
  workers_.reserve(num_threads - 1);
  for (int i = 0; i < num_threads - 1; ++i) {
    const int cpu = cpus_.empty() ? -1 : cpus_[i];
    workers_.emplace_back([this, cpu] { worker_loop(cpu); });
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(wake_mutex_);
    stop_ = true;
    generation_.fetch_add(1);
  }
  wake_cv_.notify_all();
  for (auto& w : workers_) w.join();
}

void ThreadPool::run_tasks() {
  const bool was_inside = t_inside_pool_task;
  t_inside_pool_task = true;
  for (;;) {
    const int64_t task = next_task_.fetch_add(1, std::memory_order_relaxed);
    if (task >= num_tasks_) break;
    try {
      (*fn_)(task);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex_);
      if (!error_) error_ = std::current_exception();
      next_task_.store(num_tasks_, std::memory_order_relaxed);  // skip what is left
    }
  }
  t_inside_pool_task = was_inside;
}

void ThreadPool::worker_loop(int cpu) {
  if (cpu >= 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof(set), &set);  // best effort: a refusal leaves it unpinned
  }
  uint64_t seen = 0;  // the generation at construction: a job may be published before this thread starts
  for (;;) {
    int spins = 0;
    while (generation_.load(std::memory_order_acquire) == seen && spins < spin_iterations_) {
      _mm_pause();
      ++spins;
    }
    if (generation_.load(std::memory_order_acquire) == seen) {
      std::unique_lock<std::mutex> lock(wake_mutex_);
      sleeping_.fetch_add(1);
      wake_cv_.wait(lock, [&] { return generation_.load() != seen; });
      sleeping_.fetch_sub(1);
    }
    seen = generation_.load(std::memory_order_acquire);
    {
      std::lock_guard<std::mutex> lock(wake_mutex_);
      if (stop_) return;
    }
    run_tasks();
    busy_workers_.fetch_sub(1, std::memory_order_release);
  }
}

void ThreadPool::parallel_for(int64_t num_tasks, const std::function<void(int64_t)>& fn) {
  if (num_tasks <= 0) return;
  if (workers_.empty() || num_tasks == 1 || t_inside_pool_task) {
    for (int64_t t = 0; t < num_tasks; ++t) fn(t);
    return;
  }
  std::lock_guard<std::mutex> submit(submit_mutex_);
  fn_ = &fn;
  num_tasks_ = num_tasks;
  error_ = nullptr;
  next_task_.store(0, std::memory_order_relaxed);
  busy_workers_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lock(wake_mutex_);
    generation_.fetch_add(1, std::memory_order_release);
  }
  if (sleeping_.load() > 0) wake_cv_.notify_all();
  run_tasks();
  // Only the tail of the other threads' last tasks is left: spin, then yield.
  int spins = 0;
  while (busy_workers_.load(std::memory_order_acquire) > 0) {
    if (++spins < spin_iterations_) {
      _mm_pause();
    } else {
      std::this_thread::yield();
    }
  }
  fn_ = nullptr;
  if (error_) std::rethrow_exception(error_);
}

}  // namespace kt

// Our own pool of `cpu_infer` threads (not OpenMP's global pool).
//
// The submitting thread is one of the pool's threads: a pool of N runs N-1 workers and the caller works
// too, so N threads on N cores never fight the submitter for a core. Idle workers spin briefly (layer
// after layer arrives within microseconds in decode) and then sleep on a condition variable, so an idle
// pool burns no core.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace kt {

class ThreadPool {
 public:
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs fn(task) for task in [0, num_tasks), spread dynamically over the pool; returns when all are
  // done. The first exception thrown by a task is rethrown here. Called from inside a task, it runs
  // serially on that thread.
  void parallel_for(int64_t num_tasks, const std::function<void(int64_t)>& fn);

 private:
  void worker_loop();
  void run_tasks();

  std::vector<std::thread> workers_;
  std::mutex submit_mutex_;  // one job at a time
  std::mutex wake_mutex_;
  std::condition_variable wake_cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> sleeping_{0};
  std::atomic<int> busy_workers_{0};
  std::atomic<int64_t> next_task_{0};
  int64_t num_tasks_ = 0;
  const std::function<void(int64_t)>* fn_ = nullptr;
  std::mutex error_mutex_;
  std::exception_ptr error_;
  bool stop_ = false;
};

}  // namespace kt

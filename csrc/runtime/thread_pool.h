// Our own pool of `cpu_infer` threads (not OpenMP's global pool).
//
// The submitting thread is one of the pool's threads: a pool of N runs N-1 workers and the caller works
// too, so N threads on N cores never fight the submitter for a core. Idle workers spin briefly (layer
// after layer arrives within microseconds in decode) and then sleep on a condition variable, so an idle
// pool burns no core.
//
// Workers are pinned to the last N-1 CPUs this process may use (ordered by NUMA node), which leaves the first
// one to the submitting thread: the scheduler puts it there because nothing else runs there. A pool larger
// than the CPUs is not pinned and does not spin (spinning threads would take turns with the ones that work).
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
  explicit ThreadPool(int num_threads, bool pin = true);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }
  // CPU of each worker, empty when not pinned.
  const std::vector<int>& pinned_cpus() const { return cpus_; }

  // Runs fn(task) for task in [0, num_tasks), spread dynamically over the pool; returns when all are
  // done. The first exception thrown by a task is rethrown here. Called from inside a task, it runs
  // serially on that thread.
  void parallel_for(int64_t num_tasks, const std::function<void(int64_t)>& fn);

 private:
  void worker_loop(int cpu);
  void run_tasks();

  std::vector<std::thread> workers_;
  std::vector<int> cpus_;
  int spin_iterations_ = 0;
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

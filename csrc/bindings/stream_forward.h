// An experts forward enqueued on a CUDA stream as a host function, for serving under CUDA graphs: a stream
// capture records it as a host node, so every replay of the graph runs it in stream order between the copy
// that fills its inputs and the copy that reads its output. Its arguments are fixed when it is made (a
// graph replays the same pointers and token count), so one exists per (layer, token count) that is captured.
//
// The extension does not link CUDA: the caller passes the address of the driver's cuLaunchHostFunc and the
// stream's handle. The host function must not call CUDA; the experts forward does not.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>

#include "../moe/experts_op.h"
#include "../runtime/thread_pool.h"

namespace kt {

class StreamForward {
 public:
  // y [T, H] = the experts of `op` on x [T, H] (act.dtype), ids [T, K] (rows of `op`, -1 = skip), w [T, K];
  // in chunks of `chunk` tokens. Every pointer is borrowed: the caller keeps the buffers (pinned host
  // memory), the op and the pool alive as long as this object.
  StreamForward(ExpertsOp& op, ThreadPool& pool, const Activations& act, const LoraFactors& lora, void* y, int chunk);

  // Enqueues one run on `stream` through `launch_host_func` (CUresult cuLaunchHostFunc(CUstream, CUhostFn,
  // void*)); throws std::runtime_error with the CUresult when the launch is refused.
  void enqueue(uintptr_t launch_host_func, uintptr_t stream);

  // What the last failed run threw ('' when none failed; a failed run leaves NaN in y); runs that completed.
  std::string error() const;
  int64_t runs() const { return runs_.load(); }

 private:
  static void run(void* self);
  void compute() noexcept;
  void fail(const char* what) noexcept;

  ExpertsOp& op_;
  ThreadPool& pool_;
  Activations act_;
  LoraFactors lora_;
  void* y_;
  int chunk_;
  std::atomic<int64_t> runs_{0};
  mutable std::mutex error_mutex_;
  std::string error_;
};

}  // namespace kt

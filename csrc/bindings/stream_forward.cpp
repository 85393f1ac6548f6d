#include "stream_forward.h"

#include <algorithm>
#include <exception>
#include <limits>
#include <stdexcept>

namespace kt {

namespace {
using LaunchHostFunc = int (*)(void* stream, void (*fn)(void*), void* data);

int64_t element_bytes(DType t) { return t == DType::kF32 ? 4 : 2; }
}  // namespace

StreamForward::StreamForward(ExpertsOp& op, ThreadPool& pool, const Activations& act, const LoraFactors& lora, void* y,
                             int chunk)
    : op_(op), pool_(pool), act_(act), lora_(lora), y_(y), chunk_(chunk > 0 ? chunk : std::max(act.T, 1)) {}

void StreamForward::enqueue(uintptr_t launch_host_func, uintptr_t stream) {
  if (launch_host_func == 0) throw std::invalid_argument("StreamForward: null cuLaunchHostFunc address");
  auto launch = reinterpret_cast<LaunchHostFunc>(launch_host_func);
  const int rc = launch(reinterpret_cast<void*>(stream), &StreamForward::run, this);
  if (rc != 0)
    throw std::runtime_error("StreamForward: cuLaunchHostFunc refused the launch (CUresult " + std::to_string(rc) +
                             ")");
}

std::string StreamForward::error() const {
  std::lock_guard<std::mutex> lock(error_mutex_);
  return error_;
}

void StreamForward::run(void* self) { static_cast<StreamForward*>(self)->compute(); }

void StreamForward::compute() noexcept {
  const int64_t H = op_.weights().hidden;
  const int64_t row_bytes = H * element_bytes(act_.dtype);
  try {
    for (int t0 = 0; t0 < act_.T; t0 += chunk_) {
      Activations part = act_;
      part.T = std::min(chunk_, act_.T - t0);
      part.x = static_cast<const char*>(act_.x) + t0 * row_bytes;
      part.ids = act_.ids + static_cast<int64_t>(t0) * act_.K;
      part.w = act_.w + static_cast<int64_t>(t0) * act_.K;
      op_.forward(pool_, part, lora_, static_cast<char*>(y_) + t0 * row_bytes, nullptr);
    }
    runs_.fetch_add(1);
  } catch (const std::exception& e) {  // nothing may cross the CUDA callback: keep it for the caller to read
    fail(e.what());
  } catch (...) {
    fail("unknown exception");
  }
}

void StreamForward::fail(const char* what) noexcept {
  // NaN in every output element: a failed run must not pass for an answer.
  const int64_t n = static_cast<int64_t>(act_.T) * op_.weights().hidden;
  if (act_.dtype == DType::kF32) {
    std::fill_n(static_cast<float*>(y_), n, std::numeric_limits<float>::quiet_NaN());
  } else {
    std::fill_n(static_cast<uint16_t*>(y_), n, static_cast<uint16_t>(0x7FC0));  // bf16 quiet NaN
  }
  std::lock_guard<std::mutex> lock(error_mutex_);
  error_ = what;
}

}  // namespace kt

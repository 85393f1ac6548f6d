#include "phase_times.h"

#include <atomic>
#include <mutex>

namespace kt {
namespace {

std::atomic<bool> g_enabled{false};
std::mutex g_mutex;
std::vector<PhaseTime> g_times;

}  // namespace

bool phase_times_enabled() { return g_enabled.load(std::memory_order_relaxed); }

void set_phase_times(bool on) { g_enabled.store(on, std::memory_order_relaxed); }

void add_phase_time(const std::string& name, double seconds) {
  std::lock_guard<std::mutex> lock(g_mutex);
  for (auto& p : g_times)
    if (p.name == name) {
      p.seconds += seconds;
      ++p.calls;
      return;
    }
  g_times.push_back({name, seconds, 1});
}

std::vector<PhaseTime> phase_times() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_times;
}

void reset_phase_times() {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_times.clear();
}

}  // namespace kt

// Wall time of each phase of the experts' forward and backward (one pool job or a few), summed over calls:
// where a layer's time goes, without a profiler. Off by default (one branch per phase); on with
// set_phase_times(true), which Python calls for KT_PHASE_TIMES=1 (kt_core.config) and
// kt_core.kernels.record_phase_times(); read back with kt_core.kernels.phase_times().
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace kt {

struct PhaseTime {
  std::string name;
  double seconds = 0.0;
  int64_t calls = 0;
};

bool phase_times_enabled();
void set_phase_times(bool on);
void add_phase_time(const std::string& name, double seconds);
std::vector<PhaseTime> phase_times();  // in the order the phases were first seen
void reset_phase_times();

// Laps of one call: mark("x") books the time since the previous mark (or construction) as "<prefix>.x".
class PhaseLaps {
 public:
  explicit PhaseLaps(const char* prefix) : prefix_(prefix), on_(phase_times_enabled()), last_(now()) {}
  void mark(const char* phase) {
    if (!on_) return;
    const auto t = now();
    add_phase_time(std::string(prefix_) + "." + phase, std::chrono::duration<double>(t - last_).count());
    last_ = t;
  }

 private:
  static std::chrono::steady_clock::time_point now() { return std::chrono::steady_clock::now(); }
  const char* prefix_;
  bool on_;
  std::chrono::steady_clock::time_point last_;
};

}  // namespace kt

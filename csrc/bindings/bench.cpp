// kt_core._C.bench: probes that measure the machine and the thread pool, not the operator. They serve
// benchmarks/bench_experts.py and tests/test_thread_pool.py; kt_core never calls them.
#include "bench.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../runtime/thread_pool.h"

namespace py = pybind11;

namespace kt {

namespace {

// The pool reads every 8-byte word once, 1 MiB per task as four concurrent streams (as a packed panel
// reads two weight tiles and its rows): a DRAM read-bandwidth probe made of the kernels' threads. The
// wrapping sum keeps the reads from being optimized away.
uint64_t read_sum(ThreadPool& pool, uintptr_t ptr, int64_t nbytes) {
  const auto* words = reinterpret_cast<const uint64_t*>(ptr);
  constexpr int64_t kTaskWords = (1 << 20) / 8, kStreamWords = kTaskWords / 4;
  const int64_t n = nbytes / 8, tasks = (n + kTaskWords - 1) / kTaskWords;
  std::vector<uint64_t> sums(static_cast<size_t>(tasks));
  {
    py::gil_scoped_release release;
    pool.parallel_for(tasks, [&](int64_t t) {
      const int64_t begin = t * kTaskWords, end = std::min(n, begin + kTaskWords);
      uint64_t acc[8] = {};
      if (end - begin == kTaskWords) {
        const uint64_t* s = words + begin;
        for (int64_t i = 0; i < kStreamWords; i += 8)
          for (int j = 0; j < 8; ++j)
            acc[j] += s[i + j] + s[kStreamWords + i + j] + s[2 * kStreamWords + i + j] + s[3 * kStreamWords + i + j];
      } else {
        for (int64_t i = begin; i < end; ++i) acc[i % 8] += words[i];
      }
      sums[t] = acc[0] + acc[1] + acc[2] + acc[3] + acc[4] + acc[5] + acc[6] + acc[7];
    });
  }
  uint64_t total = 0;
  for (uint64_t v : sums) total += v;
  return total;
}

}  // namespace

void bind_bench(py::module_& parent) {
  py::module_ m = parent.def_submodule("bench", "Probes of the thread pool and the machine, for benchmarks and tests");
  m.def(
      "run_empty",
      [](ThreadPool& pool, int64_t tasks) {
        py::gil_scoped_release release;
        pool.parallel_for(tasks, [](int64_t) {});
      },
      py::arg("pool"), py::arg("tasks"), "One job of empty tasks on the pool: the pool's own overhead.");
  m.def("read_sum", &read_sum, py::arg("pool"), py::arg("ptr"), py::arg("nbytes"),
        "Wrapping sum of the 8-byte words at ptr, read by the pool: a read-bandwidth probe.");
}

}  // namespace kt

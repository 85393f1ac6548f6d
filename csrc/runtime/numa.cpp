#include "numa.h"

#include <dlfcn.h>
#include <sched.h>

#include <algorithm>
#include <numeric>

namespace kt {
namespace {

NumaTopology detect() {
  NumaTopology t;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    for (int c = 0; c < CPU_SETSIZE; ++c)
      if (CPU_ISSET(c, &set)) t.cpus.push_back(c);
  }
  t.cpu_node.assign(t.cpus.size(), 0);
  void* lib = dlopen("libnuma.so.1", RTLD_LAZY | RTLD_LOCAL);
  if (!lib) return t;
  using AvailableFn = int (*)();
  using NodeOfCpuFn = int (*)(int);
  auto available = reinterpret_cast<AvailableFn>(dlsym(lib, "numa_available"));
  auto max_node = reinterpret_cast<AvailableFn>(dlsym(lib, "numa_max_node"));
  auto node_of_cpu = reinterpret_cast<NodeOfCpuFn>(dlsym(lib, "numa_node_of_cpu"));
  if (!available || !max_node || !node_of_cpu || available() < 0) return t;  // the library stays loaded: cheap
  t.libnuma = true;
  t.nodes = max_node() + 1;
  for (size_t i = 0; i < t.cpus.size(); ++i) t.cpu_node[i] = std::max(0, node_of_cpu(t.cpus[i]));
  std::vector<size_t> order(t.cpus.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return t.cpu_node[a] < t.cpu_node[b]; });
  std::vector<int> cpus, nodes;
  for (size_t i : order) {
    cpus.push_back(t.cpus[i]);
    nodes.push_back(t.cpu_node[i]);
  }
  t.cpus = cpus;
  t.cpu_node = nodes;
  return t;
}

}  // namespace

const NumaTopology& numa_topology() {
  static const NumaTopology topology = detect();
  return topology;
}

}  // namespace kt

// NUMA topology through libnuma when it is installed, opened at run time (dlopen): never a link-time or
// install-time dependency. Without it every CPU counts as node 0.
#pragma once

#include <vector>

namespace kt {

struct NumaTopology {
  bool libnuma = false;  // libnuma was found and reports NUMA support
  int nodes = 1;
  // The CPUs this process may run on, ordered node by node (the pool pins its threads in this order, so
  // neighbouring workers share a node and its memory).
  std::vector<int> cpus;
  std::vector<int> cpu_node;  // node of cpus[i]
};

const NumaTopology& numa_topology();

}  // namespace kt

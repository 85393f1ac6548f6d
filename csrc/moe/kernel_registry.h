// Run-time choice of the kernel variant: AMX -> AVX512-BF16 -> AVX-512 -> AVX2-FMA -> portable.
// Only variants whose instructions this CPU (and OS) supports are ever handed out.
#pragma once

#include <string>
#include <vector>

#include "gemm.h"

namespace kt {

struct KernelVariant {
  std::string name;
  bool runnable;  // this CPU has the instructions and the variant is built
  std::string missing;  // why not, when !runnable
  const GemmKernels* kernels;
};

// Every variant this build knows, best first.
std::vector<KernelVariant> kernel_variants();

// The named variant; throws std::invalid_argument saying what is available when it cannot run here.
const GemmKernels* find_kernels(const std::string& name);

}  // namespace kt

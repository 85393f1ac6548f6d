#include "kernel_registry.h"

#include <stdexcept>

#include "../runtime/cpu_features.h"

namespace kt {

std::vector<KernelVariant> kernel_variants() {
  const CpuFeatures& f = cpu_features();
  const bool avx512 = f.avx512f && f.avx512bw && f.avx512vl;
  std::vector<KernelVariant> v;
  // The AMX tile kernels arrive with the packed-weight store; the slot is here so that dispatch,
  // the KT_KERNEL override and the error messages already know the name.
  v.push_back({"amx", false, "not built in this version", nullptr});
  v.push_back({"avx512_bf16", avx512 && f.avx512_bf16, "needs AVX-512 F/BW/VL and AVX512-BF16", &kAvx512Bf16Kernels});
  v.push_back({"avx512", avx512, "needs AVX-512 F/BW/VL", &kAvx512Kernels});
  v.push_back({"avx2", f.avx2 && f.fma, "needs AVX2 and FMA", &kAvx2Kernels});
  v.push_back({"portable", true, "", &kPortableKernels});
  return v;
}

const GemmKernels* find_kernels(const std::string& name) {
  std::string runnable;
  for (const auto& k : kernel_variants()) {
    if (k.runnable) runnable += (runnable.empty() ? "" : ", ") + k.name;
  }
  for (const auto& k : kernel_variants()) {
    if (k.name != name) continue;
    if (!k.runnable)
      throw std::invalid_argument("kernel '" + name + "' cannot run here (" + k.missing +
                                  "); this CPU runs: " + runnable);
    return k.kernels;
  }
  throw std::invalid_argument("unknown kernel '" + name + "'; this CPU runs: " + runnable);
}

}  // namespace kt

#include "kernel_registry.h"

#include <atomic>
#include <stdexcept>

#include "../runtime/cpu_features.h"

namespace kt {
namespace {

std::atomic<bool> g_amx_emulation{false};

}  // namespace

void set_amx_emulation(bool on) { g_amx_emulation.store(on, std::memory_order_relaxed); }

bool amx_emulation() { return g_amx_emulation.load(std::memory_order_relaxed); }

std::vector<KernelVariant> kernel_variants() {
  const CpuFeatures& f = cpu_features();
  const bool avx512 = f.avx512f && f.avx512bw && f.avx512vl;
  const bool packed_avx512 = avx512 && f.avx512_bf16 && f.avx512_vnni;  // what gemm_packed_avx512.cpp uses
  const bool emulate = !f.os_amx && packed_avx512 && amx_emulation();
  const char* amx_missing = "needs AMX-TILE/BF16/INT8 granted by the OS, with AVX512-BF16 and AVX512-VNNI";
#ifdef KT_HAVE_AMX
  const bool amx = packed_avx512 && f.os_amx && f.amx_bf16 && f.amx_int8;
  const PackedKernels* amx_bf16 = emulate ? &kAmxBf16Emulated : &kAmxBf16Packed;
  const PackedKernels* amx_int8 = emulate ? &kAmxInt8Emulated : &kAmxInt8Packed;
  const PackedKernels* amx_int4 = emulate ? &kAmxInt4Emulated : &kAmxInt4Packed;
#else
  const bool amx = false;
  const PackedKernels* amx_bf16 = emulate ? &kAmxBf16Emulated : nullptr;
  const PackedKernels* amx_int8 = emulate ? &kAmxInt8Emulated : nullptr;
  const PackedKernels* amx_int4 = emulate ? &kAmxInt4Emulated : nullptr;
  amx_missing = "not built: the compiler has no AMX support";
#endif
  std::vector<KernelVariant> v;
  // fp8 weights: the bf16 packed formats pack the e4m3 bytes (packed.h); kFp8Avx512Kernels serves the calls they
  // do not (fp32 activations, blocks that are not whole tiles).
  v.push_back({"amx_bf16", amx || emulate, amx_missing, &kAvx512Bf16Kernels, amx_bf16, false, &kFp8Avx512Kernels});
  v.push_back({"avx512_bf16", avx512 && f.avx512_bf16, "needs AVX-512 F/BW/VL and AVX512-BF16", &kAvx512Bf16Kernels,
               nullptr, false, &kFp8Avx512Kernels});
  // The decode path without AMX (Zen 4, Cooper Lake): packed weights streamed by vdpbf16ps.
  v.push_back({"avx512_bf16_packed", packed_avx512, "needs AVX-512 F/BW/VL, AVX512-BF16 and AVX512-VNNI",
               &kAvx512Bf16Kernels, &kAvx512Bf16Packed, false, &kFp8Avx512Kernels});
  v.push_back({"avx512", avx512, "needs AVX-512 F/BW/VL", &kAvx512Kernels, nullptr, false, &kFp8Avx512Kernels});
  // AVX2 CPUs all have F16C (the fp8 kernels' e4m3 -> fp32 conversion); checked all the same.
  v.push_back(
      {"avx2", f.avx2 && f.fma && f.f16c, "needs AVX2, FMA and F16C", &kAvx2Kernels, nullptr, false, &kFp8Avx2Kernels});
  v.push_back({"portable", true, "", &kPortableKernels, nullptr, false, &kFp8PortableKernels});
  v.push_back({"amx_int8", amx || emulate, amx_missing, &kAvx512Bf16Kernels, amx_int8, true});
  v.push_back({"avx512_vnni_int8", packed_avx512, "needs AVX-512 F/BW/VL, AVX512-BF16 and AVX512-VNNI",
               &kAvx512Bf16Kernels, &kAvx512VnniInt8Packed, true});
  // int4 weights (groups of 128 inputs, scale and zero point each) against int8 activation rows.
  v.push_back({"amx_int4", amx || emulate, amx_missing, &kAvx512Bf16Kernels, amx_int4, true});
  v.push_back({"avx512_vnni_int4", packed_avx512, "needs AVX-512 F/BW/VL, AVX512-BF16 and AVX512-VNNI",
               &kAvx512Bf16Kernels, &kAvx512VnniInt4Packed, true});
  return v;
}

KernelVariant find_variant(const std::string& name) {
  const std::vector<KernelVariant> variants = kernel_variants();
  std::string runnable;
  for (const auto& k : variants) {
    if (k.runnable) runnable += (runnable.empty() ? "" : ", ") + k.name;
  }
  for (const auto& k : variants) {
    if (k.name != name) continue;
    if (!k.runnable)
      throw std::invalid_argument("kernel '" + name + "' cannot run here (" + k.missing +
                                  "); this CPU runs: " + runnable);
    return k;
  }
  throw std::invalid_argument("unknown kernel '" + name + "'; this CPU runs: " + runnable);
}

const GemmKernels* find_kernels(const std::string& name) { return find_variant(name).kernels; }

}  // namespace kt

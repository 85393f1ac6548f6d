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
  // The emulation (KT_AMX_EMULATE=1, a CPU without AMX) runs on any CPU: its row work is AVX-512's where the CPU
  // has it, else plain C++, and its unpacked calls take the best unpacked kernels here.
  const bool emulate = !f.os_amx && amx_emulation();
  const bool avx2 = f.avx2 && f.fma && f.f16c;
  const GemmKernels* amx_gemm = packed_avx512 ? &kAvx512Bf16Kernels : avx2 ? &kAvx2Kernels : &kPortableKernels;
  const Fp8Kernels* amx_fp8 = packed_avx512 ? &kFp8Avx512Kernels : avx2 ? &kFp8Avx2Kernels : &kFp8PortableKernels;
  const char* amx_missing = "needs AMX-TILE/BF16/INT8 granted by the OS, with AVX512-BF16 and AVX512-VNNI";
  const PackedKernels* emulated_bf16 = packed_avx512 ? &kAmxBf16Emulated : &kAmxBf16EmulatedScalar;
  const PackedKernels* emulated_int8 = packed_avx512 ? &kAmxInt8Emulated : &kAmxInt8EmulatedScalar;
  const PackedKernels* emulated_int4 = packed_avx512 ? &kAmxInt4Emulated : &kAmxInt4EmulatedScalar;
#ifdef KT_HAVE_AMX
  const bool amx = packed_avx512 && f.os_amx && f.amx_bf16 && f.amx_int8;
  const PackedKernels* amx_bf16 = emulate ? emulated_bf16 : &kAmxBf16Packed;
  const PackedKernels* amx_int8 = emulate ? emulated_int8 : &kAmxInt8Packed;
  const PackedKernels* amx_int4 = emulate ? emulated_int4 : &kAmxInt4Packed;
#else
  const bool amx = false;
  const PackedKernels* amx_bf16 = emulate ? emulated_bf16 : nullptr;
  const PackedKernels* amx_int8 = emulate ? emulated_int8 : nullptr;
  const PackedKernels* amx_int4 = emulate ? emulated_int4 : nullptr;
  amx_missing = "not built: the compiler has no AMX support";
#endif
  std::vector<KernelVariant> v;
  // fp8 weights: the bf16 packed formats pack the e4m3 bytes (packed.h); the fp8 kernels serve the calls they do
  // not (fp32 activations, blocks that are not whole tiles).
  v.push_back({"amx_bf16", amx || emulate, amx_missing, amx_gemm, amx_bf16, false, amx_fp8});
  v.push_back({"avx512_bf16", avx512 && f.avx512_bf16, "needs AVX-512 F/BW/VL and AVX512-BF16", &kAvx512Bf16Kernels,
               nullptr, false, &kFp8Avx512Kernels});
  // The decode path without AMX (Zen 4, Cooper Lake): packed weights streamed by vdpbf16ps.
  v.push_back({"avx512_bf16_packed", packed_avx512, "needs AVX-512 F/BW/VL, AVX512-BF16 and AVX512-VNNI",
               &kAvx512Bf16Kernels, &kAvx512Bf16Packed, false, &kFp8Avx512Kernels});
  v.push_back({"avx512", avx512, "needs AVX-512 F/BW/VL", &kAvx512Kernels, nullptr, false, &kFp8Avx512Kernels});
  // AVX2 CPUs all have F16C (the fp8 kernels' e4m3 -> fp32 conversion); checked all the same.
  v.push_back({"avx2", avx2, "needs AVX2, FMA and F16C", &kAvx2Kernels, nullptr, false, &kFp8Avx2Kernels});
  v.push_back({"portable", true, "", &kPortableKernels, nullptr, false, &kFp8PortableKernels});
  v.push_back({"amx_int8", amx || emulate, amx_missing, amx_gemm, amx_int8, true});
  v.push_back({"avx512_vnni_int8", packed_avx512, "needs AVX-512 F/BW/VL, AVX512-BF16 and AVX512-VNNI",
               &kAvx512Bf16Kernels, &kAvx512VnniInt8Packed, true});
  // int4 weights (groups of 128 inputs, scale and zero point each) against int8 activation rows.
  v.push_back({"amx_int4", amx || emulate, amx_missing, amx_gemm, amx_int4, true});
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

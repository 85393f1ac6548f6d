// Run-time choice of the kernel variant. Exact variants, best first: AMX (bf16 tiles on packed weights) ->
// AVX512-BF16 -> AVX512-BF16 on packed weights -> AVX-512 -> AVX2-FMA -> portable. Quantized variants
// (int8 / int4 weights, chosen only by name) follow. Only variants whose instructions this CPU (and OS) supports
// are ever handed out. fp8 weights run on the exact variants: packed as e4m3 bytes by the bf16 packed ones (amx_bf16,
// avx512_bf16_packed), converted in registers by the unpacked ones (avx512_bf16, avx512, avx2, portable).
#pragma once

#include <string>
#include <vector>

#include "gemm.h"
#include "packed.h"

namespace kt {

struct KernelVariant {
  std::string name;
  bool runnable;  // this CPU has the instructions and the variant is built
  std::string missing;  // why not, when !runnable
  const GemmKernels* kernels;
  const PackedKernels* packed;  // projections on packed weights, or nullptr
  bool quantized;  // the weights are quantized at load: outside the operator's exactness contract
  // GEMMs against block-quantized fp8 weights (DType::kFP8E4M3) where the packed kernels do not compute them, or
  // nullptr: the quantized variants quantize bf16 weights at load and take no fp8.
  const Fp8Kernels* fp8 = nullptr;
};

// Whether the AMX variants are offered on CPUs without AMX, on a scalar model of the tile instructions
// (gemm_amx_emulated.cpp): for testing the tile code path, never for speed. Off by default; set from Python
// (kt_core.config: KT_AMX_EMULATE).
void set_amx_emulation(bool on);
bool amx_emulation();

// Every variant this build knows, best first (exact ones, then quantized ones).
std::vector<KernelVariant> kernel_variants();

// The named variant; throws std::invalid_argument saying what is available when it cannot run here.
KernelVariant find_variant(const std::string& name);
const GemmKernels* find_kernels(const std::string& name);

}  // namespace kt

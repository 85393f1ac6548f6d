// A scalar model of the AMX instructions the tile panels use, behind the same panel code as gemm_amx.cpp.
// The registry offers it under the AMX names only when KT_AMX_EMULATE=1 on a CPU without AMX: slow, but it runs
// the tile code's addressing in CI. The work around the tiles (few-row panels, conversions, epilogues) is
// AVX-512's where the CPU has AVX512-BF16 / VNNI, else plain C++ (kPackedRowOpsScalar): it runs on any CPU.
#include <cstring>

#include "amx_panels.h"

namespace kt {
namespace {

thread_local uint8_t t_tiles[8][kTileBytes];

template <const PackedRowOps& kOps>
struct EmulatedTiles {
  static const PackedRowOps& ops() { return kOps; }
  static void configure(const TileConfig*) {}
  static void release() {}
  template <int T>
  static void zero() {
    std::memset(t_tiles[T], 0, kTileBytes);
  }
  template <int T>
  static void load(const void* p, int64_t stride) {
    for (int r = 0; r < 16; ++r) std::memcpy(t_tiles[T] + r * 64, static_cast<const uint8_t*>(p) + r * stride, 64);
  }
  template <int T>
  static void store(void* p, int64_t stride) {
    for (int r = 0; r < 16; ++r) std::memcpy(static_cast<uint8_t*>(p) + r * stride, t_tiles[T] + r * 64, 64);
  }
  // C[m][n] += sum_k A[m][2k + j] * B[k][2n + j] (fp32 lanes, bf16 pairs)
  template <int C, int A, int B>
  static void dp_bf16() {
    float* c = reinterpret_cast<float*>(t_tiles[C]);
    const bf16* a = reinterpret_cast<const bf16*>(t_tiles[A]);
    const bf16* b = reinterpret_cast<const bf16*>(t_tiles[B]);
    for (int m = 0; m < 16; ++m)
      for (int n = 0; n < 16; ++n)
        for (int k = 0; k < 16; ++k)
          for (int j = 0; j < 2; ++j)
            c[m * 16 + n] += bf16_to_f32(a[m * 32 + 2 * k + j]) * bf16_to_f32(b[k * 32 + 2 * n + j]);
  }
  // C[m][n] += sum_k A[m][4k + j] * B[k][4n + j] (int32 lanes, signed bytes)
  template <int C, int A, int B>
  static void dp_int8() {
    int32_t* c = reinterpret_cast<int32_t*>(t_tiles[C]);
    const int8_t* a = reinterpret_cast<const int8_t*>(t_tiles[A]);
    const int8_t* b = reinterpret_cast<const int8_t*>(t_tiles[B]);
    for (int m = 0; m < 16; ++m)
      for (int n = 0; n < 16; ++n)
        for (int k = 0; k < 16; ++k)
          for (int j = 0; j < 4; ++j) c[m * 16 + n] += a[m * 64 + 4 * k + j] * b[k * 64 + 4 * n + j];
  }
  // C[m][n] += sum_k A[m][4k + j] (signed) * B[k][4n + j] (unsigned)
  template <int C, int A, int B>
  static void dp_int8_su() {
    int32_t* c = reinterpret_cast<int32_t*>(t_tiles[C]);
    const int8_t* a = reinterpret_cast<const int8_t*>(t_tiles[A]);
    const uint8_t* b = t_tiles[B];
    for (int m = 0; m < 16; ++m)
      for (int n = 0; n < 16; ++n)
        for (int k = 0; k < 16; ++k)
          for (int j = 0; j < 4; ++j) c[m * 16 + n] += a[m * 64 + 4 * k + j] * b[k * 64 + 4 * n + j];
  }
};

}  // namespace

// clang-format off: the kernel tables keep their hand layout (fields in PackedKernels order)
using WithAvx512 = EmulatedTiles<kPackedRowOpsAvx512>;
using Scalar = EmulatedTiles<kPackedRowOpsScalar>;
const PackedKernels kAmxBf16Emulated = {"amx_bf16", PackedFormat::kBF16, amx_bf16_panel<WithAvx512>, nullptr,
                                        packed_avx512::pack_columns_bf16, nullptr, amx_fp8_panel<WithAvx512>,
                                        &kPackedRowOpsAvx512};
const PackedKernels kAmxInt8Emulated = {"amx_int8", PackedFormat::kInt8, nullptr, amx_int8_panel<WithAvx512>,
                                        nullptr, nullptr, nullptr, &kPackedRowOpsAvx512};
const PackedKernels kAmxInt4Emulated = {"amx_int4", PackedFormat::kInt4, nullptr, nullptr, nullptr,
                                        amx_int4_panel<WithAvx512>, nullptr, &kPackedRowOpsAvx512};
const PackedKernels kAmxBf16EmulatedScalar = {"amx_bf16", PackedFormat::kBF16, amx_bf16_panel<Scalar>, nullptr,
                                              kPackedRowOpsScalar.pack_columns_bf16, nullptr, amx_fp8_panel<Scalar>,
                                              &kPackedRowOpsScalar};
const PackedKernels kAmxInt8EmulatedScalar = {"amx_int8", PackedFormat::kInt8, nullptr, amx_int8_panel<Scalar>,
                                              nullptr, nullptr, nullptr, &kPackedRowOpsScalar};
const PackedKernels kAmxInt4EmulatedScalar = {"amx_int4", PackedFormat::kInt4, nullptr, nullptr, nullptr,
                                              amx_int4_panel<Scalar>, nullptr, &kPackedRowOpsScalar};
// clang-format on

}  // namespace kt

// AMX tile kernels (tdpbf16ps, tdpbssd) on packed weights. Compiled with -mamx-tile -mamx-bf16 -mamx-int8;
// kernel_registry.cpp hands these tables out only after CPUID and arch_prctl(ARCH_REQ_XCOMP_PERM) said yes.
#include <immintrin.h>

#include "amx_panels.h"

namespace kt {
namespace {

// gcc's tile intrinsics paste their tile numbers into the assembly text, so each tile the panels use is
// spelled out as a literal.
struct AmxTiles {
  static const PackedRowOps& ops() { return kPackedRowOpsAvx512; }  // AMX CPUs have AVX512-BF16 / VNNI
  static void configure(const TileConfig* cfg) { _tile_loadconfig(cfg); }
  static void release() { _tile_release(); }
  template <int T>
  static void zero() {
    static_assert(T >= 0 && T < 4, "accumulators are tiles 0-3");
    if constexpr (T == 0) _tile_zero(0);
    if constexpr (T == 1) _tile_zero(1);
    if constexpr (T == 2) _tile_zero(2);
    if constexpr (T == 3) _tile_zero(3);
  }
  template <int T>
  static void load(const void* p, int64_t stride) {
    static_assert(T >= 4 && T < 8, "operands are tiles 4-7");
    if constexpr (T == 4) _tile_loadd(4, p, stride);
    if constexpr (T == 5) _tile_loadd(5, p, stride);
    if constexpr (T == 6) _tile_loadd(6, p, stride);
    if constexpr (T == 7) _tile_loadd(7, p, stride);
  }
  template <int T>
  static void store(void* p, int64_t stride) {
    static_assert(T >= 0 && T < 4, "accumulators are tiles 0-3");
    if constexpr (T == 0) _tile_stored(0, p, stride);
    if constexpr (T == 1) _tile_stored(1, p, stride);
    if constexpr (T == 2) _tile_stored(2, p, stride);
    if constexpr (T == 3) _tile_stored(3, p, stride);
  }
  // C tile c accumulates A tile 4 + c / 2 times B tile 6 + c % 2: the only pairings the panels use.
  template <int C, int A, int B>
  static void dp_bf16() {
    static_assert(C >= 0 && C < 4 && A == 4 + C / 2 && B == 6 + C % 2, "unexpected tile pairing");
    if constexpr (C == 0) _tile_dpbf16ps(0, 4, 6);
    if constexpr (C == 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (C == 2) _tile_dpbf16ps(2, 5, 6);
    if constexpr (C == 3) _tile_dpbf16ps(3, 5, 7);
  }
  template <int C, int A, int B>
  static void dp_int8() {
    static_assert(C >= 0 && C < 4 && A == 4 + C / 2 && B == 6 + C % 2, "unexpected tile pairing");
    if constexpr (C == 0) _tile_dpbssd(0, 4, 6);
    if constexpr (C == 1) _tile_dpbssd(1, 4, 7);
    if constexpr (C == 2) _tile_dpbssd(2, 5, 6);
    if constexpr (C == 3) _tile_dpbssd(3, 5, 7);
  }
  // Signed activations (A) by unsigned weights (B): the int4 panel's unpacked nibbles.
  template <int C, int A, int B>
  static void dp_int8_su() {
    static_assert(C >= 0 && C < 4 && A == 4 + C / 2 && B == 6 + C % 2, "unexpected tile pairing");
    if constexpr (C == 0) _tile_dpbsud(0, 4, 6);
    if constexpr (C == 1) _tile_dpbsud(1, 4, 7);
    if constexpr (C == 2) _tile_dpbsud(2, 5, 6);
    if constexpr (C == 3) _tile_dpbsud(3, 5, 7);
  }
};

}  // namespace

// clang-format off: the kernel table keeps its hand layout (fields in PackedKernels order)
const PackedKernels kAmxBf16Packed = {"amx_bf16", PackedFormat::kBF16, amx_bf16_panel<AmxTiles>, nullptr,
                                      packed_avx512::pack_columns_bf16, nullptr, amx_fp8_panel<AmxTiles>,
                                      &kPackedRowOpsAvx512};
const PackedKernels kAmxInt8Packed = {"amx_int8", PackedFormat::kInt8, nullptr, amx_int8_panel<AmxTiles>, nullptr,
                                      nullptr, nullptr, &kPackedRowOpsAvx512};
const PackedKernels kAmxInt4Packed = {"amx_int4", PackedFormat::kInt4, nullptr, nullptr, nullptr,
                                      amx_int4_panel<AmxTiles>, nullptr, &kPackedRowOpsAvx512};
// clang-format on

}  // namespace kt

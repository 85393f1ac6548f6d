// AVX2 + FMA GEMMs against fp8 weights (8 fp32 lanes; e4m3 -> fp16 bits -> fp32 by F16C). Compiled with
// -mavx2 -mfma -mf16c; reached only when CPUID says so.
#include <immintrin.h>

#include "gemm_fp8_simd.h"

namespace kt {
namespace {

struct Avx2Fp8 {
  using reg = __m256;
  static constexpr int kLanes = 8;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float v) { return _mm256_set1_ps(v); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(reg v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // 8 bytes S.EEEE.MMM -> fp16 S.0EEEE.MMM0000000 (value / 256); NaN (S.1111.111) -> fp16 NaN.
  static reg load_fp8(const uint8_t* p) {
    const __m128i x = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m128i magnitude = _mm_and_si128(x, _mm_set1_epi16(0x7f));
    __m128i h = _mm_or_si128(_mm_slli_epi16(magnitude, 7), _mm_slli_epi16(_mm_and_si128(x, _mm_set1_epi16(0x80)), 8));
    h = _mm_or_si128(h, _mm_and_si128(_mm_cmpeq_epi16(magnitude, _mm_set1_epi16(0x7f)), _mm_set1_epi16(0x7c00)));
    return _mm256_cvtph_ps(h);
  }
};

}  // namespace

const Fp8Kernels kFp8Avx2Kernels = {"avx2", nt_fp8<Avx2Fp8>, nn_fp8<Avx2Fp8>};

}  // namespace kt

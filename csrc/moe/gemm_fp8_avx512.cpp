// AVX-512 GEMMs against fp8 weights (16 fp32 lanes; e4m3 -> fp16 bits -> fp32 by vcvtph2ps). Compiled with
// -mavx512f -mavx512bw -mavx512vl; reached only when CPUID says so.
#include <immintrin.h>

#include "gemm_fp8_simd.h"

namespace kt {
namespace {

struct Avx512Fp8 {
  using reg = __m512;
  static constexpr int kLanes = 16;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float v) { return _mm512_set1_ps(v); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(reg v) { return _mm512_reduce_add_ps(v); }
  // 16 bytes S.EEEE.MMM -> fp16 S.0EEEE.MMM0000000 (value / 256); NaN (S.1111.111) -> fp16 NaN.
  static reg load_fp8(const uint8_t* p) {
    const __m256i x = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i magnitude = _mm256_and_si256(x, _mm256_set1_epi16(0x7f));
    __m256i h = _mm256_or_si256(_mm256_slli_epi16(magnitude, 7),
                                _mm256_slli_epi16(_mm256_and_si256(x, _mm256_set1_epi16(0x80)), 8));
    const __m256i nan = _mm256_cmpeq_epi16(magnitude, _mm256_set1_epi16(0x7f));
    h = _mm256_or_si256(h, _mm256_and_si256(nan, _mm256_set1_epi16(0x7c00)));
    return _mm512_cvtph_ps(h);
  }
};

}  // namespace

const Fp8Kernels kFp8Avx512Kernels = {"avx512", nt_fp8<Avx512Fp8>, nn_fp8<Avx512Fp8>};

}  // namespace kt

// e4m3 -> fp32 on AVX-512, the one vector conversion of the fp8 kernels: the unpacked ones (gemm_fp8_avx512.cpp)
// and the packed ones (gemm_packed_avx512.cpp, which round the result to bf16: exact, see packed.h). Include only
// from units compiled with -mavx512f -mavx512bw -mavx512vl.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace kt {
namespace {

// 16 bytes S.EEEE.MMM -> fp16 S.0EEEE.MMM0000000, whose value is the e4m3 value / 256 (subnormals included:
// fp16's exponent range holds every e4m3 value after the 2^-8 shift); NaN (S.1111.111) -> fp16 NaN. Then fp32.
inline __m512 fp8_e4m3x16_to_f32_div256(const uint8_t* p) {
  const __m256i x = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i magnitude = _mm256_and_si256(x, _mm256_set1_epi16(0x7f));
  __m256i h = _mm256_or_si256(_mm256_slli_epi16(magnitude, 7),
                              _mm256_slli_epi16(_mm256_and_si256(x, _mm256_set1_epi16(0x80)), 8));
  const __m256i nan = _mm256_cmpeq_epi16(magnitude, _mm256_set1_epi16(0x7f));
  h = _mm256_or_si256(h, _mm256_and_si256(nan, _mm256_set1_epi16(0x7c00)));
  return _mm512_cvtph_ps(h);
}

}  // namespace
}  // namespace kt

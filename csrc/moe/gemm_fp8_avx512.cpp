// AVX-512 GEMMs against fp8 weights (16 fp32 lanes; e4m3 -> fp16 bits -> fp32 by vcvtph2ps, fp8_avx512.h). Compiled
// with -mavx512f -mavx512bw -mavx512vl; reached only when CPUID says so.
#include <immintrin.h>

#include "fp8_avx512.h"
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
  // kLanes bytes as fp32 values q / 256 (fp8_avx512.h).
  static reg load_fp8(const uint8_t* p) { return fp8_e4m3x16_to_f32_div256(p); }
};

}  // namespace

const Fp8Kernels kFp8Avx512Kernels = {"avx512", nt_fp8<Avx512Fp8>, nn_fp8<Avx512Fp8>};

}  // namespace kt

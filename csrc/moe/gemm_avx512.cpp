// AVX-512 GEMMs (16 fp32 lanes) plus a bf16 x bf16 dot-product kernel on AVX512-BF16 (vdpbf16ps).
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512bf16; reached only when CPUID says so.
#include <immintrin.h>

#include "gemm_simd.h"

namespace kt {
namespace {

struct Avx512 {
  using reg = __m512;
  static constexpr int kLanes = 16;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float v) { return _mm512_set1_ps(v); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static reg load(const bf16* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(reg v) { return _mm512_reduce_add_ps(v); }
};

// MR x NR dot products over K in bf16 pairs; the K tail is a masked load, so any K works.
template <int MR, int NR>
inline void nt_bf16_block(int K, const bf16* A, int lda, const bf16* B, int ldb, float* C, int ldc, bool accumulate) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int k = 0; k < K; k += 32) {
    const __mmask32 mask = K - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (K - k)) - 1;
    __m512bh b[NR];
    for (int j = 0; j < NR; ++j)
      b[j] = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(mask, B + static_cast<int64_t>(j) * ldb + k));
    for (int i = 0; i < MR; ++i) {
      const __m512bh a =
          reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(mask, A + static_cast<int64_t>(i) * lda + k));
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, b[j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      store1(C + static_cast<int64_t>(i) * ldc + j, _mm512_reduce_add_ps(acc[i][j]), accumulate);
}

template <int MR>
inline void nt_bf16_rows(int N, int K, const bf16* A, int lda, const bf16* B, int ldb, float* C, int ldc, bool acc) {
  int n = 0;
  for (; n + 4 <= N; n += 4) nt_bf16_block<MR, 4>(K, A, lda, B + static_cast<int64_t>(n) * ldb, ldb, C + n, ldc, acc);
  for (; n < N; ++n) nt_bf16_block<MR, 1>(K, A, lda, B + static_cast<int64_t>(n) * ldb, ldb, C + n, ldc, acc);
}

void nt_bf16(int M, int N, int K, const bf16* A, int lda, const bf16* B, int ldb, float* C, int ldc, bool acc) {
  int m = 0;
  for (; m + 4 <= M; m += 4)
    nt_bf16_rows<4>(N, K, A + static_cast<int64_t>(m) * lda, lda, B, ldb, C + static_cast<int64_t>(m) * ldc, ldc, acc);
  for (; m < M; ++m)
    nt_bf16_rows<1>(N, K, A + static_cast<int64_t>(m) * lda, lda, B, ldb, C + static_cast<int64_t>(m) * ldc, ldc, acc);
}

}  // namespace

const GemmKernels kAvx512Bf16Kernels = {"avx512_bf16", nt<Avx512>, nn<Avx512>, tn<Avx512>, nt_bf16};
// For AVX-512 CPUs without the BF16 extension (Skylake-SP, Cascade Lake): no vdpbf16ps is reached.
const GemmKernels kAvx512Kernels = {"avx512", nt<Avx512>, nn<Avx512>, tn<Avx512>, nullptr};

}  // namespace kt

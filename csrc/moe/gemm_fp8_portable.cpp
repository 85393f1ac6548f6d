// Portable GEMMs against block-quantized fp8 weights: the reference of the SIMD variants (gemm_fp8_avx2.cpp,
// gemm_fp8_avx512.cpp) and the fallback on any x86-64 CPU. Each weight is q * scale rounded to fp32, as in an
// fp32 dequantization of the checkpoint.
#include "gemm.h"

namespace kt {
namespace {

inline float weight(const Fp8View& B, int r, int c) {
  const int row = B.row0 + r, col = B.col0 + c;
  const float s = B.scales_of_row(row)[col / B.block_cols];
  return fp8_e4m3_to_f32(B.q[static_cast<int64_t>(row) * B.ld + col]) * s;
}

void nt(int M, int N, int K, const float* A, int lda, const Fp8View& B, float* C, int ldc, bool accumulate) {
  for (int m = 0; m < M; ++m) {
    const float* a = A + static_cast<int64_t>(m) * lda;
    for (int n = 0; n < N; ++n) {
      float acc = 0.f;
      for (int k = 0; k < K; ++k) acc += a[k] * weight(B, n, k);
      float& c = C[static_cast<int64_t>(m) * ldc + n];
      c = accumulate ? c + acc : acc;
    }
  }
}

void nn(int M, int N, int K, const float* A, int lda, const Fp8View& B, float* C, int ldc, bool accumulate) {
  for (int m = 0; m < M; ++m) {
    float* c = C + static_cast<int64_t>(m) * ldc;
    if (!accumulate)
      for (int n = 0; n < N; ++n) c[n] = 0.f;
    const float* a = A + static_cast<int64_t>(m) * lda;
    for (int k = 0; k < K; ++k)
      for (int n = 0; n < N; ++n) c[n] += a[k] * weight(B, k, n);
  }
}

}  // namespace

const Fp8Kernels kFp8PortableKernels = {"portable", nt, nn};

}  // namespace kt

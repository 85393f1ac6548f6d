// Portable C++ GEMMs: the reference every ISA variant is tested against, and the fallback that runs
// on any x86-64 CPU.
#include "gemm.h"

namespace kt {
namespace {

inline float load(const void* B, DType t, int64_t i) {
  return t == DType::kF32 ? static_cast<const float*>(B)[i] : bf16_to_f32(static_cast<const bf16*>(B)[i]);
}

void nt(int M, int N, int K, const float* A, int lda, const void* B, DType bt, int ldb, float* C, int ldc,
        bool accumulate) {
  for (int m = 0; m < M; ++m) {
    const float* a = A + static_cast<int64_t>(m) * lda;
    for (int n = 0; n < N; ++n) {
      const int64_t row = static_cast<int64_t>(n) * ldb;
      float acc = 0.f;
      for (int k = 0; k < K; ++k) acc += a[k] * load(B, bt, row + k);
      float& c = C[static_cast<int64_t>(m) * ldc + n];
      c = accumulate ? c + acc : acc;
    }
  }
}

void nn(int M, int N, int K, const float* A, int lda, const void* B, DType bt, int ldb, float* C, int ldc,
        bool accumulate) {
  for (int m = 0; m < M; ++m) {
    float* c = C + static_cast<int64_t>(m) * ldc;
    if (!accumulate)
      for (int n = 0; n < N; ++n) c[n] = 0.f;
    const float* a = A + static_cast<int64_t>(m) * lda;
    for (int k = 0; k < K; ++k) {
      const float av = a[k];
      const int64_t row = static_cast<int64_t>(k) * ldb;
      for (int n = 0; n < N; ++n) c[n] += av * load(B, bt, row + n);
    }
  }
}

void tn(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc, bool accumulate) {
  for (int m = 0; m < M; ++m) {
    float* c = C + static_cast<int64_t>(m) * ldc;
    if (!accumulate)
      for (int n = 0; n < N; ++n) c[n] = 0.f;
    for (int k = 0; k < K; ++k) {
      const float av = A[static_cast<int64_t>(k) * lda + m];
      const float* b = B + static_cast<int64_t>(k) * ldb;
      for (int n = 0; n < N; ++n) c[n] += av * b[n];
    }
  }
}

}  // namespace

const GemmKernels kPortableKernels = {"portable", nt, nn, tn, nullptr};

}  // namespace kt

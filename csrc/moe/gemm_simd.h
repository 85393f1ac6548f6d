// GEMM loops written once over a SIMD vector type V, instantiated by each ISA's translation unit
// (gemm_avx2.cpp with 8 lanes, gemm_avx512.cpp with 16). Everything sits in an anonymous namespace:
// each unit gets its own copy compiled for its ISA, so no AVX-512 code can leak into another unit.
//
// V provides: reg, kLanes, zero(), set1(f), load(const float*), load(const bf16*), store(float*, reg),
// fma(a, b, c), hsum(reg).
#pragma once

#include "gemm.h"

namespace kt {
namespace {

inline float load1(const float* p) { return *p; }
inline float load1(const bf16* p) { return bf16_to_f32(*p); }
inline void store1(float* c, float v, bool accumulate) { *c = accumulate ? *c + v : v; }

// MR x NR dot products of length K: C[i, j] = A[i, :] . B[j, :].
template <typename V, int MR, int NR, typename TB>
inline void nt_block(int K, const float* A, int lda, const TB* B, int ldb, float* C, int ldc, bool accumulate) {
  typename V::reg acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = V::zero();
  int k = 0;
  for (; k + V::kLanes <= K; k += V::kLanes) {
    typename V::reg b[NR];
    for (int j = 0; j < NR; ++j) b[j] = V::load(B + static_cast<int64_t>(j) * ldb + k);
    for (int i = 0; i < MR; ++i) {
      const auto a = V::load(A + static_cast<int64_t>(i) * lda + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = V::fma(a, b[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float sum = V::hsum(acc[i][j]);
      for (int kk = k; kk < K; ++kk)
        sum += A[static_cast<int64_t>(i) * lda + kk] * load1(B + static_cast<int64_t>(j) * ldb + kk);
      store1(C + static_cast<int64_t>(i) * ldc + j, sum, accumulate);
    }
}

template <typename V, int MR, typename TB>
inline void nt_row_block(int N, int K, const float* A, int lda, const TB* B, int ldb, float* C, int ldc, bool acc) {
  int n = 0;
  for (; n + 4 <= N; n += 4) nt_block<V, MR, 4>(K, A, lda, B + static_cast<int64_t>(n) * ldb, ldb, C + n, ldc, acc);
  for (; n < N; ++n) nt_block<V, MR, 1>(K, A, lda, B + static_cast<int64_t>(n) * ldb, ldb, C + n, ldc, acc);
}

template <typename V, typename TB>
void nt_typed(int M, int N, int K, const float* A, int lda, const TB* B, int ldb, float* C, int ldc, bool acc) {
  int m = 0;
  for (; m + 2 <= M; m += 2)
    nt_row_block<V, 2>(N, K, A + static_cast<int64_t>(m) * lda, lda, B, ldb, C + static_cast<int64_t>(m) * ldc, ldc,
                       acc);
  for (; m < M; ++m)
    nt_row_block<V, 1>(N, K, A + static_cast<int64_t>(m) * lda, lda, B, ldb, C + static_cast<int64_t>(m) * ldc, ldc,
                       acc);
}

// C[MR rows, 2 vectors] (+)= sum_k A(i, k) * B[k, n : n + 2 * lanes]; a_row / a_col are A's strides, so
// the same loop serves nn (A row-major) and tn (A transposed).
template <typename V, int MR, typename TB>
inline void nn_block(int K, const float* A, int64_t a_row, int64_t a_col, const TB* B, int ldb, float* C, int ldc,
                     bool accumulate) {
  typename V::reg acc[MR][2];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 2; ++j)
      acc[i][j] = accumulate ? V::load(C + static_cast<int64_t>(i) * ldc + j * V::kLanes) : V::zero();
  for (int k = 0; k < K; ++k) {
    const TB* b = B + static_cast<int64_t>(k) * ldb;
    const auto b0 = V::load(b), b1 = V::load(b + V::kLanes);
    for (int i = 0; i < MR; ++i) {
      const auto a = V::set1(A[i * a_row + k * a_col]);
      acc[i][0] = V::fma(a, b0, acc[i][0]);
      acc[i][1] = V::fma(a, b1, acc[i][1]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 2; ++j) V::store(C + static_cast<int64_t>(i) * ldc + j * V::kLanes, acc[i][j]);
}

template <typename V, typename TB>
void nn_strided(int M, int N, int K, const float* A, int64_t a_row, int64_t a_col, const TB* B, int ldb, float* C,
                int ldc, bool accumulate) {
  constexpr int kCols = 2 * V::kLanes;
  const int n_vec = N / kCols * kCols;
  for (int m = 0; m < M; m += 4) {
    const int mr = M - m < 4 ? M - m : 4;
    const float* a = A + m * a_row;
    float* c = C + static_cast<int64_t>(m) * ldc;
    for (int n = 0; n < n_vec; n += kCols) {
      switch (mr) {
        case 4: nn_block<V, 4>(K, a, a_row, a_col, B + n, ldb, c + n, ldc, accumulate); break;
        case 3: nn_block<V, 3>(K, a, a_row, a_col, B + n, ldb, c + n, ldc, accumulate); break;
        case 2: nn_block<V, 2>(K, a, a_row, a_col, B + n, ldb, c + n, ldc, accumulate); break;
        default: nn_block<V, 1>(K, a, a_row, a_col, B + n, ldb, c + n, ldc, accumulate); break;
      }
    }
    for (int i = 0; i < mr; ++i)
      for (int n = n_vec; n < N; ++n) {
        float sum = 0.f;
        for (int k = 0; k < K; ++k) sum += a[i * a_row + k * a_col] * load1(B + static_cast<int64_t>(k) * ldb + n);
        store1(c + static_cast<int64_t>(i) * ldc + n, sum, accumulate);
      }
  }
}

template <typename V>
void nt(int M, int N, int K, const float* A, int lda, const void* B, DType bt, int ldb, float* C, int ldc,
        bool accumulate) {
  if (bt == DType::kF32)
    nt_typed<V>(M, N, K, A, lda, static_cast<const float*>(B), ldb, C, ldc, accumulate);
  else
    nt_typed<V>(M, N, K, A, lda, static_cast<const bf16*>(B), ldb, C, ldc, accumulate);
}

template <typename V>
void nn(int M, int N, int K, const float* A, int lda, const void* B, DType bt, int ldb, float* C, int ldc,
        bool accumulate) {
  if (bt == DType::kF32)
    nn_strided<V>(M, N, K, A, lda, 1, static_cast<const float*>(B), ldb, C, ldc, accumulate);
  else
    nn_strided<V>(M, N, K, A, lda, 1, static_cast<const bf16*>(B), ldb, C, ldc, accumulate);
}

template <typename V>
void tn(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc, bool accumulate) {
  nn_strided<V>(M, N, K, A, 1, lda, B, ldb, C, ldc, accumulate);
}

}  // namespace
}  // namespace kt

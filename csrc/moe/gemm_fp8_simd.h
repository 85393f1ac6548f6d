// GEMM loops against block-quantized fp8 weights (gemm.h: Fp8View), written once over a SIMD vector type V and
// instantiated by each ISA's translation unit (gemm_fp8_avx2.cpp, gemm_fp8_avx512.cpp). As gemm_simd.h, all of it
// sits in an anonymous namespace: each unit compiles its own copy for its ISA.
//
// V provides what gemm_simd.h's V does (reg, kLanes, zero, set1, load(const float*), store, fma, hsum) plus
// mul(a, b) and load_fp8(const uint8_t*): kLanes e4m3 bytes as fp32 values q / 256, exactly (the conversion goes
// through fp16, whose exponent range holds every e4m3 value, subnormals included, after a 2^-8 shift). The
// kernels multiply them by 256 * scale, a power-of-two shift of the block scale: each weight is q * scale rounded
// once to fp32, bit for bit the scalar kernels' (gemm_fp8_portable.cpp) and an fp32 dequantization's.
#pragma once

#include <algorithm>

#include "gemm_simd.h"  // store1

namespace kt {
namespace {

constexpr float kFp8Shift = 256.f;  // load_fp8 returns q / kFp8Shift

inline float fp8_weight(const uint8_t* q, float scale) { return fp8_e4m3_to_f32(*q) * scale; }

inline const float* fp8_scale_row(const Fp8View& B, int r) { return B.scales_of_row(B.row0 + r); }

// MR x NR dot products: C[i, j] = A[i, :K] . B[j, :K] over rows j of the view; K walks the scale blocks.
template <typename V, int MR, int NR>
inline void nt_fp8_block(int K, const float* A, int lda, const Fp8View& B, int n0, float* C, int ldc, bool accumulate) {
  typename V::reg acc[MR][NR];
  float tail[MR][NR] = {};
  const uint8_t* q[NR];
  const float* srow[NR];
  for (int j = 0; j < NR; ++j) {
    q[j] = B.q + static_cast<int64_t>(B.row0 + n0 + j) * B.ld + B.col0;
    srow[j] = fp8_scale_row(B, n0 + j);
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = V::zero();
  for (int k0 = 0; k0 < K;) {
    const int col = B.col0 + k0;
    const int k1 = std::min(K, k0 + B.block_cols - col % B.block_cols);
    float s[NR];
    typename V::reg sv[NR];
    for (int j = 0; j < NR; ++j) {
      s[j] = srow[j][col / B.block_cols];
      sv[j] = V::set1(s[j] * kFp8Shift);
    }
    int k = k0;
    for (; k + V::kLanes <= k1; k += V::kLanes) {
      typename V::reg b[NR];
      for (int j = 0; j < NR; ++j) b[j] = V::mul(V::load_fp8(q[j] + k), sv[j]);
      for (int i = 0; i < MR; ++i) {
        const auto a = V::load(A + static_cast<int64_t>(i) * lda + k);
        for (int j = 0; j < NR; ++j) acc[i][j] = V::fma(a, b[j], acc[i][j]);
      }
    }
    for (; k < k1; ++k)
      for (int j = 0; j < NR; ++j) {
        const float b = fp8_weight(q[j] + k, s[j]);
        for (int i = 0; i < MR; ++i) tail[i][j] += A[static_cast<int64_t>(i) * lda + k] * b;
      }
    k0 = k1;
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      store1(C + static_cast<int64_t>(i) * ldc + j, V::hsum(acc[i][j]) + tail[i][j], accumulate);
}

template <typename V, int MR>
inline void nt_fp8_rows(int N, int K, const float* A, int lda, const Fp8View& B, float* C, int ldc, bool acc) {
  int n = 0;
  for (; n + 4 <= N; n += 4) nt_fp8_block<V, MR, 4>(K, A, lda, B, n, C + n, ldc, acc);
  for (; n < N; ++n) nt_fp8_block<V, MR, 1>(K, A, lda, B, n, C + n, ldc, acc);
}

template <typename V>
void nt_fp8(int M, int N, int K, const float* A, int lda, const Fp8View& B, float* C, int ldc, bool acc) {
  int m = 0;
  for (; m + 2 <= M; m += 2)
    nt_fp8_rows<V, 2>(N, K, A + static_cast<int64_t>(m) * lda, lda, B, C + static_cast<int64_t>(m) * ldc, ldc, acc);
  for (; m < M; ++m)
    nt_fp8_rows<V, 1>(N, K, A + static_cast<int64_t>(m) * lda, lda, B, C + static_cast<int64_t>(m) * ldc, ldc, acc);
}

// C[MR rows, 2 vectors] (+)= sum_k A[i, k] * B[k, n : n + 2 * lanes]; k walks the scale blocks, each lane keeps
// its column's scale (the two vectors may straddle a block edge).
template <typename V, int MR>
inline void nn_fp8_block(int K, const float* A, int lda, const Fp8View& B, int n, float* C, int ldc, bool accumulate) {
  constexpr int L = V::kLanes;
  typename V::reg acc[MR][2];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 2; ++j) acc[i][j] = accumulate ? V::load(C + static_cast<int64_t>(i) * ldc + j * L) : V::zero();
  float s[2 * L];
  for (int k0 = 0; k0 < K;) {
    const int k1 = std::min(K, B.block_end(B.row0 + k0) - B.row0);
    const float* srow = fp8_scale_row(B, k0);
    for (int l = 0; l < 2 * L; ++l) s[l] = srow[(B.col0 + n + l) / B.block_cols] * kFp8Shift;
    const auto s0 = V::load(s), s1 = V::load(s + L);
    for (int k = k0; k < k1; ++k) {
      const uint8_t* q = B.q + static_cast<int64_t>(B.row0 + k) * B.ld + B.col0 + n;
      const auto b0 = V::mul(V::load_fp8(q), s0), b1 = V::mul(V::load_fp8(q + L), s1);
      for (int i = 0; i < MR; ++i) {
        const auto a = V::set1(A[static_cast<int64_t>(i) * lda + k]);
        acc[i][0] = V::fma(a, b0, acc[i][0]);
        acc[i][1] = V::fma(a, b1, acc[i][1]);
      }
    }
    k0 = k1;
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 2; ++j) V::store(C + static_cast<int64_t>(i) * ldc + j * L, acc[i][j]);
}

template <typename V>
void nn_fp8(int M, int N, int K, const float* A, int lda, const Fp8View& B, float* C, int ldc, bool accumulate) {
  constexpr int kCols = 2 * V::kLanes;
  const int n_vec = N / kCols * kCols;
  for (int m = 0; m < M; m += 4) {
    const int mr = M - m < 4 ? M - m : 4;
    const float* a = A + static_cast<int64_t>(m) * lda;
    float* c = C + static_cast<int64_t>(m) * ldc;
    for (int n = 0; n < n_vec; n += kCols) {
      switch (mr) {
        case 4: nn_fp8_block<V, 4>(K, a, lda, B, n, c + n, ldc, accumulate); break;
        case 3: nn_fp8_block<V, 3>(K, a, lda, B, n, c + n, ldc, accumulate); break;
        case 2: nn_fp8_block<V, 2>(K, a, lda, B, n, c + n, ldc, accumulate); break;
        default: nn_fp8_block<V, 1>(K, a, lda, B, n, c + n, ldc, accumulate); break;
      }
    }
    for (int i = 0; i < mr; ++i)
      for (int n = n_vec; n < N; ++n) {
        float sum = 0.f;
        for (int k = 0; k < K; ++k) {
          const float s = fp8_scale_row(B, k)[(B.col0 + n) / B.block_cols];
          sum += a[static_cast<int64_t>(i) * lda + k] *
                 fp8_weight(B.q + static_cast<int64_t>(B.row0 + k) * B.ld + B.col0 + n, s);
        }
        store1(c + static_cast<int64_t>(i) * ldc + n, sum, accumulate);
      }
  }
}

}  // namespace
}  // namespace kt

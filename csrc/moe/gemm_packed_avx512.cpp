// AVX-512 kernels on packed weights: vdpbf16ps (AVX512-BF16) and vpdpbusd (AVX512-VNNI) against a broadcast
// activation pair / quad, one 64-byte tile row per instruction. This is the decode path: with a few rows per
// expert the work is streaming the weights once, and each weight byte is loaded once for up to 4 rows.
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512bf16 -mavx512vnni; reached only when CPUID says so.
#include <immintrin.h>

#include <cstring>

#include "packed.h"

namespace kt {
namespace {

constexpr int kMaxRows = 4;  // rows per pass: 2 * 4 accumulators stay in registers

inline uint32_t load_u32(const void* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

template <int R>
void bf16_rows(int k_blocks, const bf16* a, int lda, const bf16* b0, const bf16* b1, float* c) {
  __m512 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  for (int kb = 0; kb < k_blocks; ++kb) {
    const bf16* t0 = b0 + static_cast<int64_t>(kb) * 512;
    const bf16* t1 = b1 + static_cast<int64_t>(kb) * 512;
    for (int kp = 0; kp < 16; ++kp) {
      const __m512bh w0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(t0 + kp * 32));
      const __m512bh w1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(t1 + kp * 32));
      for (int r = 0; r < R; ++r) {
        const __m512bh x = reinterpret_cast<__m512bh>(
            _mm512_set1_epi32(static_cast<int>(load_u32(a + static_cast<int64_t>(r) * lda + kb * 32 + 2 * kp))));
        acc0[r] = _mm512_dpbf16_ps(acc0[r], x, w0);
        acc1[r] = _mm512_dpbf16_ps(acc1[r], x, w1);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(c + r * 32, acc0[r]);
    _mm512_storeu_ps(c + r * 32 + 16, acc1[r]);
  }
}

// vpdpbusd multiplies unsigned by signed bytes: the activation goes in as a + 128 (xor 0x80), and
// 128 * colsum(b) comes off at the end.
template <int R>
void int8_rows(int k_blocks, const int8_t* a, int lda, const float* a_scale, const int8_t* b0, const int8_t* b1,
               const float* b_scale, const int32_t* b_colsum, float* c) {
  __m512i acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_si512();
  for (int kb = 0; kb < k_blocks; ++kb) {
    const int8_t* t0 = b0 + static_cast<int64_t>(kb) * kTileBytes;
    const int8_t* t1 = b1 + static_cast<int64_t>(kb) * kTileBytes;
    for (int kq = 0; kq < 16; ++kq) {
      const __m512i w0 = _mm512_loadu_si512(t0 + kq * 64);
      const __m512i w1 = _mm512_loadu_si512(t1 + kq * 64);
      for (int r = 0; r < R; ++r) {
        const uint32_t quad = load_u32(a + static_cast<int64_t>(r) * lda + kb * 64 + 4 * kq) ^ 0x80808080u;
        const __m512i x = _mm512_set1_epi32(static_cast<int>(quad));
        acc0[r] = _mm512_dpbusd_epi32(acc0[r], x, w0);
        acc1[r] = _mm512_dpbusd_epi32(acc1[r], x, w1);
      }
    }
  }
  const __m512i off0 = _mm512_slli_epi32(_mm512_loadu_si512(b_colsum), 7);
  const __m512i off1 = _mm512_slli_epi32(_mm512_loadu_si512(b_colsum + 16), 7);
  const __m512 s0 = _mm512_loadu_ps(b_scale), s1 = _mm512_loadu_ps(b_scale + 16);
  for (int r = 0; r < R; ++r) {
    const __m512 sa = _mm512_set1_ps(a_scale[r]);
    const __m512 v0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc0[r], off0));
    const __m512 v1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc1[r], off1));
    _mm512_storeu_ps(c + r * 32, _mm512_mul_ps(_mm512_mul_ps(v0, s0), sa));
    _mm512_storeu_ps(c + r * 32 + 16, _mm512_mul_ps(_mm512_mul_ps(v1, s1), sa));
  }
}

}  // namespace

namespace packed_avx512 {

void bf16_panel(int rows, int k_blocks, const bf16* a, int lda, const bf16* b0, const bf16* b1, float* c) {
  for (int m = 0; m < rows; m += kMaxRows) {
    const bf16* am = a + static_cast<int64_t>(m) * lda;
    float* cm = c + static_cast<int64_t>(m) * 32;
    switch (rows - m < kMaxRows ? rows - m : kMaxRows) {
      case 1: bf16_rows<1>(k_blocks, am, lda, b0, b1, cm); break;
      case 2: bf16_rows<2>(k_blocks, am, lda, b0, b1, cm); break;
      case 3: bf16_rows<3>(k_blocks, am, lda, b0, b1, cm); break;
      default: bf16_rows<4>(k_blocks, am, lda, b0, b1, cm); break;
    }
  }
}

void int8_panel(int rows, int k_blocks, const int8_t* a, int lda, const float* a_scale, const int8_t* b0,
                const int8_t* b1, const float* b_scale, const int32_t* b_colsum, float* c) {
  for (int m = 0; m < rows; m += kMaxRows) {
    const int8_t* am = a + static_cast<int64_t>(m) * lda;
    float* cm = c + static_cast<int64_t>(m) * 32;
    const float* sm = a_scale + m;
    switch (rows - m < kMaxRows ? rows - m : kMaxRows) {
      case 1: int8_rows<1>(k_blocks, am, lda, sm, b0, b1, b_scale, b_colsum, cm); break;
      case 2: int8_rows<2>(k_blocks, am, lda, sm, b0, b1, b_scale, b_colsum, cm); break;
      case 3: int8_rows<3>(k_blocks, am, lda, sm, b0, b1, b_scale, b_colsum, cm); break;
      default: int8_rows<4>(k_blocks, am, lda, sm, b0, b1, b_scale, b_colsum, cm); break;
    }
  }
}

// Tile row kp of block kb pairs W rows r0 = 32 kb + 2 kp and r0 + 1: out[n][j] = W[r0 + j][col0 + n]. One
// two-source permute interleaves the two rows for each 16-column tile.
void pack_columns_bf16(const bf16* w, int64_t ld, int K, int N, int col0, int k_blocks, bf16* dst) {
  alignas(64) int16_t lo[32], hi[32];
  for (int i = 0; i < 32; ++i) {
    lo[i] = static_cast<int16_t>((i & 1) * 32 + i / 2);
    hi[i] = static_cast<int16_t>((i & 1) * 32 + 16 + i / 2);
  }
  const __m512i idx_lo = _mm512_load_si512(lo), idx_hi = _mm512_load_si512(hi);
  const int cols = N - col0 < 32 ? N - col0 : 32;
  const __mmask32 mask = cols >= 32 ? ~__mmask32(0) : (__mmask32(1) << cols) - 1;
  bf16* tile0 = dst;
  bf16* tile1 = dst + static_cast<int64_t>(k_blocks) * 512;
  for (int kb = 0; kb < k_blocks; ++kb)
    for (int kp = 0; kp < 16; ++kp) {
      const int r0 = kb * 32 + 2 * kp;
      const __m512i va = r0 < K ? _mm512_maskz_loadu_epi16(mask, w + r0 * ld + col0) : _mm512_setzero_si512();
      const __m512i vb =
          r0 + 1 < K ? _mm512_maskz_loadu_epi16(mask, w + (r0 + 1) * ld + col0) : _mm512_setzero_si512();
      const int64_t at = static_cast<int64_t>(kb) * 512 + kp * 32;
      _mm512_storeu_si512(tile0 + at, _mm512_permutex2var_epi16(va, idx_lo, vb));
      _mm512_storeu_si512(tile1 + at, _mm512_permutex2var_epi16(va, idx_hi, vb));
    }
}

}  // namespace packed_avx512

const PackedKernels kAvx512Bf16Packed = {"avx512_bf16_packed", PackedFormat::kBF16, packed_avx512::bf16_panel,
                                         nullptr, packed_avx512::pack_columns_bf16};
const PackedKernels kAvx512VnniInt8Packed = {"avx512_vnni_int8", PackedFormat::kInt8, nullptr,
                                             packed_avx512::int8_panel, nullptr};

}  // namespace kt

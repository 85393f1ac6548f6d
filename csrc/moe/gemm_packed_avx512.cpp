// AVX-512 kernels on packed weights: vdpbf16ps (AVX512-BF16) and vpdpbusd (AVX512-VNNI) against a broadcast
// activation pair / quad, one 64-byte tile row per instruction. This is the decode path: with a few rows per
// expert the work is streaming the weights once, and each weight byte is loaded once for up to 4 rows.
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512bf16 -mavx512vnni; reached only when CPUID says so.
#include <immintrin.h>

#include <cstring>

#include "fp8_avx512.h"
#include "packed.h"

namespace kt {
namespace {

constexpr int kMaxRows = 4;  // rows per pass: 2 * 4 accumulators stay in registers

inline uint32_t load_u32(const void* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

constexpr int kPrefetchBlocks = 4;  // 4 KB ahead in each of a pair's two tile streams

template <int R>
void bf16_rows(int k_blocks, const bf16* a, int lda, const bf16* b0, const bf16* b1, float* c) {
  __m512 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  for (int kb = 0; kb < k_blocks; ++kb) {
    const bf16* t0 = b0 + static_cast<int64_t>(kb) * 512;
    const bf16* t1 = b1 + static_cast<int64_t>(kb) * 512;
    for (int kp = 0; kp < 16; ++kp) {
      // Decode streams the weights from DRAM: each line is asked for kPrefetchBlocks k-blocks ahead.
      _mm_prefetch(reinterpret_cast<const char*>(t0 + kPrefetchBlocks * 512 + kp * 32), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(t1 + kPrefetchBlocks * 512 + kp * 32), _MM_HINT_T0);
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

// W4A8: unsigned nibbles (0..15) against signed int8 activations with vpdpbusd, one int32 sum per group of
// kInt4Group inputs, folded into fp32 with the group's scale and zero point.
template <int R>
void int4_rows(int k_blocks, const int8_t* a, int lda, const float* a_scale, const uint8_t* b0, const uint8_t* b1,
               const float* scale, const float* scale_zero, float* c) {
  const int groups = k_blocks / 2;
  const __m512i nib = _mm512_set1_epi8(0x0f), ones = _mm512_set1_epi8(1);
  __m512 f0[R], f1[R];
  for (int r = 0; r < R; ++r) f0[r] = f1[r] = _mm512_setzero_ps();
  for (int g = 0; g < groups; ++g) {
    __m512i acc0[R], acc1[R];
    float xs[R];
    for (int r = 0; r < R; ++r) {
      acc0[r] = acc1[r] = _mm512_setzero_si512();
      const int8_t* ar = a + static_cast<int64_t>(r) * lda + g * kInt4Group;
      __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_loadu_si512(ar));
      s = _mm512_dpbusd_epi32(s, ones, _mm512_loadu_si512(ar + 64));
      xs[r] = static_cast<float>(_mm512_reduce_add_epi32(s));
    }
    for (int kb = 2 * g; kb < 2 * g + 2; ++kb) {
      const uint8_t* t0 = b0 + static_cast<int64_t>(kb) * (kTileBytes / 2);
      const uint8_t* t1 = b1 + static_cast<int64_t>(kb) * (kTileBytes / 2);
      for (int i = 0; i < 8; ++i) {
        const __m512i v0 = _mm512_loadu_si512(t0 + i * 64), v1 = _mm512_loadu_si512(t1 + i * 64);
        const __m512i w0l = _mm512_and_si512(v0, nib), w0h = _mm512_and_si512(_mm512_srli_epi16(v0, 4), nib);
        const __m512i w1l = _mm512_and_si512(v1, nib), w1h = _mm512_and_si512(_mm512_srli_epi16(v1, 4), nib);
        for (int r = 0; r < R; ++r) {
          const int8_t* q = a + static_cast<int64_t>(r) * lda + kb * 64 + 8 * i;
          const __m512i xl = _mm512_set1_epi32(static_cast<int>(load_u32(q)));
          const __m512i xh = _mm512_set1_epi32(static_cast<int>(load_u32(q + 4)));
          acc0[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc0[r], w0l, xl), w0h, xh);
          acc1[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc1[r], w1l, xl), w1h, xh);
        }
      }
    }
    const __m512 s0 = _mm512_loadu_ps(scale + g * 16), z0 = _mm512_loadu_ps(scale_zero + g * 16);
    const __m512 s1 = _mm512_loadu_ps(scale + (groups + g) * 16), z1 = _mm512_loadu_ps(scale_zero + (groups + g) * 16);
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(xs[r]);
      f0[r] = _mm512_fnmadd_ps(z0, x, _mm512_fmadd_ps(s0, _mm512_cvtepi32_ps(acc0[r]), f0[r]));
      f1[r] = _mm512_fnmadd_ps(z1, x, _mm512_fmadd_ps(s1, _mm512_cvtepi32_ps(acc1[r]), f1[r]));
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 sa = _mm512_set1_ps(a_scale[r]);
    _mm512_storeu_ps(c + r * 32, _mm512_mul_ps(f0[r], sa));
    _mm512_storeu_ps(c + r * 32 + 16, _mm512_mul_ps(f1[r], sa));
  }
}

// 32 e4m3 bytes (one row of an fp8 tile: 16 outputs x 2 inputs) as the bf16 row of the same tile, values q / 256:
// exact, every e4m3 value / 256 is a bf16 value.
inline __m512bh fp8x32_to_bf16(const uint8_t* p) {
  return _mm512_cvtne2ps_pbh(fp8_e4m3x16_to_f32_div256(p + 16), fp8_e4m3x16_to_f32_div256(p));
}

// fp8 weights: as bf16_rows on tile rows converted in registers, one fp32 sum per segment, added to C times the
// segment's scales.
template <int R>
void fp8_rows(int nseg, const Fp8Segment* seg, const bf16* a, int lda, const uint8_t* b0, const uint8_t* b1,
              const float* s0, const float* s1, float* c) {
  constexpr int kFp8Tile = kTileBytes / 2;
  __m512 f0[R], f1[R];
  for (int r = 0; r < R; ++r) f0[r] = f1[r] = _mm512_setzero_ps();
  for (int i = 0; i < nseg; ++i) {
    const Fp8Segment& s = seg[i];
    __m512 acc0[R], acc1[R];
    for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
    for (int kb = s.kb0; kb < s.kb1; ++kb) {
      const uint8_t* t0 = b0 + static_cast<int64_t>(kb) * kFp8Tile;
      const uint8_t* t1 = b1 + static_cast<int64_t>(kb) * kFp8Tile;
      const bf16* ak = a + (s.a_kb + kb - s.kb0) * 32;
      for (int kp = 0; kp < 16; ++kp) {
        if (kp % 2 == 0) {  // one 64-byte line per two tile rows
          _mm_prefetch(reinterpret_cast<const char*>(t0 + kPrefetchBlocks * kFp8Tile + kp * 32), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(t1 + kPrefetchBlocks * kFp8Tile + kp * 32), _MM_HINT_T0);
        }
        const __m512bh w0 = fp8x32_to_bf16(t0 + kp * 32);
        const __m512bh w1 = fp8x32_to_bf16(t1 + kp * 32);
        for (int r = 0; r < R; ++r) {
          const __m512bh x = reinterpret_cast<__m512bh>(
              _mm512_set1_epi32(static_cast<int>(load_u32(ak + static_cast<int64_t>(r) * lda + 2 * kp))));
          acc0[r] = _mm512_dpbf16_ps(acc0[r], x, w0);
          acc1[r] = _mm512_dpbf16_ps(acc1[r], x, w1);
        }
      }
    }
    const __m512 sv0 = _mm512_set1_ps(s0[i]), sv1 = _mm512_set1_ps(s1[i]);
    for (int r = 0; r < R; ++r) {
      f0[r] = _mm512_fmadd_ps(acc0[r], sv0, f0[r]);
      f1[r] = _mm512_fmadd_ps(acc1[r], sv1, f1[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(c + r * 32, f0[r]);
    _mm512_storeu_ps(c + r * 32 + 16, f1[r]);
  }
}

}  // namespace

namespace packed_avx512 {

void fp8_panel(int rows, int nseg, const Fp8Segment* seg, const bf16* a, int lda, const uint8_t* b0, const uint8_t* b1,
               const float* s0, const float* s1, float* c) {
  for (int m = 0; m < rows; m += kMaxRows) {
    const bf16* am = a + static_cast<int64_t>(m) * lda;
    float* cm = c + static_cast<int64_t>(m) * 32;
    switch (rows - m < kMaxRows ? rows - m : kMaxRows) {
      case 1: fp8_rows<1>(nseg, seg, am, lda, b0, b1, s0, s1, cm); break;
      case 2: fp8_rows<2>(nseg, seg, am, lda, b0, b1, s0, s1, cm); break;
      case 3: fp8_rows<3>(nseg, seg, am, lda, b0, b1, s0, s1, cm); break;
      default: fp8_rows<4>(nseg, seg, am, lda, b0, b1, s0, s1, cm); break;
    }
  }
}

void fp8_tiles_to_bf16(const uint8_t* src, int k_blocks, bf16* dst) {
  for (int64_t i = 0; i < static_cast<int64_t>(k_blocks) * 16; ++i)
    _mm512_storeu_si512(dst + i * 32, reinterpret_cast<__m512i>(fp8x32_to_bf16(src + i * 32)));
}

void fold_fp8_segment(int rows, const float* acc, float s0, float s1, float* c) {
  const __m512 v0 = _mm512_set1_ps(s0), v1 = _mm512_set1_ps(s1);
  for (int m = 0; m < rows; ++m) {
    float* cm = c + static_cast<int64_t>(m) * 32;
    _mm512_storeu_ps(cm, _mm512_fmadd_ps(v0, _mm512_loadu_ps(acc + m * 32), _mm512_loadu_ps(cm)));
    _mm512_storeu_ps(cm + 16, _mm512_fmadd_ps(v1, _mm512_loadu_ps(acc + m * 32 + 16), _mm512_loadu_ps(cm + 16)));
  }
}

void int4_panel(int rows, int k_blocks, const int8_t* a, int lda, const float* a_scale, const uint8_t* b0,
                const uint8_t* b1, const float* scale, const float* scale_zero, float* c) {
  for (int m = 0; m < rows; m += kMaxRows) {
    const int8_t* am = a + static_cast<int64_t>(m) * lda;
    float* cm = c + static_cast<int64_t>(m) * 32;
    const float* sm = a_scale + m;
    switch (rows - m < kMaxRows ? rows - m : kMaxRows) {
      case 1: int4_rows<1>(k_blocks, am, lda, sm, b0, b1, scale, scale_zero, cm); break;
      case 2: int4_rows<2>(k_blocks, am, lda, sm, b0, b1, scale, scale_zero, cm); break;
      case 3: int4_rows<3>(k_blocks, am, lda, sm, b0, b1, scale, scale_zero, cm); break;
      default: int4_rows<4>(k_blocks, am, lda, sm, b0, b1, scale, scale_zero, cm); break;
    }
  }
}

void unpack_int4_tile(const uint8_t* src, uint8_t* dst) {
  const __m512i nib = _mm512_set1_epi8(0x0f);
  for (int i = 0; i < 8; ++i) {
    const __m512i v = _mm512_loadu_si512(src + i * 64);
    _mm512_storeu_si512(dst + (2 * i) * 64, _mm512_and_si512(v, nib));
    _mm512_storeu_si512(dst + (2 * i + 1) * 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), nib));
  }
}

void group_sums(int rows, int groups, const int8_t* a, int lda, int32_t* xsum) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int m = 0; m < rows; ++m)
    for (int g = 0; g < groups; ++g) {
      const int8_t* ar = a + static_cast<int64_t>(m) * lda + g * kInt4Group;
      __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_loadu_si512(ar));
      s = _mm512_dpbusd_epi32(s, ones, _mm512_loadu_si512(ar + 64));
      xsum[static_cast<int64_t>(m) * groups + g] = _mm512_reduce_add_epi32(s);
    }
}

void fold_int4_group(int rows, const int32_t* acc, const int32_t* xsum, int xsum_stride, const float* a_scale,
                     const float* scale0, const float* scale_zero0, const float* scale1, const float* scale_zero1,
                     float* c) {
  const __m512 s0 = _mm512_loadu_ps(scale0), z0 = _mm512_loadu_ps(scale_zero0);
  const __m512 s1 = _mm512_loadu_ps(scale1), z1 = _mm512_loadu_ps(scale_zero1);
  for (int m = 0; m < rows; ++m) {
    const __m512 x = _mm512_set1_ps(static_cast<float>(xsum[static_cast<int64_t>(m) * xsum_stride]));
    const __m512 sa = _mm512_set1_ps(a_scale[m]);
    const __m512 v0 = _mm512_fnmadd_ps(z0, x, _mm512_mul_ps(s0, _mm512_cvtepi32_ps(_mm512_loadu_si512(acc + m * 32))));
    const __m512 v1 =
        _mm512_fnmadd_ps(z1, x, _mm512_mul_ps(s1, _mm512_cvtepi32_ps(_mm512_loadu_si512(acc + m * 32 + 16))));
    float* cm = c + static_cast<int64_t>(m) * 32;
    _mm512_storeu_ps(cm, _mm512_fmadd_ps(sa, v0, _mm512_loadu_ps(cm)));
    _mm512_storeu_ps(cm + 16, _mm512_fmadd_ps(sa, v1, _mm512_loadu_ps(cm + 16)));
  }
}

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

namespace {

inline __mmask16 lanes(int n) {
  return n >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n > 0 ? n : 0)) - 1);
}

inline __m512 exp_ps(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);  // overflow to inf, underflow to 0, NaN stays NaN
}

inline __m512 sigmoid_ps(__m512 g) {
  const __m512 one = _mm512_set1_ps(1.f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

inline void store_bf16(bf16* dst, __mmask16 m, __m512 v) {
  _mm256_mask_storeu_epi16(dst, m, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

inline __m512 load_bf16(const bf16* src, __mmask16 m) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, src));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// fp32 rounded to 24 bits (to nearest at bit 8: half a unit added to the bit pattern), as bits 16-31 and 8-15.
inline void store_split(bf16* hi, uint8_t* lo, __mmask16 m, __m512 v) {
  const __m512i bits = _mm512_add_epi32(_mm512_castps_si512(v), _mm512_set1_epi32(0x80));
  _mm256_mask_storeu_epi16(hi, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
  _mm_mask_storeu_epi8(lo, m, _mm512_cvtepi32_epi8(_mm512_srli_epi32(bits, 8)));
}

inline __m512 load_split(const bf16* hi, const uint8_t* lo, __mmask16 m) {
  const __m512i h = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, hi)), 16);
  const __m512i l = _mm512_slli_epi32(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, lo)), 8);
  return _mm512_castsi512_ps(_mm512_or_si512(h, l));
}

}  // namespace

void f32_to_bf16_row(const float* src, int n, bf16* dst) {
  for (int i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n - i);
    store_bf16(dst + i, m, _mm512_maskz_loadu_ps(m, src + i));
  }
}

void bf16_to_f32_row(const bf16* src, int n, float* dst) {
  for (int i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n - i);
    _mm512_mask_storeu_ps(dst + i, m, load_bf16(src + i, m));
  }
}

float quantize_row_int8(const float* src, int n, int width, int8_t* dst) {
  __m512 amax = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 16)
    amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(lanes(n - i), src + i)));
  const float a = _mm512_reduce_max_ps(amax);
  const float scale = a > 0.f ? a / 127.f : 1.f;
  const __m512 s = _mm512_set1_ps(scale);
  const __m512 lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  for (int i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n - i);
    __m512 q = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(m, src + i), s),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);
    _mm_mask_storeu_epi8(dst + i, m, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(q)));
  }
  for (int i = n; i < width; ++i) dst[i] = 0;
  return scale;
}

// N rows of a panel: 2N independent FMA chains, each bt row loaded once for all N.
template <int N>
void add_rank_r_rows(float* c, const float* p, int R, const float* bt) {
  __m512 acc[2 * N];
  for (int i = 0; i < N; ++i) {
    acc[2 * i] = _mm512_loadu_ps(c + i * 32);
    acc[2 * i + 1] = _mm512_loadu_ps(c + i * 32 + 16);
  }
  for (int j = 0; j < R; ++j) {
    const __m512 b0 = _mm512_loadu_ps(bt + j * 32), b1 = _mm512_loadu_ps(bt + j * 32 + 16);
    for (int i = 0; i < N; ++i) {
      const __m512 a = _mm512_set1_ps(p[i * R + j]);
      acc[2 * i] = _mm512_fmadd_ps(a, b0, acc[2 * i]);
      acc[2 * i + 1] = _mm512_fmadd_ps(a, b1, acc[2 * i + 1]);
    }
  }
  for (int i = 0; i < N; ++i) {
    _mm512_storeu_ps(c + i * 32, acc[2 * i]);
    _mm512_storeu_ps(c + i * 32 + 16, acc[2 * i + 1]);
  }
}

void add_rank_r(int rows, float* c, const float* p, int R, const float* bt) {
  int row = 0;
  for (; row + 4 <= rows; row += 4) add_rank_r_rows<4>(c + row * 32, p + static_cast<int64_t>(row) * R, R, bt);
  for (; row < rows; ++row) add_rank_r_rows<1>(c + row * 32, p + static_cast<int64_t>(row) * R, R, bt);
}

void gate_up_epilogue(int rows, int ncols, float* c, const float* xa, int R, const float* bt, float* cache,
                      bf16* cache_hi, uint8_t* cache_lo, int64_t ld_cache, int64_t ld_lo, int64_t up_offset, bf16* hb,
                      int64_t ld_hb, float* hf, int64_t ld_hf) {
  const __mmask16 m = lanes(ncols);
  if (R > 0) add_rank_r(rows, c, xa, R, bt);
  for (int row = 0; row < rows; ++row) {
    const __m512 g = _mm512_loadu_ps(c + row * 32), u = _mm512_loadu_ps(c + row * 32 + 16);
    if (cache) {
      float* cr = cache + row * ld_cache;
      _mm512_mask_storeu_ps(cr, m, g);
      _mm512_mask_storeu_ps(cr + up_offset, m, u);
    }
    if (cache_hi) {
      bf16* hr = cache_hi + row * ld_cache;
      uint8_t* lr = cache_lo + row * ld_lo;
      store_split(hr, lr, m, g);
      store_split(hr + up_offset, lr + up_offset, m, u);
    }
    const __m512 h = _mm512_mul_ps(_mm512_mul_ps(g, sigmoid_ps(g)), u);
    if (hb) store_bf16(hb + row * ld_hb, m, h);
    if (hf) _mm512_mask_storeu_ps(hf + row * ld_hf, m, h);
  }
}

void down_epilogue(int rows, int ncols, float* c, const float* ha, int R, const float* bt, float* out, bf16* out16,
                   int64_t ld_out) {
  const __mmask16 m0 = lanes(ncols), m1 = lanes(ncols - 16);
  if (R > 0) add_rank_r(rows, c, ha, R, bt);
  for (int row = 0; row < rows; ++row) {
    const __m512 o0 = _mm512_loadu_ps(c + row * 32), o1 = _mm512_loadu_ps(c + row * 32 + 16);
    if (out16) {
      bf16* o = out16 + row * ld_out;
      store_bf16(o, m0, o0);
      store_bf16(o + 16, m1, o1);
      continue;
    }
    float* o = out + row * ld_out;
    _mm512_mask_storeu_ps(o, m0, o0);
    _mm512_mask_storeu_ps(o + 16, m1, o1);
  }
}

void add_scaled_bf16_row(int n, float s, const bf16* x, float* acc) {
  const __m512 sv = _mm512_set1_ps(s);
  for (int i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n - i);
    _mm512_mask_storeu_ps(acc + i, m, _mm512_fmadd_ps(sv, load_bf16(x + i, m), _mm512_maskz_loadu_ps(m, acc + i)));
  }
}

float silu_backward_fused_row(int I, const bf16* hi, const uint8_t* lo, const float* d, float wk, bf16* d16,
                              bf16* h16) {
  const __m512 w = _mm512_set1_ps(wk), one = _mm512_set1_ps(1.f);
  __m512 dot = _mm512_setzero_ps();
  for (int i = 0; i < I; i += 16) {
    const __mmask16 m = lanes(I - i);
    const __m512 gi = load_split(hi + i, lo + i, m), ui = load_split(hi + I + i, lo + I + i, m);
    const __m512 di = _mm512_maskz_loadu_ps(m, d + i);
    const __m512 sig = sigmoid_ps(gi);
    const __m512 silu = _mm512_mul_ps(gi, sig);
    const __m512 hi = _mm512_mul_ps(silu, ui);  // as silu_mul_row
    dot = _mm512_fmadd_ps(di, hi, dot);
    if (h16) store_bf16(h16 + i, m, hi);
    const __m512 dh = _mm512_mul_ps(w, di);
    const __m512 dsilu = _mm512_mul_ps(sig, _mm512_fmadd_ps(gi, _mm512_sub_ps(one, sig), one));
    const __m512 dgi = _mm512_mul_ps(_mm512_mul_ps(dh, ui), dsilu);
    const __m512 dui = _mm512_mul_ps(dh, silu);
    store_bf16(d16 + i, m, dgi);
    store_bf16(d16 + I + i, m, dui);
  }
  return _mm512_reduce_add_ps(dot);
}

void rows_times_bt_bf16(int rows, int K, const bf16* a, int64_t lda, const float* bt, int R, float scale, float* out) {
  for (int m = 0; m < rows; m += 2) {
    const bool two = m + 1 < rows;
    const bf16* a0 = a + static_cast<int64_t>(m) * lda;
    const bf16* a1 = two ? a0 + lda : a0;
    for (int j0 = 0; j0 < R; j0 += 8) {
      const int jn = R - j0 < 8 ? R - j0 : 8;
      __m512 acc0[8], acc1[8];
      for (int j = 0; j < 8; ++j) acc0[j] = acc1[j] = _mm512_setzero_ps();
      for (int k = 0; k < K; k += 16) {
        const __mmask16 mk = lanes(K - k);
        const __m512 x0 = load_bf16(a0 + k, mk), x1 = load_bf16(a1 + k, mk);
        for (int j = 0; j < 8; ++j) {
          if (j >= jn) break;
          const __m512 b = _mm512_maskz_loadu_ps(mk, bt + static_cast<int64_t>(j0 + j) * K + k);
          acc0[j] = _mm512_fmadd_ps(x0, b, acc0[j]);
          acc1[j] = _mm512_fmadd_ps(x1, b, acc1[j]);
        }
      }
      for (int j = 0; j < jn; ++j) {
        out[static_cast<int64_t>(m) * R + j0 + j] = scale * _mm512_reduce_add_ps(acc0[j]);
        if (two) out[static_cast<int64_t>(m + 1) * R + j0 + j] = scale * _mm512_reduce_add_ps(acc1[j]);
      }
    }
  }
}

constexpr int kRowsAhead = 8;  // rows prefetched ahead in tn_bf16_rows

void tn_bf16_rows(int R, int N, int rows, const float* p, int ldp, const bf16* a, int64_t lda, const int32_t* index,
                  float* out) {
  for (int n0 = 0; n0 < N; n0 += 64) {
    __mmask16 mk[4];
    for (int v = 0; v < 4; ++v) mk[v] = lanes(N - n0 - 16 * v);
    const int groups = (R + 5) / 6, per = (R + groups - 1) / groups;  // balanced groups of <= 6 (8 = 4 + 4)
    for (int j0 = 0; j0 < R; j0 += per) {
      const int jn = R - j0 < per ? R - j0 : per;
      __m512 acc[6][4];
      for (int j = 0; j < 6; ++j)
        for (int v = 0; v < 4; ++v) acc[j][v] = _mm512_setzero_ps();
      for (int m = 0; m < rows; ++m) {
        const bf16* am = a + (index ? static_cast<int64_t>(index[m]) : m) * lda + n0;
        if (m + kRowsAhead < rows) {  // strided rows: the prefetchers do not see the next one coming
          const int64_t ahead = index ? index[m + kRowsAhead] : m + kRowsAhead;
          const char* next = reinterpret_cast<const char*>(a + ahead * lda + n0);
          _mm_prefetch(next, _MM_HINT_T0);
          _mm_prefetch(next + 64, _MM_HINT_T0);
        }
        __m512 x[4];
        for (int v = 0; v < 4; ++v) x[v] = load_bf16(am + 16 * v, mk[v]);
        const float* pm = p + static_cast<int64_t>(m) * ldp + j0;
        for (int j = 0; j < 6; ++j) {
          if (j >= jn) break;
          const __m512 s = _mm512_set1_ps(pm[j]);
          for (int v = 0; v < 4; ++v) acc[j][v] = _mm512_fmadd_ps(s, x[v], acc[j][v]);
        }
      }
      for (int j = 0; j < jn; ++j)
        for (int v = 0; v < 4; ++v)
          _mm512_mask_storeu_ps(out + static_cast<int64_t>(j0 + j) * N + n0 + 16 * v, mk[v], acc[j][v]);
    }
  }
}

}  // namespace packed_avx512

const PackedRowOps kPackedRowOpsAvx512 = {
    packed_avx512::bf16_panel,
    packed_avx512::int8_panel,
    packed_avx512::int4_panel,
    packed_avx512::fp8_panel,
    packed_avx512::pack_columns_bf16,
    packed_avx512::unpack_int4_tile,
    packed_avx512::group_sums,
    packed_avx512::fold_int4_group,
    packed_avx512::fp8_tiles_to_bf16,
    packed_avx512::fold_fp8_segment,
    packed_avx512::f32_to_bf16_row,
    packed_avx512::bf16_to_f32_row,
    packed_avx512::quantize_row_int8,
    packed_avx512::gate_up_epilogue,
    packed_avx512::down_epilogue,
    packed_avx512::add_scaled_bf16_row,
    packed_avx512::silu_backward_fused_row,
    packed_avx512::rows_times_bt_bf16,
    packed_avx512::tn_bf16_rows,
    packed_avx512::pack_columns_fp8,
};

// clang-format off: the kernel table keeps its hand layout (fields in PackedKernels order)
const PackedKernels kAvx512Bf16Packed = {"avx512_bf16_packed", PackedFormat::kBF16, packed_avx512::bf16_panel,
                                         nullptr, packed_avx512::pack_columns_bf16, nullptr, packed_avx512::fp8_panel,
                                         &kPackedRowOpsAvx512};
const PackedKernels kAvx512VnniInt8Packed = {"avx512_vnni_int8", PackedFormat::kInt8, nullptr,
                                             packed_avx512::int8_panel, nullptr, nullptr, nullptr,
                                             &kPackedRowOpsAvx512};
const PackedKernels kAvx512VnniInt4Packed = {"avx512_vnni_int4", PackedFormat::kInt4, nullptr, nullptr, nullptr,
                                             packed_avx512::int4_panel, nullptr, &kPackedRowOpsAvx512};
// clang-format on

}  // namespace kt

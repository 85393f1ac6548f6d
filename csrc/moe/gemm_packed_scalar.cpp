// The work of packed.h's PackedRowOps in plain C++, element by element, for the AMX emulation on CPUs without
// AVX512-BF16 / VNNI: with it (and the scalar tile model of gemm_amx_emulated.cpp) the packed passes, their tile
// layouts and their epilogues run on any CPU under KT_AMX_EMULATE=1. Same contracts as gemm_packed_avx512.cpp
// (documented in packed.h); sums run in another order, and exp is the C library's, so results agree to rounding.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "packed.h"

namespace kt {
namespace packed_scalar {
namespace {

constexpr int kFp8TileBytes = kTileBytes / 2;

inline float sigmoid(float g) { return 1.f / (1.f + std::exp(-g)); }

// fp32 rounded to 24 bits (half a unit added at bit 8), as bits 16-31 and 8-15 (gate_up_epilogue's cache planes).
inline void store_split(bf16* hi, uint8_t* lo, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits += 0x80u;
  *hi = static_cast<bf16>(bits >> 16);
  *lo = static_cast<uint8_t>(bits >> 8);
}

inline float load_split(const bf16* hi, const uint8_t* lo) {
  const uint32_t bits = (static_cast<uint32_t>(*hi) << 16) | (static_cast<uint32_t>(*lo) << 8);
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

// c[row][0:32] += p[row][0:R] . bt[0:R][0:32].
void add_rank_r(int rows, float* c, const float* p, int R, const float* bt) {
  for (int row = 0; row < rows; ++row)
    for (int j = 0; j < R; ++j) {
      const float a = p[static_cast<int64_t>(row) * R + j];
      for (int n = 0; n < 32; ++n) c[row * 32 + n] += a * bt[j * 32 + n];
    }
}

}  // namespace

void bf16_panel(int rows, int k_blocks, const bf16* a, int lda, const bf16* b0, const bf16* b1, float* c) {
  for (int r = 0; r < rows; ++r) {
    const bf16* ar = a + static_cast<int64_t>(r) * lda;
    for (int n = 0; n < 32; ++n) {
      const bf16* b = n < 16 ? b0 : b1;
      float acc = 0.f;
      for (int kb = 0; kb < k_blocks; ++kb)
        for (int k = 0; k < 32; ++k)
          acc += bf16_to_f32(ar[kb * 32 + k]) * bf16_to_f32(b[kb * 512 + (k / 2) * 32 + 2 * (n % 16) + k % 2]);
      c[r * 32 + n] = acc;
    }
  }
}

void int8_panel(int rows, int k_blocks, const int8_t* a, int lda, const float* a_scale, const int8_t* b0,
                const int8_t* b1, const float* b_scale, const int32_t*, float* c) {
  for (int r = 0; r < rows; ++r) {
    const int8_t* ar = a + static_cast<int64_t>(r) * lda;
    for (int n = 0; n < 32; ++n) {
      const int8_t* b = n < 16 ? b0 : b1;
      int32_t acc = 0;
      for (int kb = 0; kb < k_blocks; ++kb)
        for (int k = 0; k < 64; ++k) acc += ar[kb * 64 + k] * b[kb * kTileBytes + (k / 4) * 64 + 4 * (n % 16) + k % 4];
      c[r * 32 + n] = static_cast<float>(acc) * b_scale[n] * a_scale[r];
    }
  }
}

void int4_panel(int rows, int k_blocks, const int8_t* a, int lda, const float* a_scale, const uint8_t* b0,
                const uint8_t* b1, const float* scale, const float* scale_zero, float* c) {
  const int groups = k_blocks / 2;
  for (int r = 0; r < rows; ++r) {
    const int8_t* ar = a + static_cast<int64_t>(r) * lda;
    for (int n = 0; n < 32; ++n) {
      const uint8_t* b = n < 16 ? b0 : b1;
      const int tile = n < 16 ? 0 : 1;
      float f = 0.f;
      for (int g = 0; g < groups; ++g) {
        int32_t acc = 0, xs = 0;
        for (int k = g * kInt4Group; k < (g + 1) * kInt4Group; ++k) {
          const int kb = k / 64, quad = (k % 64) / 4;  // quad 2i: low nibbles of byte row i; 2i + 1: high ones
          const uint8_t byte = b[kb * (kTileBytes / 2) + (quad / 2) * 64 + 4 * (n % 16) + k % 4];
          acc += (quad % 2 == 0 ? byte & 0x0f : byte >> 4) * ar[k];
          xs += ar[k];
        }
        const int64_t at = static_cast<int64_t>(tile * groups + g) * 16 + n % 16;
        f += scale[at] * static_cast<float>(acc) - scale_zero[at] * static_cast<float>(xs);
      }
      c[r * 32 + n] = f * a_scale[r];
    }
  }
}

void fp8_panel(int rows, int nseg, const Fp8Segment* seg, const bf16* a, int lda, const uint8_t* b0, const uint8_t* b1,
               const float* s0, const float* s1, float* c) {
  for (int r = 0; r < rows; ++r)
    for (int n = 0; n < 32; ++n) {
      const uint8_t* b = n < 16 ? b0 : b1;
      float f = 0.f;
      for (int i = 0; i < nseg; ++i) {
        const Fp8Segment& s = seg[i];
        float acc = 0.f;
        for (int kb = s.kb0; kb < s.kb1; ++kb) {
          const bf16* ak = a + static_cast<int64_t>(r) * lda + (s.a_kb + kb - s.kb0) * 32;
          for (int k = 0; k < 32; ++k) {
            const uint8_t q = b[kb * kFp8TileBytes + (k / 2) * 32 + 2 * (n % 16) + k % 2];
            acc += bf16_to_f32(ak[k]) * (fp8_e4m3_to_f32(q) / 256.f);
          }
        }
        f += acc * (n < 16 ? s0[i] : s1[i]);
      }
      c[r * 32 + n] = f;
    }
}

void pack_columns_bf16(const bf16* tiles, const int64_t* rows, int k_blocks, bf16* dst) {
  for (int kb = 0; kb < k_blocks; ++kb)
    for (int kp = 0; kp < 16; ++kp)
      for (int j = 0; j < 2; ++j) {
        const int64_t row = rows[kb * 32 + 2 * kp + j];
        for (int n = 0; n < 32; ++n) {  // column n is input n of the forward's k-block: pair n / 2, half n % 2
          const bf16 v = row >= 0 ? tiles[row + (n / 2) * 32 + n % 2] : bf16(0);
          dst[(n < 16 ? 0 : static_cast<int64_t>(k_blocks) * 512) + kb * 512 + kp * 32 + 2 * (n % 16) + j] = v;
        }
      }
}

void unpack_int4_tile(const uint8_t* src, uint8_t* dst) {
  for (int i = 0; i < 8; ++i)
    for (int b = 0; b < 64; ++b) {
      dst[(2 * i) * 64 + b] = src[i * 64 + b] & 0x0f;
      dst[(2 * i + 1) * 64 + b] = src[i * 64 + b] >> 4;
    }
}

void group_sums(int rows, int groups, const int8_t* a, int lda, int32_t* xsum) {
  for (int m = 0; m < rows; ++m)
    for (int g = 0; g < groups; ++g) {
      const int8_t* ar = a + static_cast<int64_t>(m) * lda + g * kInt4Group;
      int32_t s = 0;
      for (int k = 0; k < kInt4Group; ++k) s += ar[k];
      xsum[static_cast<int64_t>(m) * groups + g] = s;
    }
}

void fold_int4_group(int rows, const int32_t* acc, const int32_t* xsum, int xsum_stride, const float* a_scale,
                     const float* scale0, const float* scale_zero0, const float* scale1, const float* scale_zero1,
                     float* c) {
  for (int m = 0; m < rows; ++m) {
    const float x = static_cast<float>(xsum[static_cast<int64_t>(m) * xsum_stride]);
    for (int n = 0; n < 32; ++n) {
      const float s = n < 16 ? scale0[n] : scale1[n - 16], z = n < 16 ? scale_zero0[n] : scale_zero1[n - 16];
      c[m * 32 + n] += a_scale[m] * (s * static_cast<float>(acc[m * 32 + n]) - z * x);
    }
  }
}

void fp8_tiles_to_bf16(const uint8_t* src, int k_blocks, bf16* dst) {
  for (int64_t i = 0; i < static_cast<int64_t>(k_blocks) * kFp8TileBytes; ++i)
    dst[i] = f32_to_bf16(fp8_e4m3_to_f32(src[i]) / 256.f);  // exact: every e4m3 value / 256 is a bf16 value
}

void fold_fp8_segment(int rows, const float* acc, float s0, float s1, float* c) {
  for (int m = 0; m < rows; ++m)
    for (int n = 0; n < 32; ++n) c[m * 32 + n] += (n < 16 ? s0 : s1) * acc[m * 32 + n];
}

void f32_to_bf16_row(const float* src, int n, bf16* dst) {
  for (int i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

void bf16_to_f32_row(const bf16* src, int n, float* dst) {
  for (int i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

float quantize_row_int8(const float* src, int n, int width, int8_t* dst) {
  float amax = 0.f;
  for (int i = 0; i < n; ++i) amax = std::max(amax, std::fabs(src[i]));
  const float scale = amax > 0.f ? amax / 127.f : 1.f;
  for (int i = 0; i < n; ++i) dst[i] = static_cast<int8_t>(std::clamp(std::nearbyint(src[i] / scale), -127.f, 127.f));
  for (int i = n; i < width; ++i) dst[i] = 0;
  return scale;
}

void gate_up_epilogue(int rows, int ncols, float* c, const float* xa, int R, const float* bt, float* cache,
                      bf16* cache_hi, uint8_t* cache_lo, int64_t ld_cache, int64_t ld_lo, int64_t up_offset, bf16* hb,
                      int64_t ld_hb, float* hf, int64_t ld_hf) {
  if (R > 0) add_rank_r(rows, c, xa, R, bt);
  for (int row = 0; row < rows; ++row)
    for (int n = 0; n < std::min(ncols, 16); ++n) {
      const float g = c[row * 32 + n], u = c[row * 32 + 16 + n];
      if (cache) {
        cache[row * ld_cache + n] = g;
        cache[row * ld_cache + up_offset + n] = u;
      }
      if (cache_hi) {
        store_split(cache_hi + row * ld_cache + n, cache_lo + row * ld_lo + n, g);
        store_split(cache_hi + row * ld_cache + up_offset + n, cache_lo + row * ld_lo + up_offset + n, u);
      }
      const float h = g * sigmoid(g) * u;
      if (hb) hb[row * ld_hb + n] = f32_to_bf16(h);
      if (hf) hf[row * ld_hf + n] = h;
    }
}

void down_epilogue(int rows, int ncols, float* c, const float* ha, int R, const float* bt, float* out, bf16* out16,
                   int64_t ld_out) {
  if (R > 0) add_rank_r(rows, c, ha, R, bt);
  for (int row = 0; row < rows; ++row)
    for (int n = 0; n < std::min(ncols, 32); ++n) {
      if (out16)
        out16[row * ld_out + n] = f32_to_bf16(c[row * 32 + n]);
      else
        out[row * ld_out + n] = c[row * 32 + n];
    }
}

void add_scaled_bf16_row(int n, float s, const bf16* x, float* acc) {
  for (int i = 0; i < n; ++i) acc[i] += s * bf16_to_f32(x[i]);
}

float silu_backward_fused_row(int I, const bf16* hi, const uint8_t* lo, const float* d, float wk, bf16* d16,
                              bf16* h16) {
  float dot = 0.f;
  for (int i = 0; i < I; ++i) {
    const float g = load_split(hi + i, lo + i), u = load_split(hi + I + i, lo + I + i);
    const float sig = sigmoid(g), silu = g * sig, h = silu * u;
    dot += d[i] * h;
    if (h16) h16[i] = f32_to_bf16(h);
    const float dh = wk * d[i];
    d16[i] = f32_to_bf16(dh * u * (sig * (g * (1.f - sig) + 1.f)));
    d16[I + i] = f32_to_bf16(dh * silu);
  }
  return dot;
}

void rows_times_bt_bf16(int rows, int K, const bf16* a, int64_t lda, const float* bt, int R, float scale, float* out) {
  for (int m = 0; m < rows; ++m)
    for (int j = 0; j < R; ++j) {
      float acc = 0.f;
      for (int k = 0; k < K; ++k) acc += bf16_to_f32(a[m * lda + k]) * bt[static_cast<int64_t>(j) * K + k];
      out[static_cast<int64_t>(m) * R + j] = scale * acc;
    }
}

void tn_bf16_rows(int R, int N, int rows, const float* p, int ldp, const bf16* a, int64_t lda, const int32_t* index,
                  float* out) {
  std::fill(out, out + static_cast<int64_t>(R) * N, 0.f);
  for (int m = 0; m < rows; ++m) {
    const bf16* am = a + (index ? static_cast<int64_t>(index[m]) : m) * lda;
    for (int j = 0; j < R; ++j) {
      const float s = p[static_cast<int64_t>(m) * ldp + j];
      for (int n = 0; n < N; ++n) out[static_cast<int64_t>(j) * N + n] += s * bf16_to_f32(am[n]);
    }
  }
}

}  // namespace packed_scalar

const PackedRowOps kPackedRowOpsScalar = {
    packed_scalar::bf16_panel,
    packed_scalar::int8_panel,
    packed_scalar::int4_panel,
    packed_scalar::fp8_panel,
    packed_scalar::pack_columns_bf16,
    packed_scalar::unpack_int4_tile,
    packed_scalar::group_sums,
    packed_scalar::fold_int4_group,
    packed_scalar::fp8_tiles_to_bf16,
    packed_scalar::fold_fp8_segment,
    packed_scalar::f32_to_bf16_row,
    packed_scalar::bf16_to_f32_row,
    packed_scalar::quantize_row_int8,
    packed_scalar::gate_up_epilogue,
    packed_scalar::down_epilogue,
    packed_scalar::add_scaled_bf16_row,
    packed_scalar::silu_backward_fused_row,
    packed_scalar::rows_times_bt_bf16,
    packed_scalar::tn_bf16_rows,
    pack_columns_fp8,
};

}  // namespace kt

// AMX panels on packed weights, written once over a tile backend: gemm_amx.cpp instantiates them with the
// tile instructions, gemm_amx_emulated.cpp with a scalar model of the same instructions, which lets CI check
// the tile code path (strides, operand order, padding) on CPUs without AMX.
//
// Tiles 0-3 accumulate a 32 x 32 block of C, tiles 4-5 hold 32 activation rows, 6-7 two packed weight
// tiles: each loaded tile feeds two dot products. With few rows the AVX-512 panel streams the weights instead.
#pragma once

#include <cstdint>
#include <vector>

#include "packed.h"

namespace kt {
namespace {

constexpr int kSmallRows = 4;  // up to here a 16-row tile would be mostly padding

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile is 16 rows x 64 bytes. Loaded on each panel call: the caller's thread may have run other tile
// code (oneDNN inside torch) since, which reconfigures or releases the tiles.
inline TileConfig tile_config() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  return cfg;
}

template <class Tiles>
void amx_bf16_panel(int rows, int k_blocks, const bf16* a, int lda, const bf16* b0, const bf16* b1, float* c) {
  if (rows <= kSmallRows) return Tiles::ops().bf16_panel(rows, k_blocks, a, lda, b0, b1, c);
  const TileConfig cfg = tile_config();
  Tiles::configure(&cfg);
  const int64_t stride = static_cast<int64_t>(lda) * sizeof(bf16);
  for (int m = 0; m < rows; m += 32) {
    const bf16* am = a + static_cast<int64_t>(m) * lda;
    const bf16* am16 = am + static_cast<int64_t>(16) * lda;
    float* cm = c + static_cast<int64_t>(m) * 32;
    const bool two = rows - m > 16;
    Tiles::template zero<0>();
    Tiles::template zero<1>();
    Tiles::template zero<2>();
    Tiles::template zero<3>();
    for (int kb = 0; kb < k_blocks; ++kb) {
      Tiles::template load<6>(b0 + static_cast<int64_t>(kb) * 512, 64);
      Tiles::template load<7>(b1 + static_cast<int64_t>(kb) * 512, 64);
      Tiles::template load<4>(am + kb * 32, stride);
      Tiles::template dp_bf16<0, 4, 6>();
      Tiles::template dp_bf16<1, 4, 7>();
      if (two) {
        Tiles::template load<5>(am16 + kb * 32, stride);
        Tiles::template dp_bf16<2, 5, 6>();
        Tiles::template dp_bf16<3, 5, 7>();
      }
    }
    Tiles::template store<0>(cm, 128);
    Tiles::template store<1>(cm + 16, 128);
    if (two) {
      Tiles::template store<2>(cm + 16 * 32, 128);
      Tiles::template store<3>(cm + 16 * 32 + 16, 128);
    }
  }
  Tiles::release();
}

// acc [32][32] int32 = rows [0, 16) (am) and, when `two`, [16, 32) (am + 16 rows) of int8 activations times
// k-blocks [kb0, kb1) of a pair of int8 weight tiles (b0, b1): signed x signed (tdpbssd) or, with
// kUnsignedWeights, signed x unsigned (tdpbsud).
template <class Tiles, bool kUnsignedWeights>
void int8_tile_block(const int8_t* am, int lda, bool two, const void* b0, const void* b1, int kb0, int kb1,
                     int32_t* acc) {
  const int8_t* am16 = am + static_cast<int64_t>(16) * lda;
  const auto* w0 = static_cast<const uint8_t*>(b0);
  const auto* w1 = static_cast<const uint8_t*>(b1);
  Tiles::template zero<0>();
  Tiles::template zero<1>();
  Tiles::template zero<2>();
  Tiles::template zero<3>();
  for (int kb = kb0; kb < kb1; ++kb) {
    Tiles::template load<6>(w0 + static_cast<int64_t>(kb) * kTileBytes, 64);
    Tiles::template load<7>(w1 + static_cast<int64_t>(kb) * kTileBytes, 64);
    Tiles::template load<4>(am + kb * 64, lda);
    if constexpr (kUnsignedWeights) {
      Tiles::template dp_int8_su<0, 4, 6>();
      Tiles::template dp_int8_su<1, 4, 7>();
    } else {
      Tiles::template dp_int8<0, 4, 6>();
      Tiles::template dp_int8<1, 4, 7>();
    }
    if (two) {
      Tiles::template load<5>(am16 + kb * 64, lda);
      if constexpr (kUnsignedWeights) {
        Tiles::template dp_int8_su<2, 5, 6>();
        Tiles::template dp_int8_su<3, 5, 7>();
      } else {
        Tiles::template dp_int8<2, 5, 6>();
        Tiles::template dp_int8<3, 5, 7>();
      }
    }
  }
  Tiles::template store<0>(acc, 128);
  Tiles::template store<1>(acc + 16, 128);
  if (two) {
    Tiles::template store<2>(acc + 16 * 32, 128);
    Tiles::template store<3>(acc + 16 * 32 + 16, 128);
  }
}

template <class Tiles>
void amx_int8_panel(int rows, int k_blocks, const int8_t* a, int lda, const float* a_scale, const int8_t* b0,
                    const int8_t* b1, const float* b_scale, const int32_t* b_colsum, float* c) {
  if (rows <= kSmallRows) return Tiles::ops().int8_panel(rows, k_blocks, a, lda, a_scale, b0, b1, b_scale, b_colsum, c);
  const TileConfig cfg = tile_config();
  Tiles::configure(&cfg);
  alignas(64) int32_t acc[32 * 32];
  for (int m = 0; m < rows; m += 32) {
    int8_tile_block<Tiles, false>(a + static_cast<int64_t>(m) * lda, lda, rows - m > 16, b0, b1, 0, k_blocks, acc);
    const int valid = rows - m < 32 ? rows - m : 32;
    for (int r = 0; r < valid; ++r) {
      const float sa = a_scale[m + r];
      float* cr = c + static_cast<int64_t>(m + r) * 32;
      for (int n = 0; n < 32; ++n) cr[n] = sa * b_scale[n] * static_cast<float>(acc[r * 32 + n]);
    }
  }
  Tiles::release();
}

// W4A8 on tiles: each pair's nibble tiles unpacked once per call to unsigned int8 tiles (tdpbsud: signed
// activations x unsigned weights), one group (two k-blocks) accumulated in the tiles at a time and folded into
// fp32 C with the group's scales, zero points and activation sums.
template <class Tiles>
void amx_int4_panel(int rows, int k_blocks, const int8_t* a, int lda, const float* a_scale, const uint8_t* b0,
                    const uint8_t* b1, const float* scale, const float* scale_zero, float* c) {
  if (rows <= kSmallRows) return Tiles::ops().int4_panel(rows, k_blocks, a, lda, a_scale, b0, b1, scale, scale_zero, c);
  const int groups = k_blocks / 2;
  thread_local std::vector<uint8_t> t_unpacked, t_xsum_bytes;
  const size_t tile_bytes_u8 = static_cast<size_t>(k_blocks) * kTileBytes;
  if (t_unpacked.size() < 2 * tile_bytes_u8 + 64) t_unpacked.resize(2 * tile_bytes_u8 + 64);
  uint8_t* w0 = t_unpacked.data() + (64 - reinterpret_cast<uintptr_t>(t_unpacked.data()) % 64) % 64;
  uint8_t* w1 = w0 + tile_bytes_u8;
  for (int kb = 0; kb < k_blocks; ++kb) {
    Tiles::ops().unpack_int4_tile(b0 + static_cast<int64_t>(kb) * (kTileBytes / 2),
                                  w0 + static_cast<int64_t>(kb) * kTileBytes);
    Tiles::ops().unpack_int4_tile(b1 + static_cast<int64_t>(kb) * (kTileBytes / 2),
                                  w1 + static_cast<int64_t>(kb) * kTileBytes);
  }
  const size_t xsum_bytes = static_cast<size_t>(rows) * groups * sizeof(int32_t);
  if (t_xsum_bytes.size() < xsum_bytes) t_xsum_bytes.resize(xsum_bytes);
  int32_t* xsum = reinterpret_cast<int32_t*>(t_xsum_bytes.data());
  Tiles::ops().group_sums(rows, groups, a, lda, xsum);
  const TileConfig cfg = tile_config();
  Tiles::configure(&cfg);
  alignas(64) int32_t acc[32 * 32];
  for (int m = 0; m < rows; m += 32) {
    const int8_t* am = a + static_cast<int64_t>(m) * lda;
    const bool two = rows - m > 16;
    const int valid = rows - m < 32 ? rows - m : 32;
    float* cm = c + static_cast<int64_t>(m) * 32;
    for (int i = 0; i < valid * 32; ++i) cm[i] = 0.f;
    for (int g = 0; g < groups; ++g) {
      int8_tile_block<Tiles, true>(am, lda, two, w0, w1, 2 * g, 2 * g + 2, acc);
      Tiles::ops().fold_int4_group(valid, acc, xsum + static_cast<int64_t>(m) * groups + g, groups, a_scale + m,
                                   scale + g * 16, scale_zero + g * 16, scale + (groups + g) * 16,
                                   scale_zero + (groups + g) * 16, cm);
    }
  }
  Tiles::release();
}

// acc [32][32] fp32 = rows [0, 16) (am) and, when `two`, [16, 32) of bf16 activations from activation k-block a_kb
// on, times k-blocks [kb0, kb1) of a pair of bf16 weight tiles (w0, w1; 1 KB each).
template <class Tiles>
void bf16_tile_block(const bf16* am, int lda, bool two, const bf16* w0, const bf16* w1, int a_kb, int kb0, int kb1,
                     float* acc) {
  const int64_t stride = static_cast<int64_t>(lda) * sizeof(bf16);
  const bf16* a16 = am + static_cast<int64_t>(16) * lda;
  Tiles::template zero<0>();
  Tiles::template zero<1>();
  Tiles::template zero<2>();
  Tiles::template zero<3>();
  for (int kb = kb0; kb < kb1; ++kb) {
    const int a_col = (a_kb + kb - kb0) * 32;
    Tiles::template load<6>(w0 + static_cast<int64_t>(kb) * 512, 64);
    Tiles::template load<7>(w1 + static_cast<int64_t>(kb) * 512, 64);
    Tiles::template load<4>(am + a_col, stride);
    Tiles::template dp_bf16<0, 4, 6>();
    Tiles::template dp_bf16<1, 4, 7>();
    if (two) {
      Tiles::template load<5>(a16 + a_col, stride);
      Tiles::template dp_bf16<2, 5, 6>();
      Tiles::template dp_bf16<3, 5, 7>();
    }
  }
  Tiles::template store<0>(acc, 128);
  Tiles::template store<1>(acc + 16, 128);
  if (two) {
    Tiles::template store<2>(acc + 16 * 32, 128);
    Tiles::template store<3>(acc + 16 * 32 + 16, 128);
  }
}

// fp8 weights on tiles: the pair's e4m3 tiles converted once per call to bf16 tiles (q / 256, exact) in a per-thread
// buffer, one segment (a block of the scales) accumulated in the tiles at a time and folded into fp32 C with its
// two scales, as the int4 panel folds its groups.
template <class Tiles>
void amx_fp8_panel(int rows, int nseg, const Fp8Segment* seg, const bf16* a, int lda, const uint8_t* b0,
                   const uint8_t* b1, const float* s0, const float* s1, float* c) {
  if (rows <= kSmallRows) return Tiles::ops().fp8_panel(rows, nseg, seg, a, lda, b0, b1, s0, s1, c);
  const int k_blocks = seg[nseg - 1].kb1;
  thread_local std::vector<uint8_t> t_converted;
  const size_t tile_column_bytes = static_cast<size_t>(k_blocks) * kTileBytes;
  if (t_converted.size() < 2 * tile_column_bytes + 64) t_converted.resize(2 * tile_column_bytes + 64);
  uint8_t* base = t_converted.data() + (64 - reinterpret_cast<uintptr_t>(t_converted.data()) % 64) % 64;
  bf16* w0 = reinterpret_cast<bf16*>(base);
  bf16* w1 = reinterpret_cast<bf16*>(base + tile_column_bytes);
  Tiles::ops().fp8_tiles_to_bf16(b0, k_blocks, w0);
  Tiles::ops().fp8_tiles_to_bf16(b1, k_blocks, w1);
  const TileConfig cfg = tile_config();
  Tiles::configure(&cfg);
  alignas(64) float acc[32 * 32];
  for (int m = 0; m < rows; m += 32) {
    const bf16* am = a + static_cast<int64_t>(m) * lda;
    const bool two = rows - m > 16;
    const int valid = rows - m < 32 ? rows - m : 32;
    float* cm = c + static_cast<int64_t>(m) * 32;
    for (int i = 0; i < valid * 32; ++i) cm[i] = 0.f;
    for (int i = 0; i < nseg; ++i) {
      bf16_tile_block<Tiles>(am, lda, two, w0, w1, seg[i].a_kb, seg[i].kb0, seg[i].kb1, acc);
      Tiles::ops().fold_fp8_segment(valid, acc, s0[i], s1[i], cm);
    }
  }
  Tiles::release();
}

}  // namespace
}  // namespace kt

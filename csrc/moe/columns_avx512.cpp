// The backward's column blocks from the forward's packed tiles, AVX-512 (the contracts of pack_columns_bf16 and
// pack_columns_fp8 in packed.h): each forward tile is transposed as a 16 x 16 matrix of dwords, so that a row of W's
// 32 columns comes out in order. Compiled with -mavx512f -mavx512bw -mavx512vl; reached only when CPUID says so.
#include <immintrin.h>

#include <cstring>

#include "packed.h"

namespace kt {
namespace packed_avx512 {
namespace {

// r[i] = row i of a 16 x 16 dword matrix -> r[i] = its column i.
inline void transpose_16x16_dwords(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {  // t[i] lane L: r_i[4L], r_i+1[4L], r_i[4L+1], r_i+1[4L+1]; t[i+1]: 4L+2, 4L+3
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  __m512i g[16];  // g[4q + c] lane L: rows 4q..4q+3 of column 4L + c
  for (int q = 0; q < 4; ++q) {
    g[4 * q] = _mm512_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
    g[4 * q + 1] = _mm512_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
    g[4 * q + 2] = _mm512_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
    g[4 * q + 3] = _mm512_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // column 4L + c: lane L of g[c], g[4 + c], g[8 + c], g[12 + c]
    const __m512i a = _mm512_shuffle_i32x4(g[c], g[4 + c], 0x44), b = _mm512_shuffle_i32x4(g[8 + c], g[12 + c], 0x44);
    const __m512i d = _mm512_shuffle_i32x4(g[c], g[4 + c], 0xee), e = _mm512_shuffle_i32x4(g[8 + c], g[12 + c], 0xee);
    r[c] = _mm512_shuffle_i32x4(a, b, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(a, b, 0xdd);
    r[8 + c] = _mm512_shuffle_i32x4(d, e, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(d, e, 0xdd);
  }
}

}  // namespace

// Tile row kp of block kb pairs W rows r0 = 32 kb + 2 kp and r0 + 1: out[n][j] = W[r0 + j][col0 + n]. One
// two-source permute interleaves the two rows for each 16-column tile.
void pack_columns_bf16(const bf16* tiles, const int64_t* rows, int k_blocks, bf16* dst) {
  alignas(64) int16_t lo[32], hi[32];
  alignas(64) int32_t pairs[16];
  for (int i = 0; i < 32; ++i) {
    lo[i] = static_cast<int16_t>((i & 1) * 32 + i / 2);
    hi[i] = static_cast<int16_t>((i & 1) * 32 + 16 + i / 2);
  }
  for (int p = 0; p < 16; ++p) pairs[p] = p * 16;  // a row's input pair p: 32 bf16 (16 dwords) after pair p - 1
  const __m512i idx_lo = _mm512_load_si512(lo), idx_hi = _mm512_load_si512(hi), at_pairs = _mm512_load_si512(pairs);
  bf16* tile0 = dst;
  bf16* tile1 = dst + static_cast<int64_t>(k_blocks) * 512;
  __m512i r[16];  // 16 rows of W, each its 32 inputs (the block's columns) in order
  for (int q = 0; q < 2 * k_blocks; ++q) {
    const int64_t* rq = rows + q * 16;
    bool whole = rq[0] >= 0;  // the 16 rows are one forward tile's outputs, in order: a dword transpose of it
    for (int n = 1; n < 16 && whole; ++n) whole = rq[n] == rq[0] + 2 * n;
    if (whole) {
      for (int kp = 0; kp < 16; ++kp) r[kp] = _mm512_loadu_si512(tiles + rq[0] + kp * 32);
      transpose_16x16_dwords(r);
    } else {  // rows from several tiles (gate_up with I % 16 != 0) or padding: one row at a time, 16 pairs apart
      for (int n = 0; n < 16; ++n)
        r[n] = rq[n] >= 0 ? _mm512_i32gather_epi32(at_pairs, tiles + rq[n], 4) : _mm512_setzero_si512();
    }
    for (int p = 0; p < 8; ++p) {
      const int64_t at = static_cast<int64_t>(q / 2) * 512 + ((q % 2) * 8 + p) * 32;
      _mm512_storeu_si512(tile0 + at, _mm512_permutex2var_epi16(r[2 * p], idx_lo, r[2 * p + 1]));
      _mm512_storeu_si512(tile1 + at, _mm512_permutex2var_epi16(r[2 * p], idx_hi, r[2 * p + 1]));
    }
  }
}

void pack_columns_fp8(const Fp8View& w, int col0, const std::vector<Fp8Segment>& segments, const uint8_t* tiles,
                      const int64_t* rows, const int64_t* cols, uint8_t* dst, float* s0, float* s1) {
  kt::pack_columns_fp8(w, col0, segments, tiles, rows, cols, nullptr, s0, s1);  // the scales
  if (!dst) return;
  const int64_t tile_column = static_cast<int64_t>(segments.back().kb1) * (kTileBytes / 2);
  std::memset(dst, 0, static_cast<size_t>(2 * tile_column));
  // The 32 columns are one forward k-block, in order: a forward tile then holds 16 rows of them.
  bool whole = cols[0] >= 0 && cols[0] % (kTileBytes / 2) == 0;
  for (int c = 1; c < 32 && whole; ++c) whole = cols[c] == cols[0] + (c / 2) * 32 + c % 2;
  // Within each dword of a transposed tile: (row 2p, column c), (2p, c + 1), (2p + 1, c), (2p + 1, c + 1) ->
  // (2p, c), (2p + 1, c), (2p, c + 1), (2p + 1, c + 1), the backward tile's order.
  const __m512i swap = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15));
  __m512i r[16];
  for (const Fp8Segment& s : segments) {
    for (int k = s.k0; k < s.k1;) {
      bool group = whole && k % 16 == 0 && k + 16 <= s.k1;
      for (int n = 1; n < 16 && group; ++n) group = rows[k + n] == rows[k] + 2 * n;
      if (!group) {
        pack_fp8_column_row(s, k, tile_column, tiles + rows[k], cols, dst);
        ++k;
        continue;
      }
      // The forward tile: 16 rows (input pairs) of 8 dwords (output pairs), transposed to 8 rows of 16 dwords.
      const uint8_t* tile = tiles + rows[k] + cols[0];
      for (int kp = 0; kp < 16; ++kp)
        r[kp] = _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + kp * 32)));
      transpose_16x16_dwords(r);
      const int64_t kb = s.k_block(k);
      for (int p = 0; p < 8; ++p) {  // rows k + 2p, k + 2p + 1: one row of each backward tile
        const __m512i v = _mm512_shuffle_epi8(r[p], swap);
        uint8_t* row = dst + kb * (kTileBytes / 2) + ((k % 32) / 2 + p) * 32;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(row), _mm512_castsi512_si256(v));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + tile_column), _mm512_extracti64x4_epi64(v, 1));
      }
      k += 16;
    }
  }
}

}  // namespace packed_avx512
}  // namespace kt

// Expert weights packed once at load into the tile layout of the matrix units, and the kernels that read it.
//
// A packed matrix of N outputs and K inputs is a grid of 1 KB tiles, n-tile major: tile (nt, kb) holds
// outputs [16 nt, 16 nt + 16) and inputs [kb * kStep, (kb + 1) * kStep) as [kStep / P][16][P], P the inputs
// per 32-bit lane (2 for bf16, kStep 32; 4 for int8, kStep 64). That is the B operand of AMX tdpbf16ps /
// tdpbssd exactly as it sits in memory, and one 64-byte row per input pair (quad) is what AVX-512
// vdpbf16ps / vpdpbusd want next to a broadcast activation, so the decode path streams the same bytes.
// Outputs are read in pairs of tiles (32 columns); padding (N to whole pairs, K to whole blocks) is zero.
//
// int4 (asymmetric, groups of kInt4Group inputs with a scale and a zero point each) keeps the int8 tile shape
// [16][16][4] at half the bytes: byte (q / 2) * 64 + n * 4 + j holds row 2 (q / 2) in its low nibble and row
// 2 (q / 2) + 1 in its high one, so one 64-byte load and two masks give two unsigned int8 rows.
//
// gate_up is packed with its gate and up tiles interleaved: pair p = (gate rows [16p, 16p + 16),
// up rows [16p, 16p + 16)), so one task computes matching gate and up columns and applies silu * up at once.
//
// fp8 (e4m3 weights with block scales, as DeepSeek-V3 ships them; gemm.h: Fp8View) keeps the bf16 tile shape
// [16][16][2] with one byte per weight (512 bytes a tile), the e4m3 bytes as the checkpoint has them. The inputs
// are cut into segments, one per block of the scales along them (Fp8Segment); a segment's k-blocks hold its own
// inputs only (zero elsewhere), so that one fp32 scale per tile and segment applies to its partial sums. The panels
// convert e4m3 to bf16 (q / 256, exact: e4m3 has 3 mantissa bits and a narrower exponent range) right before the
// dot products and add scale * 256 * partial sum into C: every weight counts as q * scale exactly, as in the
// unpacked fp8 kernels (gemm_fp8_simd.h), with bf16 activations.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "../runtime/thread_pool.h"
#include "gemm.h"

namespace kt {

enum class PackedFormat { kNone, kBF16, kInt8, kInt4, kFP8 };

constexpr int kTileBytes = 1024;
constexpr int kTileRows = 16;  // outputs per tile, and activation rows per AMX A tile

constexpr int kInt4Group = 128;  // inputs per int4 scale / zero point: two k-blocks

inline int k_step(PackedFormat f) { return f == PackedFormat::kBF16 || f == PackedFormat::kFP8 ? 32 : 64; }
inline int tile_bytes(PackedFormat f) {
  return f == PackedFormat::kInt4 || f == PackedFormat::kFP8 ? kTileBytes / 2 : kTileBytes;
}

// Row stride, in elements, of the activation rows a panel reads: the padded width (whole 64-byte lines) made
// an odd number of lines, so that the 16 rows of a tile fall in 16 different L1 sets. At a stride of 4 KB
// (bf16 rows of a 2048-wide layer) they all share one 12-way set and every tile load misses L1: the gate/up
// product ran 20% slower per core.
inline int tile_row_stride(int padded, int elem_bytes) {
  const int line = 64 / elem_bytes;
  return (padded / line) % 2 == 0 ? padded + line : padded;
}
inline bool int_activations(PackedFormat f) { return f == PackedFormat::kInt8 || f == PackedFormat::kInt4; }

// One segment of an fp8 tile column: the inputs [k0, k1), which share a block of the scales (index `block` along
// the inputs), packed as k-blocks [kb0, kb1) that read activation k-blocks [a_kb, a_kb + kb1 - kb0) (32 inputs each,
// from activation column 32 a_kb; the inputs of those k-blocks outside [k0, k1) are zero in this segment's tiles).
// Segments are in input order and their k-blocks follow each other: kb0 of the first is 0.
struct Fp8Segment {
  int a_kb, kb0, kb1;
  int k0, k1;
  int block;
  int k_block(int k) const { return kb0 + k / 32 - a_kb; }  // the packed k-block that holds input k in [k0, k1)
};

// The segments of K inputs cut at multiples of `block` and, when split > 0, at `split` (gate_up's rows in the
// backward: gate's blocks, then up's from row `split`).
std::vector<Fp8Segment> fp8_segments(int K, int block, int split);

// Kernels over packed weights. A panel computes C [rows, 32] = A [rows, K] . (two packed n-tiles)^T.
// `a` must stay readable for round_up(rows, 32) rows of `lda` elements (its owner pads): AMX loads whole
// 16-row tiles and the rows past `rows` are discarded. C is [round_up(rows, 32)][32] fp32, contiguous.
struct PackedRowOps;

struct PackedKernels {
  const char* name;
  PackedFormat format;
  void (*bf16_panel)(int rows, int k_blocks, const bf16* a, int lda, const bf16* b0, const bf16* b1, float* c);
  // int8: C[m][n] = a_scale[m] * b_scale[n] * sum_k a[m][k] * b[n][k]; b_colsum[n] = sum_k b[n][k] lets
  // unsigned-by-signed instructions (vpdpbusd) take a + 128.
  void (*int8_panel)(int rows, int k_blocks, const int8_t* a, int lda, const float* a_scale, const int8_t* b0,
                     const int8_t* b1, const float* b_scale, const int32_t* b_colsum, float* c);
  // Backward: packs columns [col0, col0 + 32) of W [K, N] as two n-tiles, each k_blocks * 512 elements, the second
  // after the first, so that a panel computes A . W[:, cols]; read from the forward's tiles of W (W's rows are their
  // outputs): `tiles` is the expert's forward k-block holding those 32 columns (inputs), and rows[r] the element
  // offset from `tiles` of row r's first pair in its n-tile (n-tile start + 2 n), -1 for padding rows (k_blocks * 32
  // entries). The forward's padding inputs are zero, so columns past N come out zero.
  void (*pack_columns_bf16)(const bf16* tiles, const int64_t* rows, int k_blocks, bf16* dst);
  // int4: C[m][n] = a_scale[m] * sum_g (scale[g][n] * sum_{k in g} a[m][k] q[n][k] - scale_zero[g][n] * sum_{k in g}
  // a[m][k]), i.e. W = scale * (q - zero) per group; scale / scale_zero are [2 tiles][groups][16], k_blocks even.
  void (*int4_panel)(int rows, int k_blocks, const int8_t* a, int lda, const float* a_scale, const uint8_t* b0,
                     const uint8_t* b1, const float* scale, const float* scale_zero, float* c);
  // fp8 weights, bf16 activations: C[m][n] = sum_i s[i] * sum_{kb in segment i} a[m][k-blocks from a_kb] . b[kb][n],
  // b the tiles as q / 256 and s = s0 for n < 16, s1 after (each scale times 256). Null: the format takes no fp8.
  void (*fp8_panel)(int rows, int nseg, const Fp8Segment* seg, const bf16* a, int lda, const uint8_t* b0,
                    const uint8_t* b1, const float* s0, const float* s1, float* c);
  // The rest of the packed passes' work (PackedRowOps, below), in the instruction set these panels may use.
  const PackedRowOps* ops;
};

// AVX-512 panels on packed weights (gemm_packed_avx512.cpp); the AMX panels use them for few rows, where
// a 16-row tile would be mostly padding and the job is streaming weights at memory speed.
namespace packed_avx512 {
void bf16_panel(int rows, int k_blocks, const bf16* a, int lda, const bf16* b0, const bf16* b1, float* c);
void int8_panel(int rows, int k_blocks, const int8_t* a, int lda, const float* a_scale, const int8_t* b0,
                const int8_t* b1, const float* b_scale, const int32_t* b_colsum, float* c);
void pack_columns_bf16(const bf16* tiles, const int64_t* rows, int k_blocks, bf16* dst);
// kt::pack_columns_fp8 (below), 16 rows of a forward tile at a time where they are whole and in order.
void pack_columns_fp8(const Fp8View& w, int col0, const std::vector<Fp8Segment>& segments, const uint8_t* tiles,
                      const int64_t* rows, const int64_t* cols, uint8_t* dst, float* s0, float* s1);
void int4_panel(int rows, int k_blocks, const int8_t* a, int lda, const float* a_scale, const uint8_t* b0,
                const uint8_t* b1, const float* scale, const float* scale_zero, float* c);
// Pieces of the tile int4 panel that need AVX-512: nibbles of one packed tile to a [16][64] unsigned int8
// tile; sums of each row's inputs per group (rows x groups int32); and C[m][n] += a_scale[m] * (scale[n] *
// acc[m][n] - scale_zero[n] * xsum[m]) over a rows x 32 int32 block (acc row stride 32; one group's scales).
void unpack_int4_tile(const uint8_t* src, uint8_t* dst);
void group_sums(int rows, int groups, const int8_t* a, int lda, int32_t* xsum);
void fold_int4_group(int rows, const int32_t* acc, const int32_t* xsum, int xsum_stride, const float* a_scale,
                     const float* scale0, const float* scale_zero0, const float* scale1, const float* scale_zero1,
                     float* c);
void fp8_panel(int rows, int nseg, const Fp8Segment* seg, const bf16* a, int lda, const uint8_t* b0, const uint8_t* b1,
               const float* s0, const float* s1, float* c);
// Pieces of the tile fp8 panel that need AVX-512: `k_blocks` fp8 tiles (512 bytes each) to bf16 tiles (1 KB each,
// the values q / 256); and C[m][n] += (n < 16 ? s0 : s1) * acc[m][n] over a rows x 32 fp32 block (row stride 32).
void fp8_tiles_to_bf16(const uint8_t* src, int k_blocks, bf16* dst);
void fold_fp8_segment(int rows, const float* acc, float s0, float s1, float* c);

// Element-wise work of the packed path, vectorized (every packed table implies AVX-512 F/BW/BF16 on this CPU).
// Rounding to bf16 is to nearest even (vcvtneps2bf16), as f32_to_bf16; exp is a degree-6 polynomial on
// the reduced argument scaled by 2^n (a few ulp of fp32).
void f32_to_bf16_row(const float* src, int n, bf16* dst);
void bf16_to_f32_row(const bf16* src, int n, float* dst);
// Symmetric int8 of one row: scale = max |x| / 127 (1 for a zero row); dst[n, width) = 0. Returns the scale.
float quantize_row_int8(const float* src, int n, int width, int8_t* dst);
// Gate/up panel C [rows][32] (gate in columns 0-15, up in 16-31; the first `ncols` valid) to
// h = silu(g) * u, with g, u += xa[row] . bt[:, col] when R > 0 (xa [rows][R], bt [R][32] the LoRA B slice
// transposed). Stores g / u to cache as fp32 (row stride ld_cache) or rounded to 24 bits into cache_hi (bits
// 16-31, row stride ld_cache) and cache_lo (bits 8-15, row stride ld_lo), up at + up_offset in each; h as bf16
// and / or fp32 (any of the outputs may be null).
void gate_up_epilogue(int rows, int ncols, float* c, const float* xa, int R, const float* bt, float* cache,
                      bf16* cache_hi, uint8_t* cache_lo, int64_t ld_cache, int64_t ld_lo, int64_t up_offset, bf16* hb,
                      int64_t ld_hb, float* hf, int64_t ld_hf);
// Down panel C [rows][32] to out as fp32, or to out16 as bf16 (row stride ld_out, first `ncols` columns), plus
// ha[row] . bt[:, col]. Both epilogues add their rank-r term to the panel C in place.
void down_epilogue(int rows, int ncols, float* c, const float* ha, int R, const float* bt, float* out, bf16* out16,
                   int64_t ld_out);
// c[row][0:32] += p[row][0:R] . bt[0:R][0:32] for row < rows (panel C [rows][32], p [rows][R], bt [R][32]).
void add_rank_r(int rows, float* c, const float* p, int R, const float* bt);
// acc[i] += s * x[i] for i < n (the weighted sum of a token's bf16 expert rows).
void add_scaled_bf16_row(int n, float s, const bf16* x, float* acc);
// Backward of h = silu(g) * u for one row with dh = wk * d, from the cached 24-bit pre-activations [g | u]
// (planes hi, lo as gate_up_epilogue stores them): [dg | du] as bf16 to d16, h recomputed (stored as bf16 to
// h16 when given); returns d . h (the routing-weight gradient).
float silu_backward_fused_row(int I, const bf16* hi, const uint8_t* lo, const float* d, float wk, bf16* d16, bf16* h16);
// out[m][j] = scale * sum_k a[m][k] * bt[j][k] for m < rows, j < R: bf16 rows a (stride lda) against fp32 bt [R][K].
void rows_times_bt_bf16(int rows, int K, const bf16* a, int64_t lda, const float* bt, int R, float scale, float* out);
// out[j][n] = sum_m p[m][j] * a[row(m)][n] for j < R, n < N (out [R][N] row-major, overwritten), with p [rows][ldp]
// fp32 and a bf16 rows of stride lda, row(m) = index ? index[m] : m.
void tn_bf16_rows(int R, int N, int rows, const float* p, int ldp, const bf16* a, int64_t lda, const int32_t* index,
                  float* out);
}  // namespace packed_avx512

// The work of the packed passes around the panels' tile products, one table per instruction set, with the contracts
// of packed_avx512 above: the few-row panels, column packing for the backward, int4 / fp8 tile conversions and folds,
// row conversions, the epilogues and the rank-r products of the LoRA backward. kPackedRowOpsAvx512 is
// packed_avx512's; kPackedRowOpsScalar (gemm_packed_scalar.cpp) is plain C++, for the AMX emulation on CPUs without
// AVX512-BF16 / VNNI.
struct PackedRowOps {
  decltype(&packed_avx512::bf16_panel) bf16_panel;
  decltype(&packed_avx512::int8_panel) int8_panel;
  decltype(&packed_avx512::int4_panel) int4_panel;
  decltype(&packed_avx512::fp8_panel) fp8_panel;
  decltype(&packed_avx512::pack_columns_bf16) pack_columns_bf16;
  decltype(&packed_avx512::unpack_int4_tile) unpack_int4_tile;
  decltype(&packed_avx512::group_sums) group_sums;
  decltype(&packed_avx512::fold_int4_group) fold_int4_group;
  decltype(&packed_avx512::fp8_tiles_to_bf16) fp8_tiles_to_bf16;
  decltype(&packed_avx512::fold_fp8_segment) fold_fp8_segment;
  decltype(&packed_avx512::f32_to_bf16_row) f32_to_bf16_row;
  decltype(&packed_avx512::bf16_to_f32_row) bf16_to_f32_row;
  decltype(&packed_avx512::quantize_row_int8) quantize_row_int8;
  decltype(&packed_avx512::gate_up_epilogue) gate_up_epilogue;
  decltype(&packed_avx512::down_epilogue) down_epilogue;
  decltype(&packed_avx512::add_scaled_bf16_row) add_scaled_bf16_row;
  decltype(&packed_avx512::silu_backward_fused_row) silu_backward_fused_row;
  decltype(&packed_avx512::rows_times_bt_bf16) rows_times_bt_bf16;
  decltype(&packed_avx512::tn_bf16_rows) tn_bf16_rows;
  decltype(&packed_avx512::pack_columns_fp8) pack_columns_fp8;
};

extern const PackedRowOps kPackedRowOpsAvx512;
extern const PackedRowOps kPackedRowOpsScalar;

extern const PackedKernels kAvx512Bf16Packed;
extern const PackedKernels kAvx512VnniInt8Packed;
extern const PackedKernels kAmxBf16Packed;
extern const PackedKernels kAmxInt8Packed;
extern const PackedKernels kAmxBf16Emulated;
extern const PackedKernels kAmxInt8Emulated;
extern const PackedKernels kAvx512VnniInt4Packed;
extern const PackedKernels kAmxInt4Packed;
extern const PackedKernels kAmxInt4Emulated;
// The emulation on CPUs without AVX512-BF16 / VNNI: scalar row work (kPackedRowOpsScalar) beside the tile model.
extern const PackedKernels kAmxBf16EmulatedScalar;
extern const PackedKernels kAmxInt8EmulatedScalar;
extern const PackedKernels kAmxInt4EmulatedScalar;

// Frees an AlignedBuffer's bytes, unless they are borrowed.
struct AlignedFree {
  bool owned = true;
  void operator()(uint8_t* p) const {
    if (owned) std::free(p);
  }
};

// 64-byte aligned, zero-initialized bytes; or bytes owned elsewhere (borrowed), or a size with no bytes yet.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(size_t bytes);
  // `bytes` at `data`, 64-byte aligned, owned by the caller (a file mapping every rank of a node shares), which
  // keeps them alive and unchanged while the buffer is in use; never freed here.
  static AlignedBuffer borrowed(uint8_t* data, size_t bytes);
  // The size of a buffer whose bytes are not allocated (a layout whose data will be borrowed).
  static AlignedBuffer unallocated(size_t bytes);
  uint8_t* data() const { return data_.get(); }
  size_t size() const { return size_; }
  bool owned() const { return data_.get_deleter().owned; }

 private:
  std::unique_ptr<uint8_t, AlignedFree> data_;
  size_t size_ = 0;
};

// One projection of every expert of a layer, packed: [E][n_tiles][k_blocks] tiles.
struct PackedTensor {
  PackedFormat format = PackedFormat::kNone;
  int experts = 0, outputs = 0, inputs = 0;  // E, N, K of the source
  int n_tiles = 0, k_blocks = 0;
  AlignedBuffer data;
  std::vector<float> scale;     // [E][n_tiles * 16], int8; [E][n_tiles][groups][16], int4
  std::vector<int32_t> colsum;  // [E][n_tiles * 16], int8
  std::vector<float> scale_zero;  // [E][n_tiles][groups][16], int4: scale * zero point
  // fp8: `scale` is [E][n_tiles][segments.size()], each block scale times 256 (the tiles hold q / 256).
  std::vector<Fp8Segment> segments;
  double rel_error = 0.0;       // ||W - dequant(Wq)|| / ||W|| over the layer (0 for bf16)

  // Elements per activation row the panels read: whole k-blocks (fp8: of the inputs; its segments may add k-blocks).
  int padded_inputs() const {
    return format == PackedFormat::kFP8 ? (inputs + 31) / 32 * 32 : k_blocks * k_step(format);
  }
  int groups() const { return format == PackedFormat::kInt4 ? k_blocks * k_step(format) / kInt4Group : 1; }
  // bf16 / fp8: offset, within an expert's n-tile column (elements; fp8: bytes), of input k's value for the tile's
  // output 0 (output n: + 2 n). fp8 inputs sit in the k-blocks of their segment, segments[k / first segment's width].
  int64_t input_offset(int k) const {
    const int kb = segments.empty() ? k / 32 : segments[k / segments[0].k1].k_block(k);
    return static_cast<int64_t>(kb) * 512 + (k % 32 / 2) * 32 + k % 2;
  }
  const uint8_t* tile(int e, int nt) const {
    return data.data() + ((static_cast<int64_t>(e) * n_tiles + nt) * k_blocks) * tile_bytes(format);
  }
  const float* group_scales(int e, int nt) const {
    return scale.data() + (static_cast<int64_t>(e) * n_tiles + nt) * groups() * 16;
  }
  const float* group_scale_zeros(int e, int nt) const {
    return scale_zero.data() + (static_cast<int64_t>(e) * n_tiles + nt) * groups() * 16;
  }
  const float* scales(int e, int nt) const { return scale.data() + (static_cast<int64_t>(e) * n_tiles + nt) * 16; }
  const float* fp8_scales(int e, int nt) const {
    return scale.data() + (static_cast<int64_t>(e) * n_tiles + nt) * segments.size();
  }
  const int32_t* colsums(int e, int nt) const { return colsum.data() + (static_cast<int64_t>(e) * n_tiles + nt) * 16; }
};

// The zeroed layout pack_tensor fills (sizes of every buffer), for packing or for loading saved buffers.
// fp8_block_cols: the inputs per block of the fp8 scales (fp8 only). allocate_data: false leaves the tiles'
// buffer unallocated (its size only), for a layout whose tiles are borrowed or only measured.
PackedTensor packed_layout(int E, int N, int K, PackedFormat format, bool interleave_halves, int fp8_block_cols = 0,
                           bool allocate_data = true);

// Names the packed layout and its version ("kt-packed-v1/int8/tile1024/g128"): saved buffers are only
// reloaded under the same tag.
std::string packed_format_tag(PackedFormat format);

// Packs W [E, N, K] (`dtype`), its rows taken as gate / up halves when `interleave_halves`.
PackedTensor pack_tensor(ThreadPool& pool, const void* w, DType dtype, int E, int N, int K, PackedFormat format,
                         bool interleave_halves);

// Packs fp8 W [E, N, K] (e4m3 bytes) with its block scales [E, scale rows, ceil(K / block_cols)] (gemm.h:
// Fp8View; with interleave_halves the two halves are quantized apart, as gate_up). Needs block_rows % 16 == 0:
// a tile's 16 outputs share one block row.
PackedTensor pack_fp8_tensor(ThreadPool& pool, const uint8_t* q, const float* scale, int E, int N, int K,
                             int block_rows, int block_cols, bool interleave_halves);

// The inverse of pack_tensor / pack_fp8_tensor for the bf16 and fp8 formats, which keep every bit: the experts'
// weights back in their own layout, dst [E, N, K] (bf16, or e4m3 bytes; the fp8 scales are not in the tiles' form
// and are not written). `interleave_halves` as packed.
void unpack_tensor(ThreadPool& pool, const PackedTensor& p, bool interleave_halves, void* dst);

// The backward's fp8 column blocks: columns [col0, col0 + 32) of one expert's e4m3 W [K, N] as two n-tiles of
// `segments` (fp8_segments over its rows), the last segment's kb1 tiles each, the second after the first; and the
// scales of each tile and segment, times 256, into s0 / s1 [segments] (from `w`, the expert's view from (0, 0): only
// its scales are read). The bytes come from the forward's tiles of W (W's rows are their outputs): `tiles` is the
// expert's first n-tile column, rows[r] the byte offset from it of row r's first pair in its n-tile (n-tile start +
// 2 n; every row < K), cols[c] the byte offset within that tile column of column col0 + c's byte of row 0 (-1 past
// N). Needs w.block_cols % 16 == 0: a tile's 16 columns share one block column. A null dst or s0 / s1 skips that part.
void pack_columns_fp8(const Fp8View& w, int col0, const std::vector<Fp8Segment>& segments, const uint8_t* tiles,
                      const int64_t* rows, const int64_t* cols, uint8_t* dst, float* s0, float* s1);
// pack_columns_fp8's work for W's row k of segment s: its bytes (from `src`, the row's first pair in its forward
// tile column) at columns cols[] into both n-tiles of dst (each `tile_column` bytes).
void pack_fp8_column_row(const Fp8Segment& s, int k, int64_t tile_column, const uint8_t* src, const int64_t* cols,
                         uint8_t* dst);

}  // namespace kt

// Expert weights packed once at load into the tile layout of the matrix units, and the kernels that read it.
//
// A packed matrix of N outputs and K inputs is a grid of 1 KB tiles, n-tile major: tile (nt, kb) holds
// outputs [16 nt, 16 nt + 16) and inputs [kb * kStep, (kb + 1) * kStep) as [kStep / P][16][P], P the inputs
// per 32-bit lane (2 for bf16, kStep 32; 4 for int8, kStep 64). That is the B operand of AMX tdpbf16ps /
// tdpbssd exactly as it sits in memory, and one 64-byte row per input pair (quad) is what AVX-512
// vdpbf16ps / vpdpbusd want next to a broadcast activation, so the decode path streams the same bytes.
// Outputs are read in pairs of tiles (32 columns); padding (N to whole pairs, K to whole blocks) is zero.
//
// gate_up is packed with its gate and up tiles interleaved: pair p = (gate rows [16p, 16p + 16),
// up rows [16p, 16p + 16)), so one task computes matching gate and up columns and applies silu * up at once.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#include "../runtime/thread_pool.h"
#include "gemm.h"

namespace kt {

enum class PackedFormat { kNone, kBF16, kInt8 };

constexpr int kTileBytes = 1024;
constexpr int kTileRows = 16;  // outputs per tile, and activation rows per AMX A tile

inline int k_step(PackedFormat f) { return f == PackedFormat::kInt8 ? 64 : 32; }

// Kernels over packed weights. A panel computes C [rows, 32] = A [rows, K] . (two packed n-tiles)^T.
// `a` must stay readable for round_up(rows, 32) rows of `lda` elements (its owner pads): AMX loads whole
// 16-row tiles and the rows past `rows` are discarded. C is [round_up(rows, 32)][32] fp32, contiguous.
struct PackedKernels {
  const char* name;
  PackedFormat format;
  void (*bf16_panel)(int rows, int k_blocks, const bf16* a, int lda, const bf16* b0, const bf16* b1, float* c);
  // int8: C[m][n] = a_scale[m] * b_scale[n] * sum_k a[m][k] * b[n][k]; b_colsum[n] = sum_k b[n][k] lets
  // unsigned-by-signed instructions (vpdpbusd) take a + 128.
  void (*int8_panel)(int rows, int k_blocks, const int8_t* a, int lda, const float* a_scale, const int8_t* b0,
                     const int8_t* b1, const float* b_scale, const int32_t* b_colsum, float* c);
  // Backward: packs columns [col0, col0 + 32) of a row-major bf16 W [K, N] (row stride ld) as two n-tiles,
  // each k_blocks * 512 elements, the second after the first, so that a panel computes A . W[:, cols].
  void (*pack_columns_bf16)(const bf16* w, int64_t ld, int K, int N, int col0, int k_blocks, bf16* dst);
};

// AVX-512 panels on packed weights (gemm_packed_avx512.cpp); the AMX panels use them for few rows, where
// a 16-row tile would be mostly padding and the job is streaming weights at memory speed.
namespace packed_avx512 {
void bf16_panel(int rows, int k_blocks, const bf16* a, int lda, const bf16* b0, const bf16* b1, float* c);
void int8_panel(int rows, int k_blocks, const int8_t* a, int lda, const float* a_scale, const int8_t* b0,
                const int8_t* b1, const float* b_scale, const int32_t* b_colsum, float* c);
void pack_columns_bf16(const bf16* w, int64_t ld, int K, int N, int col0, int k_blocks, bf16* dst);
}  // namespace packed_avx512

extern const PackedKernels kAvx512Bf16Packed;
extern const PackedKernels kAvx512VnniInt8Packed;
extern const PackedKernels kAmxBf16Packed;
extern const PackedKernels kAmxInt8Packed;
extern const PackedKernels kAmxBf16Emulated;
extern const PackedKernels kAmxInt8Emulated;

// 64-byte aligned, zero-initialized bytes.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(size_t bytes);
  uint8_t* data() const { return data_.get(); }
  size_t size() const { return size_; }

 private:
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  std::unique_ptr<uint8_t, Free> data_;
  size_t size_ = 0;
};

// One projection of every expert of a layer, packed: [E][n_tiles][k_blocks] tiles.
struct PackedTensor {
  PackedFormat format = PackedFormat::kNone;
  int experts = 0, outputs = 0, inputs = 0;  // E, N, K of the source
  int n_tiles = 0, k_blocks = 0;
  AlignedBuffer data;
  std::vector<float> scale;     // [E][n_tiles * 16], int8
  std::vector<int32_t> colsum;  // [E][n_tiles * 16], int8
  double rel_error = 0.0;       // ||W - dequant(Wq)|| / ||W|| over the layer (0 for bf16)

  int padded_inputs() const { return k_blocks * k_step(format); }
  const uint8_t* tile(int e, int nt) const {
    return data.data() + ((static_cast<int64_t>(e) * n_tiles + nt) * k_blocks) * kTileBytes;
  }
  const float* scales(int e, int nt) const { return scale.data() + (static_cast<int64_t>(e) * n_tiles + nt) * 16; }
  const int32_t* colsums(int e, int nt) const {
    return colsum.data() + (static_cast<int64_t>(e) * n_tiles + nt) * 16;
  }
};

// Packs W [E, N, K] (`dtype`), its rows taken as gate / up halves when `interleave_halves`.
PackedTensor pack_tensor(ThreadPool& pool, const void* w, DType dtype, int E, int N, int K, PackedFormat format,
                         bool interleave_halves);

}  // namespace kt

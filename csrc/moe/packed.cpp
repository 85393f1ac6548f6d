// Packing and quantization of expert weights at load (portable C++: it runs once per layer, spread over the
// pool, and its cost is reading the checkpoint bytes once).
#include "packed.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

namespace kt {
namespace {

inline float element(const void* w, DType t, int64_t i) {
  return t == DType::kF32 ? static_cast<const float*>(w)[i] : bf16_to_f32(static_cast<const bf16*>(w)[i]);
}

// Source row (within one expert) of packed output n, or -1 for padding.
int64_t source_row(int n, int N, bool interleave_halves) {
  if (!interleave_halves) return n < N ? n : -1;
  const int half = N / 2;
  const int tile = n / kTileRows, within = n % kTileRows;
  const int row = (tile / 2) * kTileRows + within;  // tile 2p: gate rows of pair p; tile 2p + 1: up rows
  if (row >= half) return -1;
  return (tile % 2) * half + row;
}

struct TileStats {
  double err2 = 0.0, ref2 = 0.0;
};

// One n-tile (16 outputs, all k-blocks) of one expert.
void pack_bf16_tile(const void* w, DType t, const int64_t* rows, int K, int k_blocks, bf16* dst) {
  for (int kb = 0; kb < k_blocks; ++kb)
    for (int kp = 0; kp < 16; ++kp)
      for (int n = 0; n < kTileRows; ++n)
        for (int j = 0; j < 2; ++j) {
          const int k = kb * 32 + 2 * kp + j;
          const float v = rows[n] >= 0 && k < K ? element(w, t, rows[n] * K + k) : 0.f;
          dst[(static_cast<int64_t>(kb) * 16 + kp) * 32 + n * 2 + j] = f32_to_bf16(v);
        }
}

// Symmetric per-output int8: q = round(W / s), s = max |W[n, :]| / 127, so dequant(q) = s * q.
void pack_int8_tile(const void* w, DType t, const int64_t* rows, int K, int k_blocks, int8_t* dst, float* scale,
                    int32_t* colsum, TileStats& stats) {
  for (int n = 0; n < kTileRows; ++n) {
    float amax = 0.f;
    if (rows[n] >= 0)
      for (int k = 0; k < K; ++k) amax = std::max(amax, std::fabs(element(w, t, rows[n] * K + k)));
    scale[n] = amax > 0.f ? amax / 127.f : 0.f;
    colsum[n] = 0;
  }
  for (int kb = 0; kb < k_blocks; ++kb)
    for (int kq = 0; kq < 16; ++kq)
      for (int n = 0; n < kTileRows; ++n)
        for (int j = 0; j < 4; ++j) {
          const int k = kb * 64 + 4 * kq + j;
          int8_t q = 0;
          if (rows[n] >= 0 && k < K) {
            const float v = element(w, t, rows[n] * K + k);
            if (scale[n] > 0.f) q = static_cast<int8_t>(std::clamp(std::nearbyint(v / scale[n]), -127.f, 127.f));
            const double err = static_cast<double>(v) - static_cast<double>(q) * scale[n];
            stats.err2 += err * err;
            stats.ref2 += static_cast<double>(v) * v;
          }
          colsum[n] += q;
          dst[(static_cast<int64_t>(kb) * 16 + kq) * 64 + n * 4 + j] = q;
        }
}

// Asymmetric int4 per (output, group of kInt4Group inputs): the range [min(w, 0), max(w, 0)] maps onto 0..15,
// scale = range / 15, zero = round(-min / scale), q = clamp(round(w / scale) + zero, 0, 15), so that
// dequant(q) = scale * (q - zero) and 0 is exact.
void pack_int4_tile(const void* w, DType t, const int64_t* rows, int K, int k_blocks, uint8_t* dst, float* scale,
                    float* scale_zero, TileStats& stats) {
  const int groups = k_blocks * 64 / kInt4Group;
  std::fill(dst, dst + static_cast<int64_t>(k_blocks) * kTileBytes / 2, uint8_t(0));
  for (int n = 0; n < kTileRows; ++n)
    for (int g = 0; g < groups; ++g) {
      const int k0 = g * kInt4Group, k1 = std::min(K, k0 + kInt4Group);
      float lo = 0.f, hi = 0.f;
      if (rows[n] >= 0)
        for (int k = k0; k < k1; ++k) {
          const float v = element(w, t, rows[n] * K + k);
          lo = std::min(lo, v);
          hi = std::max(hi, v);
        }
      const float s = hi > lo ? (hi - lo) / 15.f : 1.f;
      const float zero = std::clamp(std::nearbyint(-lo / s), 0.f, 15.f);
      scale[g * 16 + n] = s;
      scale_zero[g * 16 + n] = s * zero;
      if (rows[n] < 0) continue;
      for (int k = k0; k < k1; ++k) {
        const float v = element(w, t, rows[n] * K + k);
        const int q = static_cast<int>(std::clamp(std::nearbyint(v / s) + zero, 0.f, 15.f));
        const double err = static_cast<double>(v) - static_cast<double>(s) * (q - zero);
        stats.err2 += err * err;
        stats.ref2 += static_cast<double>(v) * v;
        const int kb = k / 64, kq = (k % 64) / 4, j = k % 4;
        uint8_t& byte = dst[static_cast<int64_t>(kb) * (kTileBytes / 2) + (kq / 2) * 64 + n * 4 + j];
        byte = static_cast<uint8_t>(byte | (kq % 2 ? q << 4 : q));
      }
    }
}

// One n-tile (16 outputs) of one expert, fp8: the e4m3 bytes of each segment's inputs in its k-blocks, and the
// tile's scale per segment (its outputs share one block row) times 256.
void pack_fp8_tile(const uint8_t* q, const int64_t* rows, int K, const std::vector<Fp8Segment>& segments,
                   const float* scale_row, uint8_t* dst, float* scale) {
  for (size_t i = 0; i < segments.size(); ++i) {
    const Fp8Segment& s = segments[i];
    scale[i] = scale_row ? scale_row[s.block] * 256.f : 0.f;
    for (int n = 0; n < kTileRows; ++n) {
      if (rows[n] < 0) continue;
      const uint8_t* src = q + rows[n] * K;
      for (int k = s.k0; k < s.k1; ++k) {
        const int kb = s.k_block(k), kp = (k % 32) / 2, j = k % 2;
        dst[static_cast<int64_t>(kb) * (kTileBytes / 2) + (kp * kTileRows + n) * 2 + j] = src[k];
      }
    }
  }
}

}  // namespace

std::vector<Fp8Segment> fp8_segments(int K, int block, int split) {
  std::vector<Fp8Segment> out;
  int kb = 0;
  auto add = [&](int k0, int k1, int index) {
    const int a_kb = k0 / 32, a_end = (k1 + 31) / 32;
    out.push_back({a_kb, kb, kb + a_end - a_kb, k0, k1, index});
    kb += a_end - a_kb;
  };
  const int first_end = split > 0 ? split : K;
  for (int k0 = 0; k0 < first_end; k0 += block) add(k0, std::min(first_end, k0 + block), k0 / block);
  const int first_blocks = (first_end + block - 1) / block;
  if (split > 0)
    for (int k0 = split; k0 < K; k0 += block) add(k0, std::min(K, k0 + block), first_blocks + (k0 - split) / block);
  return out;
}

AlignedBuffer::AlignedBuffer(size_t bytes) : size_(bytes) {
  const size_t rounded = (bytes + 63) / 64 * 64;
  void* p = rounded ? std::aligned_alloc(64, rounded) : nullptr;
  if (rounded && !p) throw std::bad_alloc();
  if (p) std::memset(p, 0, rounded);
  data_.reset(static_cast<uint8_t*>(p));
}

AlignedBuffer AlignedBuffer::borrowed(uint8_t* data, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(data) % 64 != 0)
    throw std::invalid_argument("packed weights: a borrowed buffer must be 64-byte aligned");
  AlignedBuffer b;
  b.data_ = std::unique_ptr<uint8_t, AlignedFree>(data, AlignedFree{false});
  b.size_ = bytes;
  return b;
}

AlignedBuffer AlignedBuffer::unallocated(size_t bytes) {
  AlignedBuffer b;
  b.size_ = bytes;
  return b;
}

PackedTensor packed_layout(int E, int N, int K, PackedFormat format, bool interleave_halves, int fp8_block_cols,
                           bool allocate_data) {
  PackedTensor p;
  p.format = format;
  p.experts = E;
  p.outputs = N;
  p.inputs = K;
  const int tiles = interleave_halves ? 2 * ((N / 2 + kTileRows - 1) / kTileRows) : (N + kTileRows - 1) / kTileRows;
  p.n_tiles = (tiles + 1) / 2 * 2;
  p.k_blocks = (K + k_step(format) - 1) / k_step(format);
  if (format == PackedFormat::kInt4) p.k_blocks = (p.k_blocks + 1) / 2 * 2;  // whole groups
  if (format == PackedFormat::kFP8) {
    if (fp8_block_cols <= 0) throw std::invalid_argument("packed_layout: fp8 needs its block size");
    p.segments = fp8_segments(K, fp8_block_cols, 0);
    p.k_blocks = p.segments.back().kb1;
  }
  const int64_t num_tiles = static_cast<int64_t>(E) * p.n_tiles;
  const auto bytes = static_cast<size_t>(num_tiles * p.k_blocks * tile_bytes(format));
  p.data = allocate_data ? AlignedBuffer(bytes) : AlignedBuffer::unallocated(bytes);
  if (format == PackedFormat::kInt4) {
    p.scale.assign(num_tiles * p.groups() * kTileRows, 0.f);
    p.scale_zero.assign(num_tiles * p.groups() * kTileRows, 0.f);
  }
  if (format == PackedFormat::kInt8) {
    p.scale.assign(num_tiles * kTileRows, 0.f);
    p.colsum.assign(num_tiles * kTileRows, 0);
  }
  if (format == PackedFormat::kFP8) p.scale.assign(num_tiles * p.segments.size(), 0.f);
  return p;
}

std::string packed_format_tag(PackedFormat format) {
  const char* name = format == PackedFormat::kBF16   ? "bf16"
                     : format == PackedFormat::kInt8 ? "int8"
                     : format == PackedFormat::kInt4 ? "int4"
                     : format == PackedFormat::kFP8  ? "fp8"
                                                     : "none";
  // Bump the version whenever the tile layout, the quantization or the blob set changes.
  return std::string("kt-packed-v1/") + name + "/tile" + std::to_string(kTileBytes) + "/g" + std::to_string(kInt4Group);
}

PackedTensor pack_tensor(ThreadPool& pool, const void* w, DType dtype, int E, int N, int K, PackedFormat format,
                         bool interleave_halves) {
  PackedTensor p = packed_layout(E, N, K, format, interleave_halves);
  const int64_t num_tiles = static_cast<int64_t>(E) * p.n_tiles;
  const int64_t bytes_per_tile_column = static_cast<int64_t>(p.k_blocks) * tile_bytes(format);
  std::vector<TileStats> stats(num_tiles);
  pool.parallel_for(num_tiles, [&](int64_t task) {
    const int e = static_cast<int>(task / p.n_tiles), nt = static_cast<int>(task % p.n_tiles);
    int64_t rows[kTileRows];
    for (int n = 0; n < kTileRows; ++n) {
      const int64_t r = source_row(nt * kTileRows + n, N, interleave_halves);
      rows[n] = r < 0 ? -1 : static_cast<int64_t>(e) * N + r;
    }
    uint8_t* dst = p.data.data() + task * bytes_per_tile_column;
    if (format == PackedFormat::kBF16)
      pack_bf16_tile(w, dtype, rows, K, p.k_blocks, reinterpret_cast<bf16*>(dst));
    else if (format == PackedFormat::kInt4)
      pack_int4_tile(w, dtype, rows, K, p.k_blocks, dst, p.scale.data() + task * p.groups() * 16,
                     p.scale_zero.data() + task * p.groups() * 16, stats[task]);
    else
      pack_int8_tile(w, dtype, rows, K, p.k_blocks, reinterpret_cast<int8_t*>(dst), p.scale.data() + task * 16,
                     p.colsum.data() + task * 16, stats[task]);
  });
  double err2 = 0.0, ref2 = 0.0;
  for (const auto& s : stats) {
    err2 += s.err2;
    ref2 += s.ref2;
  }
  p.rel_error = ref2 > 0.0 ? std::sqrt(err2 / ref2) : 0.0;
  return p;
}

}  // namespace kt

namespace kt {

PackedTensor pack_fp8_tensor(ThreadPool& pool, const uint8_t* q, const float* scale, int E, int N, int K,
                             int block_rows, int block_cols, bool interleave_halves) {
  if (block_rows <= 0 || block_rows % kTileRows != 0)
    throw std::invalid_argument("pack_fp8_tensor: block rows must be a positive multiple of 16, got " +
                                std::to_string(block_rows));
  PackedTensor p = packed_layout(E, N, K, PackedFormat::kFP8, interleave_halves, block_cols);
  const int half = interleave_halves ? N / 2 : 0;
  const int64_t scale_cols = (K + block_cols - 1) / block_cols;
  const int64_t scale_rows =
      interleave_halves ? 2 * ((half + block_rows - 1) / block_rows) : (N + block_rows - 1) / block_rows;
  const int64_t num_tiles = static_cast<int64_t>(E) * p.n_tiles;
  const int64_t bytes_per_tile_column = static_cast<int64_t>(p.k_blocks) * tile_bytes(PackedFormat::kFP8);
  const size_t nseg = p.segments.size();
  pool.parallel_for(num_tiles, [&](int64_t task) {
    const int e = static_cast<int>(task / p.n_tiles), nt = static_cast<int>(task % p.n_tiles);
    Fp8View view;  // expert e's scales, for the block row of a source row
    view.scale = scale + e * scale_rows * scale_cols;
    view.ld_scale = static_cast<int>(scale_cols);
    view.block_rows = block_rows;
    view.block_cols = block_cols;
    view.split = half;
    int64_t rows[kTileRows];
    const float* scale_row = nullptr;
    for (int n = 0; n < kTileRows; ++n) {
      const int64_t r = source_row(nt * kTileRows + n, N, interleave_halves);
      rows[n] = r < 0 ? -1 : static_cast<int64_t>(e) * N + r;
      if (r >= 0 && !scale_row) scale_row = view.scales_of_row(static_cast<int>(r));
    }
    pack_fp8_tile(q, rows, K, p.segments, scale_row, p.data.data() + task * bytes_per_tile_column,
                  p.scale.data() + task * nseg);
  });
  return p;
}

void unpack_tensor(ThreadPool& pool, const PackedTensor& p, bool interleave_halves, void* dst) {
  if (p.format != PackedFormat::kBF16 && p.format != PackedFormat::kFP8)
    throw std::logic_error("unpack_tensor: only the bf16 and fp8 formats keep the weights exactly");
  const int N = p.outputs, K = p.inputs;
  const bool fp8 = p.format == PackedFormat::kFP8;
  std::vector<int64_t> at(K);
  for (int k = 0; k < K; ++k) at[k] = p.input_offset(k);
  pool.parallel_for(static_cast<int64_t>(p.experts) * p.n_tiles, [&](int64_t task) {
    const int e = static_cast<int>(task / p.n_tiles), nt = static_cast<int>(task % p.n_tiles);
    const uint8_t* tiles = p.tile(e, nt);
    for (int n = 0; n < kTileRows; ++n) {
      const int64_t r = source_row(nt * kTileRows + n, N, interleave_halves);
      if (r < 0) continue;
      const int64_t row = (static_cast<int64_t>(e) * N + r) * K;
      if (fp8) {
        uint8_t* out = static_cast<uint8_t*>(dst) + row;
        for (int k = 0; k < K; ++k) out[k] = tiles[at[k] + 2 * n];
      } else {
        const bf16* src = reinterpret_cast<const bf16*>(tiles);
        bf16* out = static_cast<bf16*>(dst) + row;
        for (int k = 0; k < K; ++k) out[k] = src[at[k] + 2 * n];
      }
    }
  });
}

void pack_columns_fp8(const Fp8View& w, int col0, const std::vector<Fp8Segment>& segments, const uint8_t* tiles,
                      const int64_t* rows, const int64_t* cols, uint8_t* dst, float* s0, float* s1) {
  const int k_blocks = segments.back().kb1;
  const int64_t tile_column = static_cast<int64_t>(k_blocks) * (kTileBytes / 2);
  if (dst) std::memset(dst, 0, static_cast<size_t>(2 * tile_column));
  const bool second = cols[16] >= 0;  // columns past N are -1, and col0 + 16 < N when any of the second tile is
  for (size_t i = 0; i < segments.size(); ++i) {
    const Fp8Segment& s = segments[i];
    if (s0) {
      const float* srow = w.scales_of_row(s.k0);
      s0[i] = srow[col0 / w.block_cols] * 256.f;
      s1[i] = second ? srow[(col0 + 16) / w.block_cols] * 256.f : 0.f;
    }
    if (!dst) continue;
    for (int k = s.k0; k < s.k1; ++k) pack_fp8_column_row(s, k, tile_column, tiles + rows[k], cols, dst);
  }
}

void pack_fp8_column_row(const Fp8Segment& s, int k, int64_t tile_column, const uint8_t* src, const int64_t* cols,
                         uint8_t* dst) {
  const int kb = s.k_block(k), kp = (k % 32) / 2, j = k % 2;
  uint8_t* row = dst + static_cast<int64_t>(kb) * (kTileBytes / 2) + kp * 2 * kTileRows + j;
  for (int c = 0; c < 32 && cols[c] >= 0; ++c) row[(c / kTileRows) * tile_column + (c % kTileRows) * 2] = src[cols[c]];
}

}  // namespace kt

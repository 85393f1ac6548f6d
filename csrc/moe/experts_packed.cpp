// ExpertsOp on packed weights: packing at load, the fused forward, and the backward's projections.
//
// Forward, per layer: gather rows as bf16 (or int8 + row scale) -> one pass over (expert, gate/up pair
// group) computing gate and up columns together and writing h = silu(gate) * up (+ the cache for backward)
// -> one pass over (expert, down column group) -> combine. Every expert of the layer is in each pass, so a
// pass is one pool job however the tokens are routed.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "../runtime/phase_times.h"
#include "experts_op.h"

namespace kt {
namespace {

constexpr int kRowChunk = 128;  // activation rows kept in L2 while a task walks its weight pairs
constexpr int64_t kRowsPerTask = 32;
constexpr int64_t kLoraRowChunk = 64;  // rows per task of the rank-r products against bf16 rows

// Tile pairs per task: few rows stream weights (small tasks spread them over all threads); many rows want
// the activation chunk reused across several pairs.
inline int pairs_per_task(int64_t rows_per_expert) { return rows_per_expert >= 64 ? 4 : 1; }

// -1: decided by free memory (the default); 0: never; 1: always.
std::atomic<int> g_backward_weight_cache{-1};

thread_local std::vector<float> t_panel;
thread_local std::vector<uint8_t> t_column_bytes;  // the backward's column blocks of one task
thread_local std::vector<float> t_fp8_scales;        // and their fp8 scales
thread_local std::vector<float> t_row;
thread_local std::vector<float> t_lora_b;  // [r][32]: a LoRA B slice transposed for one tile pair

// bt[j][n] = B[rows[n]][j] for the 32 rows of a tile pair (rows[n] < 0: padding, zero), B [*, R] row-major.
float* lora_slice(const float* B, int R, const int64_t* rows) {
  if (t_lora_b.size() < static_cast<size_t>(R) * 32) t_lora_b.resize(static_cast<size_t>(R) * 32);
  float* bt = t_lora_b.data();
  for (int n = 0; n < 32; ++n)
    for (int j = 0; j < R; ++j) bt[j * 32 + n] = rows[n] >= 0 ? B[rows[n] * R + j] : 0.f;
  return bt;
}

float* panel_buffer(int rows) {
  const size_t n = static_cast<size_t>((rows + 31) / 32 * 32) * 32;
  if (t_panel.size() < n) t_panel.resize(n);
  return t_panel.data();
}

}  // namespace

void set_backward_weight_cache(std::optional<bool> keep) {
  g_backward_weight_cache.store(keep ? static_cast<int>(*keep) : -1, std::memory_order_relaxed);
}

std::optional<bool> backward_weight_cache() {
  const int keep = g_backward_weight_cache.load(std::memory_order_relaxed);
  return keep < 0 ? std::nullopt : std::optional<bool>(keep == 1);
}

bool ExpertsOp::packed_forward(DType act) const {
  if (!pk_ || packed_gate_up_.data.size() == 0) return false;
  return int_activations(pk_->format) || act == DType::kBF16;
}

bool ExpertsOp::packed_backward(DType act) const {
  // Its column blocks come from the forward's tiles: packed ones only.
  if (!pk_ || act != DType::kBF16 || packed_gate_up_.data.size() == 0) return false;
  if (w_.dtype == DType::kFP8E4M3) return packs_fp8();  // the fp8 panels on column blocks made per task or kept
  return pk_->format == PackedFormat::kBF16 && pk_->pack_columns_bf16 && w_.dtype == DType::kBF16;
}

bool ExpertsOp::packs_fp8() const {
  // The forward's tiles take 16 outputs of one block row, the backward's column tiles 16 columns of one block
  // column; the segments (packed.h) cut the inputs at any block edge.
  return pk_ && pk_->format == PackedFormat::kBF16 && pk_->fp8_panel && w_.dtype == DType::kFP8E4M3 &&
         w_.block_rows % kTileRows == 0 && w_.block_cols % kTileRows == 0;
}

PackedFormat ExpertsOp::packed_format() const {
  if (!pk_) return PackedFormat::kNone;
  return w_.dtype == DType::kFP8E4M3 ? PackedFormat::kFP8 : pk_->format;
}

bool ExpertsOp::packs() const {
  // bf16 packing of fp32 weights would round them: fp32 layers keep the exact path. fp8 blocks that do not hold
  // whole tiles keep the unpacked fp8 kernels.
  if (w_.dtype == DType::kFP8E4M3) return packs_fp8();
  return pk_ && !(pk_->format == PackedFormat::kBF16 && w_.dtype != DType::kBF16);
}

PackedTensor ExpertsOp::packed_tensor_layout(bool gate_up, bool allocate_data) const {
  const int E = w_.num_experts, H = w_.hidden, I = w_.intermediate;
  return gate_up ? kt::packed_layout(E, 2 * I, H, packed_format(), true, w_.block_cols, allocate_data)
                 : kt::packed_layout(E, H, I, packed_format(), false, w_.block_cols, allocate_data);
}

void ExpertsOp::pack(ThreadPool& pool) {
  if (!packs()) return;
  require_weights("packing");
  const int E = w_.num_experts, H = w_.hidden, I = w_.intermediate;
  if (w_.dtype == DType::kFP8E4M3) {
    packed_gate_up_ = pack_fp8_tensor(pool, static_cast<const uint8_t*>(w_.gate_up), w_.gate_up_scale, E, 2 * I, H,
                                      w_.block_rows, w_.block_cols, true);
    packed_down_ = pack_fp8_tensor(pool, static_cast<const uint8_t*>(w_.down), w_.down_scale, E, H, I, w_.block_rows,
                                   w_.block_cols, false);
  } else {
    packed_gate_up_ = pack_tensor(pool, w_.gate_up, w_.dtype, E, 2 * I, H, pk_->format, true);
    packed_down_ = pack_tensor(pool, w_.down, w_.dtype, E, H, I, pk_->format, false);
  }
  ++pack_count_;
}

void ExpertsOp::release_weights() {
  if (!packs() || packed_gate_up_.data.size() == 0)
    throw std::logic_error(std::string("experts: kernel '") + (pk_ ? pk_->name : k_->name) +
                           "' computes from the expert weights themselves" +
                           (packs() ? " until they are packed" : " (it packs none of this dtype)") +
                           ": they cannot be released");
  w_.gate_up = nullptr;
  w_.down = nullptr;
}

void ExpertsOp::unpack_weights(ThreadPool& pool, void* gate_up, void* down, bool adopt) {
  const PackedFormat format = packed_format();
  if (!packs() || packed_gate_up_.data.size() == 0 || (format != PackedFormat::kBF16 && format != PackedFormat::kFP8))
    throw std::logic_error(std::string("experts: kernel '") + (pk_ ? pk_->name : k_->name) +
                           "' keeps no exact packed copy of the weights to give them back from");
  if (!gate_up || !down) throw std::invalid_argument("experts: null weight pointer");
  unpack_tensor(pool, packed_gate_up_, true, gate_up);
  unpack_tensor(pool, packed_down_, false, down);
  if (adopt) {
    w_.gate_up = gate_up;
    w_.down = down;
  }
}

namespace {

void append_blobs(const std::string& prefix, PackedTensor& p, bool with_data, std::vector<ExpertsOp::PackedBlob>& out) {
  auto add = [&](const char* name, void* data, size_t bytes) {
    if (bytes > 0) out.push_back({prefix + "." + name, with_data ? static_cast<uint8_t*>(data) : nullptr, bytes});
  };
  add("data", p.data.data(), p.data.size());
  add("scale", p.scale.data(), p.scale.size() * sizeof(float));
  add("colsum", p.colsum.data(), p.colsum.size() * sizeof(int32_t));
  add("scale_zero", p.scale_zero.data(), p.scale_zero.size() * sizeof(float));
}

}  // namespace

std::string ExpertsOp::packed_format_tag() const {
  if (!packs()) return "";
  std::string tag = kt::packed_format_tag(packed_format());
  // The fp8 segments and scales follow the block size.
  if (w_.dtype == DType::kFP8E4M3) tag += "/b" + std::to_string(w_.block_rows) + "x" + std::to_string(w_.block_cols);
  return tag;
}

std::vector<ExpertsOp::PackedBlob> ExpertsOp::packed_blobs() {
  std::vector<PackedBlob> out;
  if (packed_gate_up_.data.size() == 0) return out;
  append_blobs("gate_up", packed_gate_up_, true, out);
  append_blobs("down", packed_down_, true, out);
  return out;
}

std::vector<ExpertsOp::PackedBlob> ExpertsOp::packed_layout() const {
  std::vector<PackedBlob> out;
  if (!packs()) return out;
  // Sizes only: the tiles are not allocated; the scales are (small), then dropped.
  PackedTensor gu = packed_tensor_layout(true, false);
  PackedTensor d = packed_tensor_layout(false, false);
  append_blobs("gate_up", gu, false, out);
  append_blobs("down", d, false, out);
  return out;
}

void ExpertsOp::load_packed(const std::string& tag, const std::vector<PackedBlob>& blobs, double gate_up_error,
                            double down_error, bool borrow) {
  if (!packs()) throw std::invalid_argument("experts: this kernel and weight dtype have no packed weights to load");
  const std::string expected_tag = packed_format_tag();
  if (tag != expected_tag)
    throw std::invalid_argument("experts: packed weights have format '" + tag + "', this build expects '" +
                                expected_tag + "'");
  PackedTensor gu = packed_tensor_layout(true, !borrow);
  PackedTensor d = packed_tensor_layout(false, !borrow);
  std::vector<PackedBlob> want;  // borrowed tiles have no buffer here (data null): their pointers are taken below
  append_blobs("gate_up", gu, true, want);
  append_blobs("down", d, true, want);
  if (blobs.size() != want.size()) {
    std::string names;
    for (const auto& b : want) names += (names.empty() ? "" : ", ") + b.name;
    throw std::invalid_argument("experts: expected " + std::to_string(want.size()) + " packed blobs (" + names +
                                "), got " + std::to_string(blobs.size()));
  }
  for (const auto& w : want) {
    const PackedBlob* src = nullptr;
    for (const auto& b : blobs)
      if (b.name == w.name) src = &b;
    if (!src) throw std::invalid_argument("experts: packed blob '" + w.name + "' is missing");
    if (src->bytes != w.bytes)
      throw std::invalid_argument("experts: packed blob '" + w.name + "' has " + std::to_string(src->bytes) +
                                  " bytes, expected " + std::to_string(w.bytes));
    if (!src->data) throw std::invalid_argument("experts: null pointer for packed blob '" + w.name + "'");
    if (!w.data && reinterpret_cast<uintptr_t>(src->data) % 64 != 0)
      throw std::invalid_argument("experts: packed blob '" + w.name + "' to borrow is not 64-byte aligned");
  }
  for (const auto& w : want) {
    for (const auto& b : blobs) {
      if (b.name != w.name) continue;
      if (w.data)
        std::memcpy(w.data, b.data, w.bytes);
      else  // borrowed tiles
        (w.name == "gate_up.data" ? gu : d).data = AlignedBuffer::borrowed(b.data, b.bytes);
    }
  }
  gu.rel_error = gate_up_error;
  d.rel_error = down_error;
  packed_gate_up_ = std::move(gu);
  packed_down_ = std::move(d);
}

void ExpertsOp::gather_packed(ThreadPool& pool, const Routing& r, const void* src, DType t, int cols, int width,
                              uint8_t* dst, float* scales) const {
  const int64_t S = r.num_rows();
  const bool int8 = scales != nullptr;
  pool.parallel_for((S + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task) {
    const int64_t end = std::min(S, (task + 1) * kRowsPerTask);
    for (int64_t row = task * kRowsPerTask; row < end; ++row) {
      const int64_t offset = static_cast<int64_t>(r.row_token[row]) * cols;
      const float* f32_row = t == DType::kF32 ? static_cast<const float*>(src) + offset : nullptr;
      const bf16* bf16_row = t == DType::kBF16 ? static_cast<const bf16*>(src) + offset : nullptr;
      if (!int8) {  // bf16 rows are copied as they are
        bf16* d = reinterpret_cast<bf16*>(dst) + row * width;
        if (bf16_row)
          std::copy(bf16_row, bf16_row + cols, d);
        else
          row_ops().f32_to_bf16_row(f32_row, cols, d);
        std::fill(d + cols, d + width, bf16(0));
        continue;
      }
      if (bf16_row) {
        if (t_row.size() < static_cast<size_t>(cols)) t_row.resize(cols);
        row_ops().bf16_to_f32_row(bf16_row, cols, t_row.data());
        f32_row = t_row.data();
      }
      // Symmetric per-row int8: the row's largest magnitude maps to 127.
      scales[row] = row_ops().quantize_row_int8(f32_row, cols, width, reinterpret_cast<int8_t*>(dst) + row * width);
    }
  });
}

// One call of the packed forward, phase by phase.
struct ExpertsOp::PackedForward : PassContext {
  const bool int8;                  // int8 activation rows (int8 or int4 weights)
  const bool int4;
  const int elem;                   // bytes per element of the activation rows
  const PackedTensor& gu_w;
  const PackedTensor& d_w;
  const int ldx, ldh;               // row strides of x and h
  const ForwardCache kept;          // the cache for the backward (all null without one)
  uint8_t* xq = nullptr;            // x rows [S + 32, ldx], bf16 or int8, zero past H
  float* xs = nullptr;              // their int8 scales
  float* xa = nullptr;              // scaled LoRA input of gate_up [S, r]
  float* ha = nullptr;              // scaled LoRA input of down [S, r]
  bf16* hb = nullptr;               // h as bf16 rows [S + 32, ldh]: the bf16 down panels' (and LoRA ha's) rows
  float* hf = nullptr;              // h as fp32 [S, I], when int8 re-quantizes it
  const uint8_t* h_rows = nullptr;  // the rows the down panels read: hb, or h as int8
  float* hs = nullptr;              // int8 scales of h_rows
  float* out = nullptr;             // expert outputs [S, H] as fp32 (fp32 activations)
  bf16* out16 = nullptr;            // or as bf16 (bf16 activations)

  PackedForward(ExpertsOp& op, ThreadPool& pool, const Routing& r, const Activations& act, const LoraFactors& lora,
                float* cache)
      : PassContext(op, pool, r, act, lora),
        int8(int_activations(op.packed_format())),
        int4(op.packed_format() == PackedFormat::kInt4),
        elem(int8 ? 1 : 2),
        gu_w(op.packed_gate_up_),
        d_w(op.packed_down_),
        ldx(tile_row_stride(gu_w.padded_inputs(), elem)),
        ldh(tile_row_stride(d_w.padded_inputs(), elem)),
        kept(ForwardCache::at(cache, S, I, R, act.dtype)) {}

  // gather x: as bf16 rows, or int8 with a scale per row.
  void gather_x() {
    xq = op.scratch_.x_panel_rows.get((S + 32) * ldx * elem);
    xs = int8 ? op.scratch_.x_scales.get(S + 32) : nullptr;
    op.gather_packed(pool, r, act.x, act.dtype, H, ldx, xq, xs);
  }

  // lora xa: xa [S, r] = scaling * x @ A_gu^T.
  void lora_xa() {
    xa = R > 0 ? (kept.xa ? kept.xa : op.scratch_.xa.get(S * R)) : nullptr;
    ha = R > 0 ? (kept.ha ? kept.ha : op.scratch_.ha.get(S * R)) : nullptr;  // kept for backward
    if (R > 0 && !int8) {  // on the gathered bf16 rows (copies of x)
      const bf16* xb = reinterpret_cast<const bf16*>(xq);
      op.for_each_row_chunk(pool, r, kLoraRowChunk, [&](int e, int64_t row0, int rows) {
        op.row_ops().rows_times_bt_bf16(rows, H, xb + row0 * ldx, ldx, lora.gate_up_a + static_cast<int64_t>(e) * R * H,
                                        R, lora.scaling, xa + row0 * R);
      });
    } else if (R > 0) {  // int8 rows: on fp32 rows, as the exact path does
      float* xg = op.scratch_.x_rows.get(S * H);
      op.gather_rows(pool, r, act.x, act.dtype, xg);
      op.for_each_expert(pool, r, [&](int e, int64_t row0, int rows) {
        if (rows == 0) return;
        op.k_->nt(rows, R, H, xg + row0 * H, H, lora.gate_up_a + static_cast<int64_t>(e) * R * H, DType::kF32, H,
                  xa + row0 * R, R, false);
        for (int64_t i = row0 * R; i < (row0 + rows) * R; ++i) xa[i] *= lora.scaling;
      });
    }
  }

  // gate_up + silu: gate and up together (tile pairs), then h = silu(gate) * up, and the cache.
  void gate_up_silu() {
    hb = int8 ? nullptr : reinterpret_cast<bf16*>(op.scratch_.h_panel_rows.get((S + 32) * ldh * 2));
    hf = int8 ? op.scratch_.h.get(S * I) : nullptr;
    const int gu_pairs = gu_w.n_tiles / 2;
    for_each_pair_group(gu_pairs, [&](int e, int64_t row0, int rows, int p0, int p1) {
      for (int m0 = 0; m0 < rows; m0 += kRowChunk) {
        const int mrows = std::min(kRowChunk, rows - m0);
        float* c = panel_buffer(mrows);
        for (int p = p0; p < p1; ++p) {
          const int64_t first = row0 + m0;
          panel(gu_w, xq + first * ldx * elem, ldx, xs ? xs + first : nullptr, e, p, mrows, c);
          const int col0 = p * 16, ncols = std::min(16, I - col0);
          gate_up_pair_epilogue(e, first, mrows, col0, ncols, c);
          if (hb && p == gu_pairs - 1)  // the padding columns the down panels read as zero
            for (int m = 0; m < mrows; ++m)
              std::fill(hb + (first + m) * ldh + col0 + ncols, hb + (first + m) * ldh + ldh, bf16(0));
        }
      }
    });
  }

  // The epilogue of one tile pair's panel c [rows][32] (gate and up columns col0.. of rows first..): LoRA, the
  // cache, h.
  void gate_up_pair_epilogue(int e, int64_t first, int rows, int col0, int ncols, float* c) {
    const float* bt = nullptr;
    if (R > 0) {  // LoRA B rows of this pair's gate and up columns, transposed (r x 32, reused by all rows)
      int64_t rows_of[32];
      for (int n = 0; n < 16; ++n) {
        const bool valid = col0 + n < I;
        rows_of[n] = valid ? static_cast<int64_t>(e) * I2 + col0 + n : -1;
        rows_of[16 + n] = valid ? static_cast<int64_t>(e) * I2 + I + col0 + n : -1;
      }
      bt = lora_slice(lora.gate_up_b, R, rows_of);
    }
    const int64_t ld_lo = ForwardCache::lo_stride(I);
    op.row_ops().gate_up_epilogue(
        rows, ncols, c, R > 0 ? xa + first * R : nullptr, R, bt, kept.gu ? kept.gu + first * I2 + col0 : nullptr,
        kept.gu_hi ? kept.gu_hi + first * I2 + col0 : nullptr, kept.gu_lo ? kept.gu_lo + first * ld_lo + col0 : nullptr,
        I2, ld_lo, I, hb ? hb + first * ldh + col0 : nullptr, ldh, hf ? hf + first * I + col0 : nullptr, I);
  }

  // lora ha, int8 h: h as int8 rows for int8 panels; ha [S, r] = scaling * h @ A_d^T.
  void lora_ha_int8_h() {
    h_rows = reinterpret_cast<const uint8_t*>(hb);
    if (int8) {  // per-row scales of h need whole rows: a second quantization pass
      uint8_t* hq = op.scratch_.h_panel_rows.get((S + 32) * ldh);
      hs = op.scratch_.h_scales.get(S + 32);
      Routing identity;  // rows in place: row i reads h row i
      identity.row_token.resize(S);
      for (int64_t i = 0; i < S; ++i) identity.row_token[i] = static_cast<int32_t>(i);
      identity.offsets = {0, S};
      op.gather_packed(pool, identity, hf, DType::kF32, I, ldh, hq, hs);
      h_rows = hq;
    }
    if (R > 0 && hb) {  // on the bf16 rows the down projection reads
      op.for_each_row_chunk(pool, r, kLoraRowChunk, [&](int e, int64_t row0, int rows) {
        op.row_ops().rows_times_bt_bf16(rows, I, hb + row0 * ldh, ldh, lora.down_a + static_cast<int64_t>(e) * R * I, R,
                                        lora.scaling, ha + row0 * R);
      });
    } else if (R > 0) {
      op.for_each_expert(pool, r, [&](int e, int64_t row0, int rows) {
        if (rows == 0) return;
        op.k_->nt(rows, R, I, hf + row0 * I, I, lora.down_a + static_cast<int64_t>(e) * R * I, DType::kF32, I,
                  ha + row0 * R, R, false);
        for (int64_t i = row0 * R; i < (row0 + rows) * R; ++i) ha[i] *= lora.scaling;
      });
    }
  }

  // down: out [S, H], bf16 for bf16 activations (as a bf16 graph rounds each expert's output; half the bytes
  // written here and read by the combine, S * H * 2 = 134 MB less for a Qwen3-30B-A3B layer at T=4096), fp32
  // otherwise.
  void down() {
    const bool out_bf16 = act.dtype == DType::kBF16;
    out = out_bf16 ? nullptr : op.scratch_.out_rows.get(S * H);
    out16 = out_bf16 ? op.scratch_.out_rows16.get(S * H) : nullptr;
    for_each_pair_group(d_w.n_tiles / 2, [&](int e, int64_t row0, int rows, int p0, int p1) {
      for (int m0 = 0; m0 < rows; m0 += kRowChunk) {
        const int mrows = std::min(kRowChunk, rows - m0);
        float* c = panel_buffer(mrows);
        for (int p = p0; p < p1; ++p) {
          const int64_t first = row0 + m0;
          panel(d_w, h_rows + first * ldh * elem, ldh, hs ? hs + first : nullptr, e, p, mrows, c);
          const int col0 = p * 32, ncols = std::min(32, H - col0);
          const float* bt = nullptr;
          if (R > 0) {
            int64_t rows_of[32];
            for (int n = 0; n < 32; ++n) rows_of[n] = n < ncols ? static_cast<int64_t>(e) * H + col0 + n : -1;
            bt = lora_slice(lora.down_b, R, rows_of);
          }
          op.row_ops().down_epilogue(mrows, ncols, c, R > 0 ? ha + first * R : nullptr, R, bt,
                                     out ? out + first * H + col0 : nullptr, out16 ? out16 + first * H + col0 : nullptr,
                                     H);
        }
      }
    });
  }

  // combine
  void combine(void* y) {
    if (out16)
      op.combine_bf16_rows(pool, r, out16, act.w, static_cast<bf16*>(y));
    else
      op.combine(pool, r, out, act.w, act.dtype, y);
  }

  // Panel on rows [row0, row0 + rows) of an activation buffer against packed tile pair (b0, b1).
  void panel(const PackedTensor& w, const uint8_t* a, int lda, const float* a_scale, int e, int pair, int rows,
             float* c) const {
    const uint8_t* b0 = w.tile(e, 2 * pair);
    const uint8_t* b1 = w.tile(e, 2 * pair + 1);
    const PackedKernels& pk = *op.pk_;
    if (w.format == PackedFormat::kFP8)
      pk.fp8_panel(rows, static_cast<int>(w.segments.size()), w.segments.data(), reinterpret_cast<const bf16*>(a), lda,
                   b0, b1, w.fp8_scales(e, 2 * pair), w.fp8_scales(e, 2 * pair + 1), c);
    else if (int4)
      pk.int4_panel(rows, w.k_blocks, reinterpret_cast<const int8_t*>(a), lda, a_scale, b0, b1,
                    w.group_scales(e, 2 * pair), w.group_scale_zeros(e, 2 * pair), c);
    else if (int8)
      pk.int8_panel(rows, w.k_blocks, reinterpret_cast<const int8_t*>(a), lda, a_scale,
                    reinterpret_cast<const int8_t*>(b0), reinterpret_cast<const int8_t*>(b1), w.scales(e, 2 * pair),
                    w.colsums(e, 2 * pair), c);
    else
      pk.bf16_panel(rows, w.k_blocks, reinterpret_cast<const bf16*>(a), lda, reinterpret_cast<const bf16*>(b0),
                    reinterpret_cast<const bf16*>(b1), c);
  }

  // Tasks over (expert, group of tile pairs) for every expert with rows.
  void for_each_pair_group(int pairs, const std::function<void(int, int64_t, int, int, int)>& fn) const {
    struct Task {
      int e, p0;
    };
    std::vector<Task> tasks;
    for (int e = 0; e < op.w_.num_experts; ++e) {
      const int64_t rows = r.rows(e);
      if (rows == 0) continue;
      for (int p = 0; p < pairs; p += pairs_per_task(rows)) tasks.push_back({e, p});
    }
    pool.parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t i) {
      const Task t = tasks[i];
      const int rows = static_cast<int>(r.rows(t.e));
      fn(t.e, r.offsets[t.e], rows, t.p0, std::min(pairs, t.p0 + pairs_per_task(rows)));
    });
  }
};

void ExpertsOp::forward_packed(ThreadPool& pool, const Routing& r, const Activations& act, const LoraFactors& lora,
                               void* y, float* cache) {
  PackedForward call(*this, pool, r, act, lora, cache);
  PhaseLaps laps("forward");
  call.gather_x();
  laps.mark("gather x");
  call.lora_xa();
  laps.mark("lora xa");
  call.gate_up_silu();
  laps.mark("gate_up + silu");
  call.lora_ha_int8_h();
  laps.mark("lora ha, int8 h");
  call.down();
  laps.mark("down");
  call.combine(y);
  laps.mark("combine");
}

void ExpertsOp::combine_bf16_rows(ThreadPool& pool, const Routing& r, const bf16* rows, const float* scale,
                                  bf16* out) const {
  const int H = w_.hidden, K = r.top_k;
  const int64_t T = r.num_tokens;
  pool.parallel_for((T + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task) {
    if (t_row.size() < static_cast<size_t>(H)) t_row.resize(H);
    float* acc = t_row.data();
    const int64_t end = std::min(T, (task + 1) * kRowsPerTask);
    for (int64_t tok = task * kRowsPerTask; tok < end; ++tok) {
      std::fill(acc, acc + H, 0.f);
      for (int k = 0; k < K; ++k) {  // in slot order, as combine: the same sums whatever the thread count
        const int64_t slot = tok * K + k;
        const int64_t row = r.slot_row[slot];
        if (row >= 0) row_ops().add_scaled_bf16_row(H, scale ? scale[slot] : 1.f, rows + row * H, acc);
      }
      row_ops().f32_to_bf16_row(acc, H, out + tok * H);
    }
  });
}

void ExpertsOp::project_columns_packed(ThreadPool& pool, const Routing& r, const bf16* a, int lda, bool gate_up,
                                       float* c, bf16* c16, AlignedBuffer& columns, const float* p, int R,
                                       const float* lora_a) {
  const bool fp8 = w_.dtype == DType::kFP8E4M3;
  const int K = gate_up ? 2 * w_.intermediate : w_.hidden, N = gate_up ? w_.hidden : w_.intermediate;
  // fp8: W's rows (the inputs here) cut at its block rows, gate_up's up rows apart from its gate rows.
  const std::vector<Fp8Segment> segments =
      fp8 ? fp8_segments(K, w_.block_rows, gate_up ? w_.intermediate : 0) : std::vector<Fp8Segment>();
  const int nseg = static_cast<int>(segments.size());
  const int k_blocks = fp8 ? segments.back().kb1 : (K + 31) / 32;
  const int col_blocks = (N + 31) / 32;
  const int64_t block_bytes = static_cast<int64_t>(k_blocks) * 2 * (fp8 ? kTileBytes / 2 : kTileBytes);
  const int64_t blocks = static_cast<int64_t>(w_.num_experts) * col_blocks;
  const size_t copy_bytes = static_cast<size_t>(blocks * block_bytes);
  // The column blocks are read from the forward's tiles of W (the weights themselves may be released): W's row r
  // is an output there, at `rows[r]` (elements for bf16, bytes for fp8) from its expert's first n-tile column.
  const PackedTensor& fwd = gate_up ? packed_gate_up_ : packed_down_;
  constexpr int64_t tile_elems = 512;  // elements of a tile: bf16 (1 KB) and fp8 (512 bytes) alike
  const int64_t tile_column = static_cast<int64_t>(fwd.k_blocks) * tile_elems;
  std::vector<int64_t> rows(static_cast<size_t>(k_blocks) * 32, -1);
  for (int r = 0; r < K; ++r) {
    const int half = r >= w_.intermediate ? 1 : 0, within = gate_up ? r - half * w_.intermediate : r;
    const int nt = gate_up ? 2 * (within / kTileRows) + half : r / kTileRows;  // gate_up: gate / up tiles alternate
    rows[r] = nt * tile_column + 2 * (within % kTileRows);
  }
  const int64_t expert_elems = static_cast<int64_t>(fwd.n_tiles) * tile_column;
  // fp8: byte offset, within an expert's tile column, of each of a block's 32 columns (inputs of the forward, cut
  // into the forward's segments at its block columns), -1 past N.
  auto fp8_cols = [&](int col0, int64_t* cols) {
    for (int c = 0; c < 32; ++c) cols[c] = col0 + c < N ? fwd.input_offset(col0 + c) : -1;
  };
  // One column block [col0, col0 + 32) of expert e into dst (fp8: and its scales into s0 / s1, when given).
  auto pack_block = [&](int e, int col0, uint8_t* dst, float* s0, float* s1) {
    if (fp8) {
      int64_t cols[32];
      fp8_cols(col0, cols);
      row_ops().pack_columns_fp8(fp8_view(gate_up, e, 0, 0), col0, segments, fwd.data.data() + e * expert_elems,
                                 rows.data(), cols, dst, s0, s1);
    } else if (dst) {
      const bf16* tiles = reinterpret_cast<const bf16*>(fwd.data.data()) + e * expert_elems + col0 / 32 * tile_elems;
      pk_->pack_columns_bf16(tiles, rows.data(), k_blocks, reinterpret_cast<bf16*>(dst));
    }
  };
  bool keep = columns.size() != 0;
  if (!keep) {  // forced always / never, or by default when the copy takes under a quarter of the free memory
    const std::optional<bool> forced = backward_weight_cache();
    const long pages = sysconf(_SC_AVPHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    const double free_bytes = pages > 0 && page > 0 ? static_cast<double>(pages) * page : 0.0;
    keep = forced ? *forced : static_cast<double>(copy_bytes) * 4 < free_bytes;
  }
  if (keep && columns.size() == 0) {  // once: every expert's column blocks, in parallel
    AlignedBuffer made(copy_bytes);
    pool.parallel_for(blocks, [&](int64_t i) {
      pack_block(static_cast<int>(i / col_blocks), static_cast<int>(i % col_blocks) * 32, made.data() + i * block_bytes,
                 nullptr, nullptr);
    });
    columns = std::move(made);
  }
  const uint8_t* kept = keep ? columns.data() : nullptr;
  // Tasks over (expert, group of column blocks), as the forward's: a chunk of activation rows stays in L2
  // while the task walks its column blocks, instead of being streamed again for every 32 columns.
  struct Task {
    int e, b0;
  };
  std::vector<Task> tasks;
  for (int e = 0; e < w_.num_experts; ++e) {
    const int64_t rows = r.rows(e);
    if (rows == 0) continue;
    for (int b = 0; b < col_blocks; b += pairs_per_task(rows)) tasks.push_back({e, b});
  }
  pool.parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t i) {
    const Task t = tasks[i];
    const int64_t row0 = r.offsets[t.e];
    const int rows = static_cast<int>(r.rows(t.e));
    const int b1 = std::min(col_blocks, t.b0 + pairs_per_task(rows));
    const uint8_t* tiles;
    if (kept) {
      tiles = kept + (static_cast<int64_t>(t.e) * col_blocks + t.b0) * block_bytes;
    } else {
      const size_t need = static_cast<size_t>(block_bytes) * (b1 - t.b0);
      if (t_column_bytes.size() < need) t_column_bytes.resize(need);
      tiles = t_column_bytes.data();
    }
    // fp8: the scales of each block's two tiles and segments, [b - b0][2][nseg] (made per task, from W's scales).
    float* scales = nullptr;
    if (fp8) {
      const size_t need = static_cast<size_t>(2 * nseg) * (b1 - t.b0);
      if (t_fp8_scales.size() < need) t_fp8_scales.resize(need);
      scales = t_fp8_scales.data();
    }
    for (int b = t.b0; b < b1; ++b) {
      uint8_t* dst = kept ? nullptr : t_column_bytes.data() + (b - t.b0) * block_bytes;
      float* s0 = fp8 ? scales + static_cast<int64_t>(b - t.b0) * 2 * nseg : nullptr;
      pack_block(t.e, b * 32, dst, s0, fp8 ? s0 + nseg : nullptr);
    }
    // LoRA: c += p[row] . A[e][:, cols], A [E][R][N]; its slices transposed once per task.
    float* bts = nullptr;
    if (R > 0) {
      const size_t need = static_cast<size_t>(R) * 32 * (b1 - t.b0);
      if (t_lora_b.size() < need) t_lora_b.resize(need);
      bts = t_lora_b.data();
      const float* ae = lora_a + static_cast<int64_t>(t.e) * R * N;
      for (int b = t.b0; b < b1; ++b)
        for (int j = 0; j < R; ++j)
          for (int n = 0; n < 32; ++n)
            bts[((b - t.b0) * R + j) * 32 + n] = b * 32 + n < N ? ae[static_cast<int64_t>(j) * N + b * 32 + n] : 0.f;
    }
    for (int m0 = 0; m0 < rows; m0 += kRowChunk) {
      const int mrows = std::min(kRowChunk, rows - m0);
      float* panel = panel_buffer(mrows);
      const int64_t first = row0 + m0;
      for (int b = t.b0; b < b1; ++b) {
        const uint8_t* bt = tiles + (b - t.b0) * block_bytes;
        const uint8_t* bt1 = bt + block_bytes / 2;
        if (fp8) {
          const float* s0 = scales + static_cast<int64_t>(b - t.b0) * 2 * nseg;
          pk_->fp8_panel(mrows, nseg, segments.data(), a + first * lda, lda, bt, bt1, s0, s0 + nseg, panel);
        } else {
          pk_->bf16_panel(mrows, k_blocks, a + first * lda, lda, reinterpret_cast<const bf16*>(bt),
                          reinterpret_cast<const bf16*>(bt1), panel);
        }
        const int col0 = b * 32, ncols = std::min(32, N - col0);
        row_ops().down_epilogue(mrows, ncols, panel, R > 0 ? p + first * R : nullptr, R,
                                R > 0 ? bts + (b - t.b0) * R * 32 : nullptr, c ? c + first * N + col0 : nullptr,
                                c ? nullptr : c16 + first * N + col0, N);
      }
    }
  });
}

}  // namespace kt

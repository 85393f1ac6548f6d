// ExpertsOp on packed weights: packing at load, the fused forward, and the backward's projections.
//
// Forward, per layer: gather rows as bf16 (or int8 + row scale) -> one pass over (expert, gate/up pair
// group) computing gate and up columns together and writing h = silu(gate) * up (+ the cache for backward)
// -> one pass over (expert, down column group) -> combine. Every expert of the layer is in each pass, so a
// pass is one pool job however the tokens are routed.
#include <algorithm>
#include <cmath>

#include "experts_op.h"

namespace kt {
namespace {

constexpr int kRowChunk = 128;  // activation rows kept in L2 while a task walks its weight pairs
constexpr int64_t kRowsPerTask = 32;

inline float silu(float g) { return g / (1.f + std::exp(-g)); }

inline float dot(const float* a, const float* b, int n) {
  float s = 0.f;
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Tile pairs per task: few rows stream weights (small tasks spread them over all threads); many rows want
// the activation chunk reused across several pairs.
inline int pairs_per_task(int64_t rows_per_expert) { return rows_per_expert >= 64 ? 4 : 1; }

thread_local std::vector<float> t_panel;
thread_local std::vector<bf16> t_columns;

float* panel_buffer(int rows) {
  const size_t n = static_cast<size_t>((rows + 31) / 32 * 32) * 32;
  if (t_panel.size() < n) t_panel.resize(n);
  return t_panel.data();
}

}  // namespace

bool ExpertsOp::packed_forward(DType act) const {
  if (!pk_ || packed_gate_up_.data.size() == 0) return false;
  return pk_->format == PackedFormat::kInt8 || act == DType::kBF16;
}

bool ExpertsOp::packed_backward(DType act) const {
  return pk_ && pk_->format == PackedFormat::kBF16 && pk_->pack_columns_bf16 && w_.dtype == DType::kBF16 &&
         act == DType::kBF16;
}

void ExpertsOp::pack(ThreadPool& pool) {
  // bf16 packing of fp32 weights would round them: fp32 layers keep the exact path.
  if (!pk_ || (pk_->format == PackedFormat::kBF16 && w_.dtype != DType::kBF16)) return;
  const int E = w_.num_experts, H = w_.hidden, I = w_.intermediate;
  packed_gate_up_ = pack_tensor(pool, w_.gate_up, w_.dtype, E, 2 * I, H, pk_->format, true);
  packed_down_ = pack_tensor(pool, w_.down, w_.dtype, E, H, I, pk_->format, false);
}

void ExpertsOp::gather_packed(ThreadPool& pool, const Routing& r, const void* src, DType t, int cols, int width,
                              uint8_t* dst, float* scales) const {
  const int64_t S = r.num_rows();
  const bool int8 = scales != nullptr;
  pool.parallel_for((S + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task) {
    std::vector<float> row_f32(cols);
    const int64_t end = std::min(S, (task + 1) * kRowsPerTask);
    for (int64_t row = task * kRowsPerTask; row < end; ++row) {
      const int64_t offset = static_cast<int64_t>(r.row_token[row]) * cols;
      for (int i = 0; i < cols; ++i)
        row_f32[i] = t == DType::kF32 ? static_cast<const float*>(src)[offset + i]
                                      : bf16_to_f32(static_cast<const bf16*>(src)[offset + i]);
      if (!int8) {
        bf16* d = reinterpret_cast<bf16*>(dst) + row * width;
        for (int i = 0; i < cols; ++i) d[i] = f32_to_bf16(row_f32[i]);
        std::fill(d + cols, d + width, bf16(0));
        continue;
      }
      // Symmetric per-row int8: the row's largest magnitude maps to 127.
      float amax = 0.f;
      for (int i = 0; i < cols; ++i) amax = std::max(amax, std::fabs(row_f32[i]));
      const float scale = amax > 0.f ? amax / 127.f : 1.f;
      int8_t* d = reinterpret_cast<int8_t*>(dst) + row * width;
      for (int i = 0; i < cols; ++i)
        d[i] = static_cast<int8_t>(std::clamp(std::nearbyint(row_f32[i] / scale), -127.f, 127.f));
      std::fill(d + cols, d + width, int8_t(0));
      scales[row] = scale;
    }
  });
}

void ExpertsOp::forward_packed(ThreadPool& pool, const Routing& r, const Activations& act, const LoraFactors& lora,
                               void* y, float* cache) {
  const int H = w_.hidden, I = w_.intermediate, I2 = 2 * I, R = lora.rank;
  const int64_t S = r.num_rows();
  const bool int8 = pk_->format == PackedFormat::kInt8;
  const int elem = int8 ? 1 : 2;
  const PackedTensor& gu_w = packed_gate_up_;
  const PackedTensor& d_w = packed_down_;
  const int Hp = gu_w.padded_inputs(), Ip = d_w.padded_inputs();

  uint8_t* xq = scratch_bytes(0, (S + 32) * Hp * elem);  // [S + 32, Hp] bf16 or int8
  float* xs = int8 ? scratch_scales(0, S + 32) : nullptr;
  gather_packed(pool, r, act.x, act.dtype, H, Hp, xq, xs);
  float* xa = nullptr;
  float* ha = R > 0 ? scratch(5, S * R) : nullptr;
  if (R > 0) {  // xa [S, r] = scaling * x @ A_gu^T on fp32 rows, as the exact path does
    float* xg = scratch(0, S * H);
    gather_rows(pool, r, act.x, act.dtype, xg);
    xa = cache ? cache + S * I2 : scratch(4, S * R);
    for_each_expert(pool, r, [&](int e, int64_t row0, int rows) {
      if (rows == 0) return;
      k_->nt(rows, R, H, xg + row0 * H, H, lora.gate_up_a + static_cast<int64_t>(e) * R * H, DType::kF32, H,
             xa + row0 * R, R, false);
      for (int64_t i = row0 * R; i < (row0 + rows) * R; ++i) xa[i] *= lora.scaling;
    });
  }
  // h: bf16 rows for the bf16 down projection; fp32 when int8 re-quantizes it or LoRA reads it.
  bf16* hb = int8 ? nullptr : reinterpret_cast<bf16*>(scratch_bytes(1, (S + 32) * Ip * 2));
  float* hf = int8 || R > 0 ? scratch(2, S * I) : nullptr;

  // Panel on rows [row0, row0 + rows) of an activation buffer against packed tile pair (b0, b1).
  auto panel = [&](const PackedTensor& w, const uint8_t* a, int lda, const float* a_scale, int e, int pair,
                   int rows, float* c) {
    const uint8_t* b0 = w.tile(e, 2 * pair);
    const uint8_t* b1 = w.tile(e, 2 * pair + 1);
    if (int8)
      pk_->int8_panel(rows, w.k_blocks, reinterpret_cast<const int8_t*>(a), lda, a_scale,
                      reinterpret_cast<const int8_t*>(b0), reinterpret_cast<const int8_t*>(b1), w.scales(e, 2 * pair),
                      w.colsums(e, 2 * pair), c);
    else
      pk_->bf16_panel(rows, w.k_blocks, reinterpret_cast<const bf16*>(a), lda, reinterpret_cast<const bf16*>(b0),
                      reinterpret_cast<const bf16*>(b1), c);
  };
  // Tasks over (expert, group of tile pairs) for every expert with rows.
  auto for_each_pair_group = [&](int pairs, const std::function<void(int, int64_t, int, int, int)>& fn) {
    struct Task {
      int e, p0;
    };
    std::vector<Task> tasks;
    for (int e = 0; e < w_.num_experts; ++e) {
      const int64_t rows = r.rows(e);
      if (rows == 0) continue;
      for (int p = 0; p < pairs; p += pairs_per_task(rows)) tasks.push_back({e, p});
    }
    pool.parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t i) {
      const Task t = tasks[i];
      const int rows = static_cast<int>(r.rows(t.e));
      fn(t.e, r.offsets[t.e], rows, t.p0, std::min(pairs, t.p0 + pairs_per_task(rows)));
    });
  };

  // Pass 1: gate and up together, then h = silu(gate) * up.
  const int gu_pairs = gu_w.n_tiles / 2;
  for_each_pair_group(gu_pairs, [&](int e, int64_t row0, int rows, int p0, int p1) {
    for (int m0 = 0; m0 < rows; m0 += kRowChunk) {
      const int mrows = std::min(kRowChunk, rows - m0);
      float* c = panel_buffer(mrows);
      for (int p = p0; p < p1; ++p) {
        const int64_t first = row0 + m0;
        panel(gu_w, xq + first * Hp * elem, Hp, xs ? xs + first : nullptr, e, p, mrows, c);
        const int col0 = p * 16, ncols = std::min(16, I - col0);
        for (int m = 0; m < mrows; ++m) {
          const int64_t row = first + m;
          const float* cm = c + m * 32;
          for (int n = 0; n < ncols; ++n) {
            const int col = col0 + n;
            float g = cm[n], u = cm[16 + n];
            if (R > 0) {
              const float* b = lora.gate_up_b + (static_cast<int64_t>(e) * I2 + col) * R;
              g += dot(xa + row * R, b, R);
              u += dot(xa + row * R, b + static_cast<int64_t>(I) * R, R);
            }
            if (cache) {
              cache[row * I2 + col] = g;
              cache[row * I2 + I + col] = u;
            }
            const float h = silu(g) * u;
            if (hb) hb[row * Ip + col] = f32_to_bf16(h);
            if (hf) hf[row * I + col] = h;
          }
          if (hb && p == gu_pairs - 1)  // the padding columns the down panels read as zero
            std::fill(hb + row * Ip + col0 + ncols, hb + row * Ip + Ip, bf16(0));
        }
      }
    }
  });

  const uint8_t* ha_rows = reinterpret_cast<const uint8_t*>(hb);
  float* hs = nullptr;
  if (int8) {  // per-row scales of h need whole rows: a second quantization pass
    uint8_t* hq = scratch_bytes(1, (S + 32) * Ip);
    hs = scratch_scales(1, S + 32);
    Routing identity;  // rows in place: row i reads h row i
    identity.row_token.resize(S);
    for (int64_t i = 0; i < S; ++i) identity.row_token[i] = static_cast<int32_t>(i);
    identity.offsets = {0, S};
    gather_packed(pool, identity, hf, DType::kF32, I, Ip, hq, hs);
    ha_rows = hq;
  }
  if (R > 0) {  // ha [S, r] = scaling * h @ A_d^T
    for_each_expert(pool, r, [&](int e, int64_t row0, int rows) {
      if (rows == 0) return;
      k_->nt(rows, R, I, hf + row0 * I, I, lora.down_a + static_cast<int64_t>(e) * R * I, DType::kF32, I,
             ha + row0 * R, R, false);
      for (int64_t i = row0 * R; i < (row0 + rows) * R; ++i) ha[i] *= lora.scaling;
    });
  }

  // Pass 2: down, out [S, H].
  float* out = scratch(3, S * H);
  for_each_pair_group(d_w.n_tiles / 2, [&](int e, int64_t row0, int rows, int p0, int p1) {
    for (int m0 = 0; m0 < rows; m0 += kRowChunk) {
      const int mrows = std::min(kRowChunk, rows - m0);
      float* c = panel_buffer(mrows);
      for (int p = p0; p < p1; ++p) {
        const int64_t first = row0 + m0;
        panel(d_w, ha_rows + first * Ip * elem, Ip, hs ? hs + first : nullptr, e, p, mrows, c);
        const int col0 = p * 32, ncols = std::min(32, H - col0);
        for (int m = 0; m < mrows; ++m) {
          const int64_t row = first + m;
          float* o = out + row * H + col0;
          std::copy(c + m * 32, c + m * 32 + ncols, o);
          if (R > 0)
            for (int n = 0; n < ncols; ++n)
              o[n] += dot(ha + row * R, lora.down_b + (static_cast<int64_t>(e) * H + col0 + n) * R, R);
        }
      }
    }
  });
  combine(pool, r, out, act.w, act.dtype, y);
}

void ExpertsOp::project_columns_packed(ThreadPool& pool, const Routing& r, const bf16* a, int lda, const bf16* w,
                                       int K, int N, float* c) {
  const int k_blocks = (K + 31) / 32;
  const int col_blocks = (N + 31) / 32;
  struct Task {
    int e, block;
  };
  std::vector<Task> tasks;
  for (int e = 0; e < w_.num_experts; ++e)
    if (r.rows(e) > 0)
      for (int b = 0; b < col_blocks; ++b) tasks.push_back({e, b});
  pool.parallel_for(static_cast<int64_t>(tasks.size()), [&](int64_t i) {
    const Task t = tasks[i];
    const int64_t row0 = r.offsets[t.e];
    const int rows = static_cast<int>(r.rows(t.e));
    const int col0 = t.block * 32, ncols = std::min(32, N - col0);
    if (t_columns.size() < static_cast<size_t>(k_blocks) * 1024) t_columns.resize(static_cast<size_t>(k_blocks) * 1024);
    bf16* tiles = t_columns.data();
    pk_->pack_columns_bf16(w + static_cast<int64_t>(t.e) * K * N, N, K, N, col0, k_blocks, tiles);
    for (int m0 = 0; m0 < rows; m0 += kRowChunk) {
      const int mrows = std::min(kRowChunk, rows - m0);
      float* panel = panel_buffer(mrows);
      pk_->bf16_panel(mrows, k_blocks, a + (row0 + m0) * lda, lda, tiles, tiles + static_cast<int64_t>(k_blocks) * 512,
                      panel);
      for (int m = 0; m < mrows; ++m)
        std::copy(panel + m * 32, panel + m * 32 + ncols, c + (row0 + m0 + m) * N + col0);
    }
  });
}

}  // namespace kt

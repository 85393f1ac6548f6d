// ExpertsOp: shared pieces (gather, gate_up, activation, down, combine, work split) and the forward.
#include "experts_op.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

namespace kt {
namespace {

// Columns per task: small enough to spread one expert over many threads, large enough that the
// weight block (64 rows x H) is reused from cache across all of the expert's rows.
constexpr int kColumnBlock = 64;
constexpr int64_t kRowsPerTask = 32;

inline float silu(float g) { return g / (1.f + std::exp(-g)); }

}  // namespace

ExpertsOp::ExpertsOp(const ExpertWeights& weights, const GemmKernels* kernels, const PackedKernels* packed,
                     const Fp8Kernels* fp8)
    : w_(weights), k_(kernels), pk_(packed), fp8_(fp8) {
  if (w_.num_experts <= 0 || w_.hidden <= 0 || w_.intermediate <= 0)
    throw std::invalid_argument("experts: num_experts, hidden and intermediate must be positive");
  if (!w_.gate_up || !w_.down) throw std::invalid_argument("experts: null weight pointer");
  if (w_.dtype == DType::kFP8E4M3) {
    if (pk_ && pk_->format != PackedFormat::kBF16)
      throw std::invalid_argument(std::string("experts: kernel '") + pk_->name +
                                  "' takes no fp8 weights (dtype float8_e4m3fn): it quantizes bf16 weights to int8 / "
                                  "int4 at load; use an fp8 kernel (kt_core.kernels.fp8_kernels()) or bf16 weights");
    if (!fp8_)
      throw std::invalid_argument(std::string("experts: kernel '") + (pk_ ? pk_->name : k_->name) +
                                  "' takes no fp8 weights (dtype float8_e4m3fn); use an fp8 kernel "
                                  "(kt_core.kernels.fp8_kernels()) or bf16 weights");
    if (!w_.gate_up_scale || !w_.down_scale)
      throw std::invalid_argument(
          "experts: fp8 weights need their block scales (gate_up_proj_scale_inv, "
          "down_proj_scale_inv)");
    if (w_.block_rows <= 0 || w_.block_cols <= 0)
      throw std::invalid_argument("experts: the fp8 block size must be positive, got " + std::to_string(w_.block_rows) +
                                  " x " + std::to_string(w_.block_cols));
  }
}

void ExpertsOp::require_weights(const char* what) const {
  if (weights_released())
    throw std::logic_error(std::string("experts: ") + what +
                           " reads the expert weights, which were released once packed (forward only: "
                           "KTExperts.release_host_weights); keep them to train or to run fp32 activations");
}

const void* ExpertsOp::weight_element(const void* base, int64_t i) const {
  switch (w_.dtype) {
    case DType::kF32: return static_cast<const float*>(base) + i;
    case DType::kBF16: return static_cast<const bf16*>(base) + i;
    default: return static_cast<const uint8_t*>(base) + i;
  }
}

Fp8View ExpertsOp::fp8_view(bool gate_up, int e, int row0, int col0) const {
  const int64_t rows = gate_up ? 2 * w_.intermediate : w_.hidden, cols = gate_up ? w_.hidden : w_.intermediate;
  // gate_up: gate's block rows, then up's (gate_up_proj_scale_inv [E, 2 ceil(I / block_rows), ...]).
  const int64_t scale_rows = gate_up ? 2 * ((w_.intermediate + w_.block_rows - 1) / w_.block_rows)
                                     : (rows + w_.block_rows - 1) / w_.block_rows;
  const int64_t scale_cols = (cols + w_.block_cols - 1) / w_.block_cols;
  Fp8View v;
  const void* q = gate_up ? w_.gate_up : w_.down;  // null once released: the packed backward reads only the scales
  v.q = q ? static_cast<const uint8_t*>(q) + e * rows * cols : nullptr;
  v.scale = (gate_up ? w_.gate_up_scale : w_.down_scale) + e * scale_rows * scale_cols;
  v.ld = static_cast<int>(cols);
  v.ld_scale = static_cast<int>(scale_cols);
  v.block_rows = w_.block_rows;
  v.block_cols = w_.block_cols;
  v.row0 = row0;
  v.col0 = col0;
  v.split = gate_up ? w_.intermediate : 0;
  return v;
}

const void* ExpertsOp::gate_up_weights(int e, int row) const {
  return weight_element(w_.gate_up, (static_cast<int64_t>(e) * 2 * w_.intermediate + row) * w_.hidden);
}

const void* ExpertsOp::down_weights(int e, int row) const {
  return weight_element(w_.down, (static_cast<int64_t>(e) * w_.hidden + row) * w_.intermediate);
}

bool ExpertsOp::use_bf16_dot(DType act) const {
  // Only when the activations are bf16 already: rounding fp32 activations would cost accuracy.
  return k_->nt_bf16 != nullptr && w_.dtype == DType::kBF16 && act == DType::kBF16;
}

void ExpertsOp::project(bool bf16_dot, bool gate_up, int e, int row0, int rows, int cols, const float* a,
                        const bf16* a_bf16, float* c, int ldc) const {
  const int in = gate_up ? w_.hidden : w_.intermediate;
  if (w_.dtype == DType::kFP8E4M3) return fp8_->nt(rows, cols, in, a, in, fp8_view(gate_up, e, row0, 0), c, ldc, false);
  const void* w = gate_up ? gate_up_weights(e, row0) : down_weights(e, row0);
  if (bf16_dot)
    k_->nt_bf16(rows, cols, in, a_bf16, in, static_cast<const bf16*>(w), in, c, ldc, false);
  else
    k_->nt(rows, cols, in, a, in, w, w_.dtype, in, c, ldc, false);
}

void ExpertsOp::project_back(bool gate_up, int e, int col0, int rows, int cols, const float* a, int lda, float* c,
                             int ldc) const {
  const int K = gate_up ? 2 * w_.intermediate : w_.hidden, N = gate_up ? w_.hidden : w_.intermediate;
  if (w_.dtype == DType::kFP8E4M3) return fp8_->nn(rows, cols, K, a, lda, fp8_view(gate_up, e, 0, col0), c, ldc, false);
  const void* w_cols = weight_element(gate_up ? w_.gate_up : w_.down, static_cast<int64_t>(e) * K * N + col0);
  k_->nn(rows, cols, K, a, lda, w_cols, w_.dtype, N, c, ldc, false);
}

void ExpertsOp::for_each_block(ThreadPool& pool, const Routing& r, int cols,
                               const std::function<void(int, int64_t, int, int, int)>& fn) const {
  struct Block {
    int e, col0;
  };
  std::vector<Block> blocks;
  for (int e = 0; e < w_.num_experts; ++e)
    if (r.rows(e) > 0)
      for (int c = 0; c < cols; c += kColumnBlock) blocks.push_back({e, c});
  pool.parallel_for(static_cast<int64_t>(blocks.size()), [&](int64_t i) {
    const Block b = blocks[i];
    fn(b.e, r.offsets[b.e], static_cast<int>(r.rows(b.e)), b.col0, std::min(kColumnBlock, cols - b.col0));
  });
}

void ExpertsOp::for_each_expert(ThreadPool& pool, const Routing& r,
                                const std::function<void(int, int64_t, int)>& fn) const {
  pool.parallel_for(w_.num_experts, [&](int64_t e) {
    fn(static_cast<int>(e), r.offsets[e], static_cast<int>(r.rows(static_cast<int>(e))));
  });
}

void ExpertsOp::for_each_row_chunk(ThreadPool& pool, const Routing& r, int64_t chunk,
                                   const std::function<void(int, int64_t, int)>& fn) const {
  struct Chunk {
    int e;
    int64_t row0;
    int rows;
  };
  std::vector<Chunk> chunks;
  for (int e = 0; e < w_.num_experts; ++e)
    for (int64_t m = r.offsets[e]; m < r.offsets[e + 1]; m += chunk)
      chunks.push_back({e, m, static_cast<int>(std::min<int64_t>(chunk, r.offsets[e + 1] - m))});
  pool.parallel_for(static_cast<int64_t>(chunks.size()), [&](int64_t i) {
    const Chunk c = chunks[i];
    fn(c.e, c.row0, c.rows);
  });
}

// The same encoding as packed_avx512's store_split / load_split (gemm_packed_avx512.cpp): the bit pattern plus
// half a unit of bit 8, its bits 16-31 and 8-15.
void ExpertsOp::split_pre_activations(ThreadPool& pool, int64_t S, const float* gu, const ForwardCache& cache) const {
  const int I2 = 2 * w_.intermediate;
  const int64_t ld_lo = ForwardCache::lo_stride(w_.intermediate);
  pool.parallel_for((S + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task) {
    const int64_t end = std::min(S, (task + 1) * kRowsPerTask);
    for (int64_t row = task * kRowsPerTask; row < end; ++row)
      for (int i = 0; i < I2; ++i) {
        uint32_t bits;
        std::memcpy(&bits, gu + row * I2 + i, 4);
        bits += 0x80;
        cache.gu_hi[row * I2 + i] = static_cast<bf16>(bits >> 16);
        cache.gu_lo[row * ld_lo + i] = static_cast<uint8_t>(bits >> 8);
      }
  });
}

void ExpertsOp::merge_pre_activations(ThreadPool& pool, int64_t S, const ForwardCache& cache, float* gu) const {
  const int I2 = 2 * w_.intermediate;
  const int64_t ld_lo = ForwardCache::lo_stride(w_.intermediate);
  pool.parallel_for((S + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task) {
    const int64_t end = std::min(S, (task + 1) * kRowsPerTask);
    for (int64_t row = task * kRowsPerTask; row < end; ++row)
      for (int i = 0; i < I2; ++i) {
        const uint32_t bits = static_cast<uint32_t>(cache.gu_hi[row * I2 + i]) << 16 |
                              static_cast<uint32_t>(cache.gu_lo[row * ld_lo + i]) << 8;
        std::memcpy(gu + row * I2 + i, &bits, 4);
      }
  });
}

void ExpertsOp::gather_rows(ThreadPool& pool, const Routing& r, const void* src, DType t, float* dst) const {
  const int H = w_.hidden;
  const int64_t S = r.num_rows();
  pool.parallel_for((S + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task) {
    const int64_t end = std::min(S, (task + 1) * kRowsPerTask);
    for (int64_t row = task * kRowsPerTask; row < end; ++row) {
      const int64_t offset = static_cast<int64_t>(r.row_token[row]) * H;
      float* d = dst + row * H;
      if (t == DType::kF32) {
        const float* s = static_cast<const float*>(src) + offset;
        std::copy(s, s + H, d);
      } else {
        const bf16* s = static_cast<const bf16*>(src) + offset;
        for (int h = 0; h < H; ++h) d[h] = bf16_to_f32(s[h]);
      }
    }
  });
}

// c [S, N] = a [S, K] @ W[e]^T + za @ B[e]^T, with za [S, r] = scaling * a @ A[e]^T (kept for backward), for
// W = W_gu (gate_up: K = H, N = 2I) or W_d (K = I, N = H). In the bf16 dot path `a` is rounded to bf16 first: exact
// for gate_up (its rows came from bf16 activations); for down it rounds h, as the bf16 reference does between its two
// matmuls.
void ExpertsOp::project_with_lora(ThreadPool& pool, const Routing& r, DType act, bool gate_up, const float* a,
                                  const LoraFactors& lora, float* za, float* c) {
  const int K = gate_up ? w_.hidden : w_.intermediate, N = gate_up ? 2 * w_.intermediate : w_.hidden, R = lora.rank;
  const float* lora_a = gate_up ? lora.gate_up_a : lora.down_a;  // [E, r, K]
  const float* lora_b = gate_up ? lora.gate_up_b : lora.down_b;  // [E, N, r]
  const int64_t S = r.num_rows();
  if (R > 0) {
    for_each_expert(pool, r, [&](int e, int64_t row0, int rows) {
      if (rows == 0) return;
      float* za_e = za + row0 * R;
      k_->nt(rows, R, K, a + row0 * K, K, lora_a + static_cast<int64_t>(e) * R * K, DType::kF32, K, za_e, R, false);
      for (int64_t i = 0; i < static_cast<int64_t>(rows) * R; ++i) za_e[i] *= lora.scaling;
    });
  }
  const bool bf16_dot = use_bf16_dot(act);
  bf16* ab = nullptr;
  if (bf16_dot) {
    ab = scratch_.bf16_operand.get(S * K);
    for (int64_t i = 0; i < S * K; ++i) ab[i] = f32_to_bf16(a[i]);
  }
  for_each_block(pool, r, N, [&](int e, int64_t row0, int rows, int col0, int ncols) {
    float* ce = c + row0 * N + col0;
    project(bf16_dot, gate_up, e, col0, rows, ncols, a + row0 * K, ab ? ab + row0 * K : nullptr, ce, N);
    if (R > 0)
      k_->nt(rows, ncols, R, za + row0 * R, R, lora_b + (static_cast<int64_t>(e) * N + col0) * R, DType::kF32, R, ce, N,
             true);
  });
}

// gu [S, 2I] = xg @ W_gu[e]^T + xa @ B_gu[e]^T, with xa [S, r] = scaling * xg @ A_gu[e]^T (kept for backward).
void ExpertsOp::gate_up(ThreadPool& pool, const Routing& r, DType act, const float* xg, const LoraFactors& lora,
                        float* xa, float* gu) {
  project_with_lora(pool, r, act, true, xg, lora, xa, gu);
}

// h [S, I] = silu(gate) * up.
void ExpertsOp::activate(ThreadPool& pool, const Routing& r, const float* gu, float* h) const {
  const int I = w_.intermediate;
  const int64_t S = r.num_rows();
  pool.parallel_for((S + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task) {
    const int64_t end = std::min(S, (task + 1) * kRowsPerTask);
    for (int64_t row = task * kRowsPerTask; row < end; ++row) {
      const float* g = gu + row * 2 * I;
      const float* u = g + I;
      float* out = h + row * I;
      for (int i = 0; i < I; ++i) out[i] = silu(g[i]) * u[i];
    }
  });
}

// out [S, H] = h @ W_d[e]^T + ha @ B_d[e]^T, with ha [S, r] = scaling * h @ A_d[e]^T (kept for backward).
void ExpertsOp::down(ThreadPool& pool, const Routing& r, DType act, const float* h, const LoraFactors& lora, float* ha,
                     float* out) {
  project_with_lora(pool, r, act, false, h, lora, ha, out);
}

// out[t] = sum_k scale[t,k] * rows[slot_row(t,k)] in slot order (deterministic), stored as `t`.
// scale == nullptr means 1.
void ExpertsOp::combine(ThreadPool& pool, const Routing& r, const float* rows, const float* scale, DType t,
                        void* out) const {
  const int H = w_.hidden, K = r.top_k;
  const int64_t T = r.num_tokens;
  pool.parallel_for((T + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task) {
    std::vector<float> acc(H);
    const int64_t end = std::min(T, (task + 1) * kRowsPerTask);
    for (int64_t tok = task * kRowsPerTask; tok < end; ++tok) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int k = 0; k < K; ++k) {
        const int64_t slot = tok * K + k;
        const int64_t row = r.slot_row[slot];
        if (row < 0) continue;
        const float s = scale ? scale[slot] : 1.f;
        const float* src = rows + row * H;
        for (int h = 0; h < H; ++h) acc[h] += s * src[h];
      }
      if (t == DType::kF32) {
        std::copy(acc.begin(), acc.end(), static_cast<float*>(out) + tok * H);
      } else {
        bf16* o = static_cast<bf16*>(out) + tok * H;
        for (int h = 0; h < H; ++h) o[h] = f32_to_bf16(acc[h]);
      }
    }
  });
}

void ExpertsOp::forward(ThreadPool& pool, const Activations& act, const LoraFactors& lora, void* y, float* cache) {
  std::lock_guard<std::mutex> lock(call_mutex_);
  const Routing r = route(act.T, act.K, w_.num_experts, act.ids);
  if (packed_forward(act.dtype)) return forward_packed(pool, r, act, lora, y, cache);
  require_weights(act.dtype == DType::kF32 ? "a forward with fp32 activations" : "this forward");
  const int H = w_.hidden, I = w_.intermediate, R = lora.rank;
  const int64_t S = r.num_rows();
  const ForwardCache kept = ForwardCache::at(cache, S, I, R, act.dtype);
  float* xg = scratch_.x_rows.get(S * H);
  float* gu = kept.gu ? kept.gu : scratch_.pre_activations.get(S * 2 * I);
  float* h = scratch_.h.get(S * I);
  float* out = scratch_.out_rows.get(S * H);
  float* xa = R > 0 ? (kept.xa ? kept.xa : scratch_.xa.get(S * R)) : nullptr;
  float* ha = R > 0 ? (kept.ha ? kept.ha : scratch_.ha.get(S * R)) : nullptr;  // kept for backward
  gather_rows(pool, r, act.x, act.dtype, xg);
  gate_up(pool, r, act.dtype, xg, lora, xa, gu);
  if (kept.gu_hi) split_pre_activations(pool, S, gu, kept);
  activate(pool, r, gu, h);
  down(pool, r, act.dtype, h, lora, ha, out);
  combine(pool, r, out, act.w, act.dtype, y);
}

}  // namespace kt

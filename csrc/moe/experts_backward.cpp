// ExpertsOp::backward: dx, the routing-weight gradient dw and the expert-LoRA gradients, base frozen.
//
// Per routed row (token t, slot k, expert e, weight w), with dy the output gradient of token t:
//   dh_raw = dy @ W_d + (scaling * dy @ B_d) @ A_d        [I]   (no transposed weight copy: nn GEMM)
//   dw     = dh_raw . h                                   since y = sum_k w * (W_d h + s B_d A_d h)
//   dh     = w * dh_raw ; dgate = dh * up * silu'(gate) ; dup = dh * silu(gate)
//   dx_row = dgu @ W_gu + (scaling * dgu @ B_gu) @ A_gu   [H],  dx[t] = sum_k dx_row
// LoRA (per expert, sums over its rows): dB_d = (w dy)^T ha, dA_d = (w s dy B_d)^T h,
//   dB_gu = dgu^T xa, dA_gu = (s dgu B_gu)^T x, with xa / ha the scaled LoRA inputs of the forward.
//
// The packed path (bf16 activations; bf16 or fp8 weights) makes the two base products dy @ W_d and dgu @ W_gu tile
// panels on column blocks of the weights, split and blocked as the forward's, with the LoRA terms added in their
// epilogue; reads dy and x as bf16 rows (no fp32 copies), recomputes h inside the silu backward (one pass over
// the cache's 24-bit pre-activations), keeps dgu and h as bf16 only and takes ha from the forward's cache.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "../runtime/phase_times.h"
#include "experts_op.h"

namespace kt {
namespace {

constexpr int64_t kRowsPerTask = 32;
constexpr int64_t kLoraRowChunk = 64;  // rows per task of the rank-r products against bf16 rows

// out[n, m] = in[m, n] for an [M, N] matrix.
void transpose_into(int M, int N, const float* in, float* out) {
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) out[static_cast<int64_t>(n) * M + m] = in[static_cast<int64_t>(m) * N + n];
}

}  // namespace

// One call of the exact backward (fp32 rows, any kernel), in the phases the packed backward books.
struct ExpertsOp::ExactBackward : PassContext {
  float* xg;                  // x rows [S, H]
  float* dyg;                 // dy rows [S, H]
  const float* gu = nullptr;  // pre-activations [S, 2I]: the cache's (widened from 24 bits) or recomputed
  const float* xa = nullptr;  // the forward's scaled LoRA input of gate_up [S, r]
  float* h;                   // [S, I]
  float* ha;                  // scaling * h @ A_d^T [S, r], then times w
  float* dyb;                 // scaling * dy @ B_d [S, r], then times w
  float* dh;                  // dh_raw [S, I], then w * dh_raw
  float* dgu;                 // [S, 2I]
  float* dgb;                 // scaling * dgu @ B_gu [S, r]
  float* dxg;                 // dx rows [S, H]

  ExactBackward(ExpertsOp& op, ThreadPool& pool, const Routing& r, const Activations& act, const LoraFactors& lora)
      : PassContext(op, pool, r, act, lora) {
    ExpertsScratch& s = op.scratch_;
    xg = s.x_rows.get(S * H);
    h = s.h.get(S * I);
    dyg = s.dy_rows.get(S * H);
    ha = R > 0 ? s.ha.get(S * R) : nullptr;
    dh = s.dh.get(S * I);
    dgu = s.dgu.get(S * I2);
    dxg = s.dx_rows.get(S * H);
    dyb = R > 0 ? s.dyb.get(S * R) : nullptr;
    dgb = R > 0 ? s.dgb.get(S * R) : nullptr;
  }

  // gather dy, lora dyb: x and dy rows; gu and xa from the forward's cache or recomputed, then h; with LoRA,
  // ha = scaling * h @ A_d^T and dyb = scaling * dy @ B_d.
  void gather_dy_lora_dyb(const void* dy, const float* cache) {
    op.gather_rows(pool, r, act.x, act.dtype, xg);
    op.gather_rows(pool, r, dy, act.dtype, dyg);
    pre_activations(cache);
    op.activate(pool, r, gu, h);
    if (R > 0) lora_ha_dyb();
  }

  // The forward's cache holds gu and the LoRA inputs xa; without it, recompute both.
  void pre_activations(const float* cache) {
    const ForwardCache kept = ForwardCache::at(cache, S, I, R, act.dtype);
    gu = kept.gu;
    xa = kept.xa;
    if (kept.gu_hi) {  // 24-bit pre-activations: widened once for the fp32 loops below
      float* wide = op.scratch_.pre_activations.get(S * I2);
      op.merge_pre_activations(pool, S, kept, wide);
      gu = wide;
    }
    if (!cache) {
      float* fresh = op.scratch_.pre_activations.get(S * I2);
      float* fresh_xa = R > 0 ? op.scratch_.xa.get(S * R) : nullptr;
      op.gate_up(pool, r, act.dtype, xg, lora, fresh_xa, fresh);
      gu = fresh;
      xa = fresh_xa;
    }
  }

  // ha = scaling * h @ A_d^T and dyb = scaling * dy @ B_d, per expert.
  void lora_ha_dyb() {
    op.for_each_expert(pool, r, [&](int e, int64_t row0, int rows) {
      if (rows == 0) return;
      op.k_->nt(rows, R, I, h + row0 * I, I, lora.down_a + static_cast<int64_t>(e) * R * I, DType::kF32, I,
                ha + row0 * R, R, false);
      // dy @ B_d with B_d [H, r]: as dot products against B_d^T [r, H], vectorized along H.
      std::vector<float> bt(static_cast<size_t>(R) * H);
      transpose_into(H, R, lora.down_b + static_cast<int64_t>(e) * H * R, bt.data());
      op.k_->nt(rows, R, H, dyg + row0 * H, H, bt.data(), DType::kF32, H, dyb + row0 * R, R, false);
      for (int64_t i = row0 * R; i < (row0 + rows) * R; ++i) {
        ha[i] *= lora.scaling;
        dyb[i] *= lora.scaling;
      }
    });
  }

  // dh = dy @ W_d: dh_raw [S, I] = dy @ W_d (+ dyb @ A_d).
  void dh_from_dy() {
    op.for_each_block(pool, r, I, [&](int e, int64_t row0, int rows, int col0, int ncols) {
      float* c = dh + row0 * I + col0;
      op.project_back(false, e, col0, rows, ncols, dyg + row0 * H, H, c, I);  // W_d[e] [H, I], columns col0..
      if (R > 0)
        op.k_->nn(rows, ncols, R, dyb + row0 * R, R, lora.down_a + static_cast<int64_t>(e) * R * I + col0, DType::kF32,
                  I, c, I, true);
    });
  }

  // silu backward, dw: dw, dh = w * dh_raw, dgu; and dyb *= w for dA_d.
  void silu_backward_dw(float* dw) {
    std::fill(dw, dw + static_cast<int64_t>(act.T) * act.K, 0.f);
    pool.parallel_for((S + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task) {
      const int64_t end = std::min(S, (task + 1) * kRowsPerTask);
      for (int64_t row = task * kRowsPerTask; row < end; ++row) {
        const int64_t slot = r.row_slot[row];
        const float wk = act.w[slot];
        float* d = dh + row * I;
        const float* hr = h + row * I;
        float dot = 0.f;
        for (int i = 0; i < I; ++i) dot += d[i] * hr[i];
        dw[slot] = dot;
        const float* g = gu + row * I2;
        const float* u = g + I;
        float* dg = dgu + row * I2;
        float* du = dg + I;
        for (int i = 0; i < I; ++i) {
          const float sig = 1.f / (1.f + std::exp(-g[i]));
          const float dhi = wk * d[i];
          dg[i] = dhi * u[i] * sig * (1.f + g[i] * (1.f - sig));
          du[i] = dhi * g[i] * sig;
        }
        if (R > 0)
          for (int j = 0; j < R; ++j) {
            dyb[row * R + j] *= wk;
            ha[row * R + j] *= wk;  // now w * ha, for dB_d = dy^T (w ha)
          }
      }
    });
  }

  // dx rows = dgu @ W_gu: dx rows [S, H] = dgu @ W_gu (+ dgb @ A_gu).
  void dx_rows_from_dgu() {
    if (R > 0) {
      op.for_each_expert(pool, r, [&](int e, int64_t row0, int rows) {
        if (rows == 0) return;
        std::vector<float> bt(static_cast<size_t>(R) * I2);  // B_gu^T [r, 2I], as for dyb
        transpose_into(I2, R, lora.gate_up_b + static_cast<int64_t>(e) * I2 * R, bt.data());
        op.k_->nt(rows, R, I2, dgu + row0 * I2, I2, bt.data(), DType::kF32, I2, dgb + row0 * R, R, false);
        for (int64_t i = row0 * R; i < (row0 + rows) * R; ++i) dgb[i] *= lora.scaling;
      });
    }
    op.for_each_block(pool, r, H, [&](int e, int64_t row0, int rows, int col0, int ncols) {
      float* c = dxg + row0 * H + col0;
      op.project_back(true, e, col0, rows, ncols, dgu + row0 * I2, I2, c, H);  // W_gu[e] [2I, H], columns col0..
      if (R > 0)
        op.k_->nn(rows, ncols, R, dgb + row0 * R, R, lora.gate_up_a + static_cast<int64_t>(e) * R * H + col0,
                  DType::kF32, H, c, H, true);
    });
  }

  // combine dx
  void combine_dx(void* dx) { op.combine(pool, r, dxg, nullptr, act.dtype, dx); }

  // lora factor grads: one expert per task.
  void lora_factor_grads(const LoraGrads& grads) {
    op.for_each_expert(pool, r, [&](int e, int64_t row0, int rows) {
      float* g_da = grads.down_a + static_cast<int64_t>(e) * R * I;
      float* g_db = grads.down_b + static_cast<int64_t>(e) * H * R;
      float* g_ga = grads.gate_up_a + static_cast<int64_t>(e) * R * H;
      float* g_gb = grads.gate_up_b + static_cast<int64_t>(e) * I2 * R;
      if (rows == 0) {
        std::fill(g_da, g_da + static_cast<int64_t>(R) * I, 0.f);
        std::fill(g_db, g_db + static_cast<int64_t>(H) * R, 0.f);
        std::fill(g_ga, g_ga + static_cast<int64_t>(R) * H, 0.f);
        std::fill(g_gb, g_gb + static_cast<int64_t>(I2) * R, 0.f);
        return;
      }
      std::vector<float> tmp(static_cast<size_t>(R) * std::max(H, I2));
      op.k_->tn(R, I, rows, dyb + row0 * R, R, h + row0 * I, I, g_da, I, false);        // [r, I]
      op.k_->tn(R, H, rows, ha + row0 * R, R, dyg + row0 * H, H, tmp.data(), H, false); // [r, H]
      transpose_into(R, H, tmp.data(), g_db);                                             // [H, r]
      op.k_->tn(R, H, rows, dgb + row0 * R, R, xg + row0 * H, H, g_ga, H, false);       // [r, H]
      op.k_->tn(R, I2, rows, xa + row0 * R, R, dgu + row0 * I2, I2, tmp.data(), I2, false);  // [r, 2I]
      transpose_into(R, I2, tmp.data(), g_gb);                                             // [2I, r]
    });
  }
};

void ExpertsOp::backward(ThreadPool& pool, const Activations& act, const LoraFactors& lora, const void* dy, void* dx,
                         float* dw, const float* cache, const LoraGrads& grads) {
  std::lock_guard<std::mutex> lock(call_mutex_);
  const Routing r = route(act.T, act.K, w_.num_experts, act.ids);
  if (packed_backward(act.dtype)) return backward_packed(pool, r, act, lora, dy, dx, dw, cache, grads);
  require_weights(act.dtype == DType::kF32 ? "a backward with fp32 activations" : "this backward");
  ExactBackward call(*this, pool, r, act, lora);
  call.gather_dy_lora_dyb(dy, cache);
  call.dh_from_dy();
  call.silu_backward_dw(dw);
  call.dx_rows_from_dgu();
  call.combine_dx(dx);
  if (lora.rank > 0) call.lora_factor_grads(grads);
}

// One call of the packed backward (bf16 activations; bf16 or fp8 weights), phase by phase.
struct ExpertsOp::PackedBackward : PassContext {
  const int ldy, ldg;        // row strides of the dy and dgu panel rows
  ForwardCache kept;         // the forward's cache (act is bf16: the 24-bit planes), xa and ha
  bf16* dy16 = nullptr;      // dy rows [S + 32, ldy]
  float* dyb = nullptr;      // scaling * dy @ B_d [S, r]
  float* dh = nullptr;       // dh_raw [S, I]
  bf16* dgu16 = nullptr;     // dgu rows [S + 32, ldg]
  bf16* h16 = nullptr;       // h [S, I], for dA_d
  float* dybw = nullptr;     // w * dyb [S, r], for dA_d
  float* haw = nullptr;      // w * ha [S, r], for dB_d
  float* dgb = nullptr;      // scaling * dgu @ B_gu [S, r]
  bf16* dx16 = nullptr;      // dx rows [S, H]

  PackedBackward(ExpertsOp& op, ThreadPool& pool, const Routing& r, const Activations& act, const LoraFactors& lora)
      : PassContext(op, pool, r, act, lora),
        ldy(tile_row_stride((H + 31) / 32 * 32, 2)),
        ldg(tile_row_stride((I2 + 31) / 32 * 32, 2)) {}

  // What the forward would have kept (ForwardCache): gu [S, 2I] in 24 bits, xa [S, r], ha [S, r]. Not booked.
  float* make_cache() {
    float* made = op.scratch_.made_cache.get(S * ForwardCache::row_floats(I, R, act.dtype));
    if (op.packed_forward(act.dtype)) {
      op.forward_packed(pool, r, act, lora, op.scratch_.discarded_y16.get(static_cast<int64_t>(act.T) * H), made);
      return made;
    }
    const ForwardCache fresh = ForwardCache::at(made, S, I, R, act.dtype);
    float* xg = op.scratch_.x_rows.get(S * H);
    float* gu32 = op.scratch_.made_pre_activations.get(S * I2);
    op.gather_rows(pool, r, act.x, act.dtype, xg);
    op.gate_up(pool, r, act.dtype, xg, lora, fresh.xa, gu32);
    op.split_pre_activations(pool, S, gu32, fresh);
    if (R > 0) {
      float* h = op.scratch_.h.get(S * I);
      op.activate(pool, r, gu32, h);
      op.for_each_expert(pool, r, [&](int e, int64_t row0, int rows) {
        if (rows == 0) return;
        op.k_->nt(rows, R, I, h + row0 * I, I, lora.down_a + static_cast<int64_t>(e) * R * I, DType::kF32, I,
                  fresh.ha + row0 * R, R, false);
        for (int64_t i = row0 * R; i < (row0 + rows) * R; ++i) fresh.ha[i] *= lora.scaling;
      });
    }
    return made;
  }

  // gather dy, lora dyb: dy as bf16 rows; dyb = scaling * dy @ B_d.
  void gather_dy_lora_dyb(const void* dy) {
    dy16 = op.scratch_.dy_panel_rows.get((S + 32) * ldy);
    op.gather_packed(pool, r, dy, act.dtype, H, ldy, reinterpret_cast<uint8_t*>(dy16), nullptr);
    dyb = R > 0 ? op.scratch_.dyb.get(S * R) : nullptr;
    if (R > 0)
      op.for_each_row_chunk(pool, r, kLoraRowChunk, [&](int e, int64_t row0, int rows) {
        std::vector<float> bt(static_cast<size_t>(R) * H);  // B_d^T [r, H]
        transpose_into(H, R, lora.down_b + static_cast<int64_t>(e) * H * R, bt.data());
        op.row_ops().rows_times_bt_bf16(rows, H, dy16 + row0 * ldy, ldy, bt.data(), R, lora.scaling, dyb + row0 * R);
      });
  }

  // dh = dy @ W_d: dh_raw [S, I] = dy @ W_d + dyb @ A_d.
  void dh_from_dy() {
    dh = op.scratch_.dh.get(S * I);
    op.project_columns_packed(pool, r, dy16, ldy, false, dh, nullptr, op.down_columns_, dyb, R, lora.down_a);
  }

  // silu backward, dw: one pass per row: dw = dh_raw . h and dgu, as bf16 (the operand of the base product and
  // of the LoRA products, as in a bf16 autograd graph), with h as bf16 for dA_d.
  void silu_backward_dw(float* dw) {
    dgu16 = op.scratch_.dgu_panel_rows.get((S + 32) * ldg);
    h16 = R > 0 ? op.scratch_.h16.get(S * I) : nullptr;
    dybw = R > 0 ? op.scratch_.weighted_dyb.get(S * R) : nullptr;
    haw = R > 0 ? op.scratch_.weighted_ha.get(S * R) : nullptr;
    const int64_t ld_lo = ForwardCache::lo_stride(I);
    std::fill(dw, dw + static_cast<int64_t>(act.T) * act.K, 0.f);
    pool.parallel_for((S + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task) {
      const int64_t end = std::min(S, (task + 1) * kRowsPerTask);
      for (int64_t row = task * kRowsPerTask; row < end; ++row) {
        const int64_t slot = r.row_slot[row];
        const float wk = act.w[slot];
        dw[slot] =
            op.row_ops().silu_backward_fused_row(I, kept.gu_hi + row * I2, kept.gu_lo + row * ld_lo, dh + row * I, wk,
                                                 dgu16 + row * ldg, h16 ? h16 + row * I : nullptr);
        std::fill(dgu16 + row * ldg + I2, dgu16 + row * ldg + ldg, bf16(0));
        for (int j = 0; j < R; ++j) {
          dybw[row * R + j] = wk * dyb[row * R + j];
          haw[row * R + j] = wk * kept.ha[row * R + j];
        }
      }
    });
  }

  // dx rows = dgu @ W_gu: dx rows [S, H] = dgu @ W_gu + dgb @ A_gu, dgb = scaling * dgu @ B_gu. As bf16 rows (a
  // bf16 graph rounds each expert's dx too; half the bytes of fp32 rows written and combined).
  void dx_rows_from_dgu() {
    dgb = R > 0 ? op.scratch_.dgb.get(S * R) : nullptr;
    if (R > 0)
      op.for_each_row_chunk(pool, r, kLoraRowChunk, [&](int e, int64_t row0, int rows) {
        std::vector<float> bt(static_cast<size_t>(R) * I2);  // B_gu^T [r, 2I]
        transpose_into(I2, R, lora.gate_up_b + static_cast<int64_t>(e) * I2 * R, bt.data());
        op.row_ops().rows_times_bt_bf16(rows, I2, dgu16 + row0 * ldg, ldg, bt.data(), R, lora.scaling, dgb + row0 * R);
      });
    dx16 = reinterpret_cast<bf16*>(op.scratch_.dx_rows16.get(S * H * 2));
    op.project_columns_packed(pool, r, dgu16, ldg, true, nullptr, dx16, op.gate_up_columns_, dgb, R, lora.gate_up_a);
  }

  // combine dx
  void combine_dx(void* dx) { op.combine_bf16_rows(pool, r, dx16, nullptr, static_cast<bf16*>(dx)); }

  // lora factor grads: (expert, factor) tasks.
  void lora_factor_grads(const LoraGrads& grads) {
    const bf16* x = static_cast<const bf16*>(act.x);
    pool.parallel_for(static_cast<int64_t>(op.w_.num_experts) * 4, [&](int64_t task) {
      const int e = static_cast<int>(task / 4), which = static_cast<int>(task % 4);
      const int64_t row0 = r.offsets[e];
      const int rows = static_cast<int>(r.rows(e));
      float* out = which == 0   ? grads.down_a + static_cast<int64_t>(e) * R * I
                   : which == 1 ? grads.down_b + static_cast<int64_t>(e) * H * R
                   : which == 2 ? grads.gate_up_a + static_cast<int64_t>(e) * R * H
                                : grads.gate_up_b + static_cast<int64_t>(e) * I2 * R;
      const int64_t n = static_cast<int64_t>(R) * (which == 0 ? I : which == 3 ? I2 : H);
      if (rows == 0) {
        std::fill(out, out + n, 0.f);
        return;
      }
      std::vector<float> tmp(which % 2 ? static_cast<size_t>(n) : 0);
      switch (which) {
        case 0:  // dA_d [r, I] = (w dyb)^T h
          op.row_ops().tn_bf16_rows(R, I, rows, dybw + row0 * R, R, h16 + row0 * I, I, nullptr, out);
          break;
        case 1:  // dB_d [H, r] = ((w ha)^T dy)^T
          op.row_ops().tn_bf16_rows(R, H, rows, haw + row0 * R, R, dy16 + row0 * ldy, ldy, nullptr, tmp.data());
          transpose_into(R, H, tmp.data(), out);
          break;
        case 2:  // dA_gu [r, H] = dgb^T x
          op.row_ops().tn_bf16_rows(R, H, rows, dgb + row0 * R, R, x, H, r.row_token.data() + row0, out);
          break;
        default:  // dB_gu [2I, r] = (xa^T dgu)^T
          op.row_ops().tn_bf16_rows(R, I2, rows, kept.xa + row0 * R, R, dgu16 + row0 * ldg, ldg, nullptr, tmp.data());
          transpose_into(R, I2, tmp.data(), out);
          break;
      }
    });
  }
};

void ExpertsOp::backward_packed(ThreadPool& pool, const Routing& r, const Activations& act, const LoraFactors& lora,
                                const void* dy, void* dx, float* dw, const float* cache, const LoraGrads& grads) {
  PackedBackward call(*this, pool, r, act, lora);
  if (!cache) cache = call.make_cache();
  PhaseLaps laps("backward");
  call.kept = ForwardCache::at(cache, call.S, call.I, call.R, act.dtype);
  call.gather_dy_lora_dyb(dy);
  laps.mark("gather dy, lora dyb");
  call.dh_from_dy();
  laps.mark("dh = dy @ W_d");
  call.silu_backward_dw(dw);
  laps.mark("silu backward, dw");
  call.dx_rows_from_dgu();
  laps.mark("dx rows = dgu @ W_gu");
  call.combine_dx(dx);
  laps.mark("combine dx");
  if (lora.rank > 0) {
    call.lora_factor_grads(grads);
    laps.mark("lora factor grads");
  }
}

}  // namespace kt

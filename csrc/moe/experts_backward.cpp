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
// The packed path (bf16 weights and activations) makes the two base products dy @ W_d and dgu @ W_gu tile
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

void ExpertsOp::backward(ThreadPool& pool, const Activations& act, const LoraFactors& lora, const void* dy, void* dx,
                         float* dw, const float* cache, const LoraGrads& grads) {
  std::lock_guard<std::mutex> lock(call_mutex_);
  const Routing r = route(act.T, act.K, w_.num_experts, act.ids);
  const int H = w_.hidden, I = w_.intermediate, I2 = 2 * I, R = lora.rank, K = act.K;
  const int64_t S = r.num_rows();
  if (packed_backward(act.dtype)) return backward_packed(pool, r, act, lora, dy, dx, dw, cache, grads);

  float* xg = scratch(0, S * H);
  float* h = scratch(2, S * I);
  float* dyg = scratch(3, S * H);
  float* ha = R > 0 ? scratch(5, S * R) : nullptr;
  float* dh = scratch(6, S * I);
  float* dgu = scratch(7, S * I2);
  float* dxg = scratch(8, S * H);
  float* dyb = R > 0 ? scratch(9, S * R) : nullptr;   // scaling * dy @ B_d, then times w
  float* dgb = R > 0 ? scratch(10, S * R) : nullptr;  // scaling * dgu @ B_gu

  gather_rows(pool, r, act.x, act.dtype, xg);
  gather_rows(pool, r, dy, act.dtype, dyg);
  // The forward's cache holds gu and the LoRA inputs xa; without it, recompute both.
  const ForwardCache kept = ForwardCache::at(cache, S, I, R, act.dtype);
  const float* gu = kept.gu;
  const float* xa = kept.xa;
  if (kept.gu_hi) {  // 24-bit pre-activations: widened once for the fp32 loops below
    float* wide = scratch(1, S * I2);
    merge_pre_activations(pool, S, kept, wide);
    gu = wide;
  }
  if (!cache) {
    float* fresh = scratch(1, S * I2);
    float* fresh_xa = R > 0 ? scratch(4, S * R) : nullptr;
    gate_up(pool, r, act.dtype, xg, lora, fresh_xa, fresh);
    gu = fresh;
    xa = fresh_xa;
  }
  activate(pool, r, gu, h);
  if (R > 0) {  // ha = scaling * h @ A_d^T and dyb = scaling * dy @ B_d, per expert
    for_each_expert(pool, r, [&](int e, int64_t row0, int rows) {
      if (rows == 0) return;
      k_->nt(rows, R, I, h + row0 * I, I, lora.down_a + static_cast<int64_t>(e) * R * I, DType::kF32, I, ha + row0 * R,
             R, false);
      // dy @ B_d with B_d [H, r]: as dot products against B_d^T [r, H], vectorized along H.
      std::vector<float> bt(static_cast<size_t>(R) * H);
      transpose_into(H, R, lora.down_b + static_cast<int64_t>(e) * H * R, bt.data());
      k_->nt(rows, R, H, dyg + row0 * H, H, bt.data(), DType::kF32, H, dyb + row0 * R, R, false);
      for (int64_t i = row0 * R; i < (row0 + rows) * R; ++i) {
        ha[i] *= lora.scaling;
        dyb[i] *= lora.scaling;
      }
    });
  }

  // dh_raw [S, I] = dy @ W_d (+ dyb @ A_d)
  for_each_block(pool, r, I, [&](int e, int64_t row0, int rows, int col0, int ncols) {
    float* c = dh + row0 * I + col0;
    // W_d[e] is [H, I]: its columns col0.. start col0 elements into the expert's block.
    const void* w_cols = weight_element(w_.down, static_cast<int64_t>(e) * H * I + col0);
    k_->nn(rows, ncols, H, dyg + row0 * H, H, w_cols, w_.dtype, I, c, I, false);
    if (R > 0)
      k_->nn(rows, ncols, R, dyb + row0 * R, R, lora.down_a + static_cast<int64_t>(e) * R * I + col0, DType::kF32, I, c,
             I, true);
  });
  // dw, dh = w * dh_raw, dgu; and dyb *= w for dA_d.
  std::fill(dw, dw + static_cast<int64_t>(act.T) * K, 0.f);
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

  // dx rows [S, H] = dgu @ W_gu (+ dgb @ A_gu)
  if (R > 0) {
    for_each_expert(pool, r, [&](int e, int64_t row0, int rows) {
      if (rows == 0) return;
      std::vector<float> bt(static_cast<size_t>(R) * I2);  // B_gu^T [r, 2I], as for dyb
      transpose_into(I2, R, lora.gate_up_b + static_cast<int64_t>(e) * I2 * R, bt.data());
      k_->nt(rows, R, I2, dgu + row0 * I2, I2, bt.data(), DType::kF32, I2, dgb + row0 * R, R, false);
      for (int64_t i = row0 * R; i < (row0 + rows) * R; ++i) dgb[i] *= lora.scaling;
    });
  }
  for_each_block(pool, r, H, [&](int e, int64_t row0, int rows, int col0, int ncols) {
    float* c = dxg + row0 * H + col0;
    const void* w_cols = weight_element(w_.gate_up, static_cast<int64_t>(e) * I2 * H + col0);  // W_gu[e] [2I, H]
    k_->nn(rows, ncols, I2, dgu + row0 * I2, I2, w_cols, w_.dtype, H, c, H, false);
    if (R > 0)
      k_->nn(rows, ncols, R, dgb + row0 * R, R, lora.gate_up_a + static_cast<int64_t>(e) * R * H + col0, DType::kF32, H,
             c, H, true);
  });
  combine(pool, r, dxg, nullptr, act.dtype, dx);

  if (R > 0) {  // LoRA factor gradients, one expert per task
    for_each_expert(pool, r, [&](int e, int64_t row0, int rows) {
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
      k_->tn(R, I, rows, dyb + row0 * R, R, h + row0 * I, I, g_da, I, false);        // [r, I]
      k_->tn(R, H, rows, ha + row0 * R, R, dyg + row0 * H, H, tmp.data(), H, false); // [r, H]
      transpose_into(R, H, tmp.data(), g_db);                                          // [H, r]
      k_->tn(R, H, rows, dgb + row0 * R, R, xg + row0 * H, H, g_ga, H, false);       // [r, H]
      k_->tn(R, I2, rows, xa + row0 * R, R, dgu + row0 * I2, I2, tmp.data(), I2, false);  // [r, 2I]
      transpose_into(R, I2, tmp.data(), g_gb);                                          // [2I, r]
    });
  }
}

void ExpertsOp::backward_packed(ThreadPool& pool, const Routing& r, const Activations& act, const LoraFactors& lora,
                                const void* dy, void* dx, float* dw, const float* cache, const LoraGrads& grads) {
  const int H = w_.hidden, I = w_.intermediate, I2 = 2 * I, R = lora.rank, K = act.K;
  const int64_t S = r.num_rows();
  const int ldy = tile_row_stride((H + 31) / 32 * 32, 2), ldg = tile_row_stride((I2 + 31) / 32 * 32, 2);
  if (!cache) {  // what the forward would have kept (ForwardCache): gu [S, 2I] in 24 bits, xa [S, r], ha [S, r]
    float* made = scratch(1, S * ForwardCache::row_floats(I, R, act.dtype));
    if (packed_forward(act.dtype)) {
      forward_packed(pool, r, act, lora, scratch_bf16(static_cast<int64_t>(act.T) * H), made);
    } else {
      const ForwardCache fresh = ForwardCache::at(made, S, I, R, act.dtype);
      float* xg = scratch(0, S * H);
      float* gu32 = scratch(7, S * I2);
      gather_rows(pool, r, act.x, act.dtype, xg);
      gate_up(pool, r, act.dtype, xg, lora, fresh.xa, gu32);
      split_pre_activations(pool, S, gu32, fresh);
      if (R > 0) {
        float* h = scratch(2, S * I);
        activate(pool, r, gu32, h);
        for_each_expert(pool, r, [&](int e, int64_t row0, int rows) {
          if (rows == 0) return;
          k_->nt(rows, R, I, h + row0 * I, I, lora.down_a + static_cast<int64_t>(e) * R * I, DType::kF32, I,
                 fresh.ha + row0 * R, R, false);
          for (int64_t i = row0 * R; i < (row0 + rows) * R; ++i) fresh.ha[i] *= lora.scaling;
        });
      }
    }
    cache = made;
  }
  PhaseLaps laps("backward");
  const ForwardCache kept = ForwardCache::at(cache, S, I, R, act.dtype);  // act is bf16: the 24-bit planes
  const int64_t ld_lo = ForwardCache::lo_stride(I);
  const float* xa = kept.xa;
  const float* ha = kept.ha;

  bf16* dy16 = reinterpret_cast<bf16*>(scratch_bytes(2, (S + 32) * ldy * 2));
  gather_packed(pool, r, dy, act.dtype, H, ldy, reinterpret_cast<uint8_t*>(dy16), nullptr);
  float* dyb = R > 0 ? scratch(9, S * R) : nullptr;  // scaling * dy @ B_d
  if (R > 0)
    for_each_row_chunk(pool, r, kLoraRowChunk, [&](int e, int64_t row0, int rows) {
      std::vector<float> bt(static_cast<size_t>(R) * H);  // B_d^T [r, H]
      transpose_into(H, R, lora.down_b + static_cast<int64_t>(e) * H * R, bt.data());
      packed_avx512::rows_times_bt_bf16(rows, H, dy16 + row0 * ldy, ldy, bt.data(), R, lora.scaling, dyb + row0 * R);
    });

  laps.mark("gather dy, lora dyb");
  // dh_raw [S, I] = dy @ W_d + dyb @ A_d
  float* dh = scratch(6, S * I);
  project_columns_packed(pool, r, dy16, ldy, static_cast<const bf16*>(w_.down), H, I, dh, nullptr, down_columns_, dyb,
                         R, lora.down_a);
  laps.mark("dh = dy @ W_d");

  // One pass per row: dw = dh_raw . h and dgu, as bf16 (the operand of the base product and of the LoRA
  // products, as in a bf16 autograd graph), with h as bf16 for dA_d.
  bf16* dgu16 = reinterpret_cast<bf16*>(scratch_bytes(3, (S + 32) * ldg * 2));
  bf16* h16 = R > 0 ? scratch_bf16(S * I) : nullptr;
  float* dybw = R > 0 ? scratch(10, S * R) : nullptr;  // w * dyb, for dA_d
  float* haw = R > 0 ? scratch(11, S * R) : nullptr;   // w * ha, for dB_d
  std::fill(dw, dw + static_cast<int64_t>(act.T) * K, 0.f);
  pool.parallel_for((S + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task) {
    const int64_t end = std::min(S, (task + 1) * kRowsPerTask);
    for (int64_t row = task * kRowsPerTask; row < end; ++row) {
      const int64_t slot = r.row_slot[row];
      const float wk = act.w[slot];
      dw[slot] =
          packed_avx512::silu_backward_fused_row(I, kept.gu_hi + row * I2, kept.gu_lo + row * ld_lo, dh + row * I, wk,
                                                 dgu16 + row * ldg, h16 ? h16 + row * I : nullptr);
      std::fill(dgu16 + row * ldg + I2, dgu16 + row * ldg + ldg, bf16(0));
      for (int j = 0; j < R; ++j) {
        dybw[row * R + j] = wk * dyb[row * R + j];
        haw[row * R + j] = wk * ha[row * R + j];
      }
    }
  });

  laps.mark("silu backward, dw");
  // dx rows [S, H] = dgu @ W_gu + dgb @ A_gu, dgb = scaling * dgu @ B_gu
  float* dgb = R > 0 ? scratch(8, S * R) : nullptr;
  if (R > 0)
    for_each_row_chunk(pool, r, kLoraRowChunk, [&](int e, int64_t row0, int rows) {
      std::vector<float> bt(static_cast<size_t>(R) * I2);  // B_gu^T [r, 2I]
      transpose_into(I2, R, lora.gate_up_b + static_cast<int64_t>(e) * I2 * R, bt.data());
      packed_avx512::rows_times_bt_bf16(rows, I2, dgu16 + row0 * ldg, ldg, bt.data(), R, lora.scaling, dgb + row0 * R);
    });
  // As bf16 rows (a bf16 graph rounds each expert's dx too; half the bytes of fp32 rows written and combined).
  bf16* dx16 = reinterpret_cast<bf16*>(scratch_bytes(0, S * H * 2));
  project_columns_packed(pool, r, dgu16, ldg, static_cast<const bf16*>(w_.gate_up), I2, H, nullptr, dx16,
                         gate_up_columns_, dgb, R, lora.gate_up_a);
  laps.mark("dx rows = dgu @ W_gu");
  combine_bf16_rows(pool, r, dx16, nullptr, static_cast<bf16*>(dx));
  laps.mark("combine dx");

  if (R > 0) {  // LoRA factor gradients: (expert, factor) tasks
    const bf16* x = static_cast<const bf16*>(act.x);
    pool.parallel_for(static_cast<int64_t>(w_.num_experts) * 4, [&](int64_t task) {
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
          packed_avx512::tn_bf16_rows(R, I, rows, dybw + row0 * R, R, h16 + row0 * I, I, nullptr, out);
          break;
        case 1:  // dB_d [H, r] = ((w ha)^T dy)^T
          packed_avx512::tn_bf16_rows(R, H, rows, haw + row0 * R, R, dy16 + row0 * ldy, ldy, nullptr, tmp.data());
          transpose_into(R, H, tmp.data(), out);
          break;
        case 2:  // dA_gu [r, H] = dgb^T x
          packed_avx512::tn_bf16_rows(R, H, rows, dgb + row0 * R, R, x, H, r.row_token.data() + row0, out);
          break;
        default:  // dB_gu [2I, r] = (xa^T dgu)^T
          packed_avx512::tn_bf16_rows(R, I2, rows, xa + row0 * R, R, dgu16 + row0 * ldg, ldg, nullptr, tmp.data());
          transpose_into(R, I2, tmp.data(), out);
          break;
      }
    });
    laps.mark("lora factor grads");
  }
}

}  // namespace kt

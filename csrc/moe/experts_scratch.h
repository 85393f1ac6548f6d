// The scratch buffers of ExpertsOp, by name. They are kept between calls (a layer's steady state allocates
// nothing) and serve one call at a time (ExpertsOp::call_mutex_). Shapes use experts_op.h's legend; S is the
// routed rows of the call, ld* the tile row strides of packed rows (packed.h: tile_row_stride), which carry 32
// rows of padding for the panels' whole-tile loads.
#pragma once

#include <cstdint>
#include <vector>

#include "gemm.h"

namespace kt {

// A grow-only buffer: get(n) returns at least n elements, reallocating only when a call needs more.
template <typename T>
class ScratchBuffer {
 public:
  T* get(int64_t n) {
    if (static_cast<int64_t>(v_.size()) < n) v_.resize(n);
    return v_.data();
  }

 private:
  std::vector<T> v_;
};

struct ExpertsScratch {
  ExpertsScratch() = default;
  ExpertsScratch(const ExpertsScratch&) = delete;  // the shared names below refer to this object's buffers
  ExpertsScratch& operator=(const ExpertsScratch&) = delete;

  // fp32 rows of the exact path (and of the packed path where it falls back to them).
  ScratchBuffer<float> x_rows;           // x per routed row [S, H]
  ScratchBuffer<float> pre_activations;  // gu [S, 2I], when no cache keeps it or the backward widens the cache's
  ScratchBuffer<float> h;                // silu(gate) * up [S, I]
  ScratchBuffer<float> out_rows;         // the forward's expert outputs [S, H], before combine
  ScratchBuffer<float> xa, ha;           // scaled LoRA inputs [S, r], when no cache keeps them
  ScratchBuffer<float> dh;               // the backward's dh [S, I]
  ScratchBuffer<float> dgu;              // the exact backward's dgu [S, 2I]
  ScratchBuffer<float> dx_rows;          // the exact backward's dx per routed row [S, H], before combine
  ScratchBuffer<float> dyb;              // scaling * dy @ B_d [S, r]
  ScratchBuffer<float> dgb;              // scaling * dgu @ B_gu [S, r]
  ScratchBuffer<float> weighted_ha;      // the packed backward's w * ha [S, r], for dB_d
  ScratchBuffer<bf16> bf16_operand;      // x [S, H] or h [S, I] as bf16, for a projection through nt_bf16

  // Rows of the packed path.
  ScratchBuffer<uint8_t> x_panel_rows;    // x [S + 32, ldx], bf16 or int8 (zero past H)
  ScratchBuffer<float> x_scales;     // their int8 row scales [S + 32]
  ScratchBuffer<uint8_t> h_panel_rows;    // h [S + 32, ldh], bf16 or int8: the down panels' rows
  ScratchBuffer<float> h_scales;     // their int8 row scales [S + 32]
  ScratchBuffer<bf16> out_rows16;    // the packed forward's expert outputs [S, H] as bf16, before combine
  ScratchBuffer<bf16> dgu_panel_rows;     // the packed backward's dgu [S + 32, ldg] bf16 (zero past 2I)

  // Names for buffers that two passes share: the passes never need both at once (forward and backward are
  // separate calls, and a call takes the exact or the packed path), and one buffer costs the larger size only.
  // The packed backward's ForwardCache [S, ForwardCache::row_floats], made when the forward kept none.
  ScratchBuffer<float>& made_cache = pre_activations;
  // The packed backward's fp32 gu [S, 2I] while it makes that cache on the exact path.
  ScratchBuffer<float>& made_pre_activations = dgu;
  // The exact backward's dy per routed row [S, H].
  ScratchBuffer<float>& dy_rows = out_rows;
  // The packed backward's w * dyb [S, r], for dA_d.
  ScratchBuffer<float>& weighted_dyb = dx_rows;
  // The packed backward's dy [S + 32, ldy] bf16: a backward that makes the cache with the packed forward has
  // combined that forward's outputs before it gathers dy.
  ScratchBuffer<bf16>& dy_panel_rows = out_rows16;
  // The packed backward's dx per routed row [S, H] bf16, before combine.
  ScratchBuffer<uint8_t>& dx_rows16 = x_panel_rows;
  // The packed backward's h [S, I] as bf16 (for dA_d), and the output [T, H] of a forward it runs only for its
  // cache (discarded before h is made).
  ScratchBuffer<bf16>& h16 = bf16_operand;
  ScratchBuffer<bf16>& discarded_y16 = bf16_operand;
};

}  // namespace kt

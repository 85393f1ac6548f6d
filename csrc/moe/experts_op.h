// The routed-experts operator of one MoE layer: y = sum_k w[t,k] * down_e(silu(gate_e(x_t)) * up_e(x_t)).
//
// Legend: T = tokens, K = experts per token, E = experts, H = hidden, I = expert intermediate,
// S = routed (token, slot) rows, r = LoRA rank. Weights use transformers' fused layout:
// gate_up [E, 2I, H] (gate rows first), down [E, H, I]. Activations are fp32 or bf16, routing weights
// fp32, accumulation fp32. Weights are fp32, bf16 or block-quantized fp8 (e4m3 with fp32 block scales, as
// DeepSeek-V3 ships them: the unpacked fp8 kernels, and the packed bf16 formats, which pack the e4m3 bytes as they
// are, see packed.h). The weights are borrowed (the Python side owns and keeps them alive).
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "../runtime/thread_pool.h"
#include "experts_scratch.h"
#include "gemm.h"
#include "packed.h"
#include "routing.h"

namespace kt {

// Whether the packed backward keeps a column-packed copy of the bf16 weights (ExpertsOp::project_columns_packed):
// true always, false never, std::nullopt (the default) when it takes under a quarter of the free memory. Set
// from Python (kt_core.config: KT_BACKWARD_WEIGHT_CACHE); read at each backward until a layer has kept its copy.
void set_backward_weight_cache(std::optional<bool> keep);
std::optional<bool> backward_weight_cache();

struct ExpertWeights {
  int num_experts = 0;   // E
  int hidden = 0;        // H
  int intermediate = 0;  // I
  const void* gate_up = nullptr;  // [E, 2I, H]
  const void* down = nullptr;     // [E, H, I]
  DType dtype = DType::kBF16;
  // kFP8E4M3 only: the block scales (weight_scale_inv) of blocks [block_rows, block_cols], fp32,
  // gate_up [E, 2 ceil(I / block_rows), ceil(H / block_cols)] (gate's block rows, then up's: the two are quantized
  // apart; 2I / block_rows when block_rows divides I) and down [E, ceil(H / block_rows), ceil(I / block_cols)].
  const float* gate_up_scale = nullptr;
  const float* down_scale = nullptr;
  int block_rows = 128;
  int block_cols = 128;
};

// Per-expert LoRA: each projection W [out, in] gains scaling * B @ A. fp32, borrowed.
struct LoraFactors {
  int rank = 0;  // 0: no LoRA
  float scaling = 0.f;
  const float* gate_up_a = nullptr;  // [E, r, H]
  const float* gate_up_b = nullptr;  // [E, 2I, r]
  const float* down_a = nullptr;     // [E, r, I]
  const float* down_b = nullptr;     // [E, H, r]
};

// Gradients of the factors above, same shapes; overwritten (zero for experts without tokens).
struct LoraGrads {
  float* gate_up_a = nullptr;
  float* gate_up_b = nullptr;
  float* down_a = nullptr;
  float* down_b = nullptr;
};

struct Activations {
  int T = 0;
  int K = 0;
  DType dtype = DType::kF32;   // of x, y, dy, dx
  const void* x = nullptr;     // [T, H]
  const int64_t* ids = nullptr;  // [T, K]
  const float* w = nullptr;    // [T, K]
};

// The forward's cache for the backward, over the S routed rows of a call: the gate_up pre-activations [S, 2I],
// then the scaled LoRA inputs xa [S, r] and ha [S, r] (fp32). With bf16 activations the pre-activations keep 24
// of fp32's 32 bits (rounded to nearest at bit 8), split in two planes: the high 16 bits [S, 2I] and the next
// 8 bits [S, lo_stride] bytes. 3/4 of the fp32 bytes the forward writes and the backward reads (208 MB instead
// of 277 for a DeepSeek-V2-Lite layer at T=4096) at 2^-16 relative precision: plain bf16 (2^-9) put the
// routing-weight gradient dw = dh . h, a dot product with cancellation, past 1e-2 on single tokens. fp32
// otherwise. Python sizes the buffer from row_floats (kt_core._C.cache_row_floats, kt_core.kernels.cache_row_floats).
struct ForwardCache {
  float* gu = nullptr;       // [S, 2I] fp32, or null
  bf16* gu_hi = nullptr;     // [S, 2I] high halves, or null
  uint8_t* gu_lo = nullptr;  // [S, lo_stride] bits 8-15
  float* xa = nullptr;       // [S, r]
  float* ha = nullptr;       // [S, r]

  // Bytes per row of the low plane: 2I rounded up to whole 4-byte units.
  static int64_t lo_stride(int I) { return (2 * static_cast<int64_t>(I) + 3) / 4 * 4; }
  static int64_t gu_floats(int I, DType act) { return act == DType::kBF16 ? I + lo_stride(I) / 4 : 2 * I; }
  // 4-byte units per routed row.
  static int64_t row_floats(int I, int R, DType act) { return gu_floats(I, act) + 2 * R; }
  // The sections of a cache at `base` (null: all null).
  static ForwardCache at(const float* base, int64_t S, int I, int R, DType act) {
    ForwardCache c;
    if (!base) return c;
    float* b = const_cast<float*>(base);  // the backward reads what the forward wrote through the same view
    if (act == DType::kBF16) {
      c.gu_hi = reinterpret_cast<bf16*>(b);
      c.gu_lo = reinterpret_cast<uint8_t*>(b + S * I);
    } else {
      c.gu = b;
    }
    float* lora = b + S * gu_floats(I, act);
    c.xa = R > 0 ? lora : nullptr;
    c.ha = R > 0 ? lora + S * R : nullptr;
    return c;
  }
};

class ExpertsOp {
 public:
  // `packed`, when given, computes the projections on weights packed by pack(); `kernels` serves the rest
  // (LoRA factors, and every call the packed format does not cover: fp32 weights or activations for bf16).
  // `fp8` computes the projections on fp8 weights that the packed kernels do not (required for fp8 weights). fp8
  // weights are packed by bf16 formats (as e4m3 bytes with their scales) when their blocks are whole 16 x 16 tiles
  // (DeepSeek-V3's 128 x 128 are); the int8 / int4 formats, which quantize bf16 weights, take none.
  ExpertsOp(const ExpertWeights& weights, const GemmKernels* kernels, const PackedKernels* packed = nullptr,
            const Fp8Kernels* fp8 = nullptr);

  // Packs (and for int8 quantizes) the weights for the packed kernels; once, at load.
  void pack(ThreadPool& pool);

  // Saving and reloading what pack() makes, so that a later load skips the packing (an on-disk cache).
  // A blob is one packed buffer, named "gate_up.data", "gate_up.scale", "down.colsum", ... (empty ones are
  // not listed). Blob names and sizes follow from the shapes and the tag alone, before anything is packed.
  struct PackedBlob {
    std::string name;
    uint8_t* data;  // null in packed_layout()
    size_t bytes;
  };
  // Whether pack() packs anything here (bf16 formats leave fp32 weights on the exact path).
  bool packs() const;
  // The layout tag of the packed buffers (packed.h: packed_format_tag), "" when packs() is false.
  std::string packed_format_tag() const;
  // The blobs this op has (after pack() or load_packed()); empty before.
  std::vector<PackedBlob> packed_blobs();
  // The blobs pack() would make: names and sizes.
  std::vector<PackedBlob> packed_layout() const;
  // Takes saved blobs instead of packing: `tag` must be packed_format_tag() and the blobs exactly
  // packed_layout() (names and sizes), else std::invalid_argument and the op is left as it was. Copies them; with
  // `borrow`, keeps pointers to the tiles ("<projection>.data", 64-byte aligned) instead, which the caller keeps
  // alive and unchanged for the op's life (a node's shared file), and copies the rest (scales).
  void load_packed(const std::string& tag, const std::vector<PackedBlob>& blobs, double gate_up_error,
                   double down_error, bool borrow = false);
  // Whether the tiles are borrowed (load_packed with borrow).
  bool packed_borrowed() const { return packed_gate_up_.data.size() > 0 && !packed_gate_up_.data.owned(); }
  // Times pack() has packed the weights (load_packed does not count).
  int pack_count() const { return pack_count_; }
  // Drops the pointers to the weights once they are packed (pack() or load_packed()): the packed forward and
  // backward read only the packed copy (the backward's column blocks are made from the forward's tiles), so the
  // caller may free the weights (KTExperts.release_host_weights: one copy in host RAM). Every call that would read
  // them afterwards throws std::logic_error naming it: a forward or backward off the packed path (fp32 activations
  // on a bf16 format; the exact backward of the int8 / int4 kernels), pack(). fp8 block scales stay borrowed.
  void release_weights();
  bool weights_released() const { return w_.gate_up == nullptr; }
  // Writes the weights back from the packed copy into gate_up [E, 2I, H] and down [E, H, I], in the weights' dtype:
  // exact for the bf16 and fp8 formats (every bit is kept; fp8 scales are the caller's); with `adopt` the op reads
  // them from there on (after release_weights: nothing is packed again). std::logic_error for the int8 / int4
  // formats (their copy is quantized) and before packing.
  void unpack_weights(ThreadPool& pool, void* gate_up, void* down, bool adopt);

  // y [T, H] in act.dtype. cache, when given, receives what backward would otherwise recompute: the
  // gate_up pre-activations [S, 2I] followed by the scaled LoRA inputs of gate_up [S, r] and of down [S, r]
  // (laid out as ForwardCache; S <= T * K rows).
  void forward(ThreadPool& pool, const Activations& act, const LoraFactors& lora, void* y, float* cache);

  // dx [T, H] in act.dtype, dw [T, K] fp32 (zero for slots of -1), and the LoRA gradients when
  // lora.rank > 0. cache: what forward stored, or nullptr to recompute.
  void backward(ThreadPool& pool, const Activations& act, const LoraFactors& lora, const void* dy, void* dx, float* dw,
                const float* cache, const LoraGrads& grads);

  const ExpertWeights& weights() const { return w_; }
  const GemmKernels& kernels() const { return *k_; }
  // Relative Frobenius error of the quantized weights, gate_up and down (0 when not quantized).
  double gate_up_error() const { return packed_gate_up_.rel_error; }
  double down_error() const { return packed_down_.rel_error; }
  int64_t packed_bytes() const { return packed_gate_up_.data.size() + packed_down_.data.size(); }
  // Whether a call with these activations runs on the packed weights (forward; backward for bf16 only).
  bool packed_forward(DType act) const;
  bool packed_backward(DType act) const;
  // The format of the packed weights: the kernel's, or kFP8 for fp8 weights on a bf16 format.
  PackedFormat packed_format() const;

 private:
  void forward_packed(ThreadPool& pool, const Routing& r, const Activations& act, const LoraFactors& lora, void* y,
                      float* cache);
  // Activation rows for the packed kernels: bf16 or int8 (+ per-row scale), padded to `width` and 32 extra rows.
  void gather_packed(ThreadPool& pool, const Routing& r, const void* src, DType t, int cols, int width, uint8_t* dst,
                     float* scales) const;
  // c [rows, cols] (=|+=) a . W[:, cols], W [K, N] an expert's weights, through the packed panels on column blocks
  // made per task from the forward's tiles of W (no transposed copy kept; the weights themselves are not read).
  // `columns` keeps those column blocks of every expert once made (the weights are frozen): a second copy of
  // the weights in exchange for not re-reading them column-wise on every backward. Kept when it takes under a
  // quarter of the free memory at the first backward, unless set_backward_weight_cache() says always / never.
  // With R > 0, also c += p . A[e][:, cols] (p [S, R] by row, A [E, R, N]: a LoRA down-projection's factor).
  // The rows go to c as fp32 or, when c is null, to c16 as bf16.
  // W is W_gu [2I, H] (gate_up) or W_d [H, I], bf16 or fp8 (the fp8 column blocks carry their block scales).
  void project_columns_packed(ThreadPool& pool, const Routing& r, const bf16* a, int lda, bool gate_up, float* c,
                              bf16* c16, AlignedBuffer& columns, const float* p = nullptr, int R = 0,
                              const float* lora_a = nullptr);
  // Whether fp8 weights are packed here: a bf16 format with an fp8 panel, and blocks of whole 16 x 16 tiles.
  bool packs_fp8() const;
  // The layout pack() makes for W_gu (gate_up) or W_d: sizes of every buffer, zeroed.
  PackedTensor packed_tensor_layout(bool gate_up, bool allocate_data = true) const;
  // The backward on packed weights (bf16 activations; bf16 or fp8 weights): see experts_backward.cpp.
  void backward_packed(ThreadPool& pool, const Routing& r, const Activations& act, const LoraFactors& lora,
                       const void* dy, void* dx, float* dw, const float* cache, const LoraGrads& grads);
  void gather_rows(ThreadPool& pool, const Routing& r, const void* src, DType t, float* dst) const;
  void gate_up(ThreadPool& pool, const Routing& r, DType act, const float* xg, const LoraFactors& lora, float* xa,
               float* gu);
  void activate(ThreadPool& pool, const Routing& r, const float* gu, float* h) const;
  void down(ThreadPool& pool, const Routing& r, DType act, const float* h, const LoraFactors& lora, float* ha,
            float* out);
  // gate_up and down: the projection through W_gu or W_d with its LoRA term (experts_op.cpp).
  void project_with_lora(ThreadPool& pool, const Routing& r, DType act, bool gate_up, const float* a,
                         const LoraFactors& lora, float* za, float* c);
  // C[rows, cols] = A[rows, in] @ W[cols, in]^T for rows row0.. of W_gu[e] (gate_up) or W_d[e], through the
  // bf16 dot kernel when `bf16_dot`.
  void project(bool bf16_dot, bool gate_up, int e, int row0, int rows, int cols, const float* a, const bf16* a_bf16,
               float* c, int ldc) const;
  // C[rows, cols] = A[rows, K] @ W[:, col0 : col0 + cols] for W = W_gu[e] [2I, H] (gate_up) or W_d[e] [H, I]:
  // the backward's products against the weights, without a transposed copy.
  void project_back(bool gate_up, int e, int col0, int rows, int cols, const float* a, int lda, float* c,
                    int ldc) const;
  // W_gu[e] or W_d[e] (fp8 weights) seen from (row0, col0).
  Fp8View fp8_view(bool gate_up, int e, int row0, int col0) const;
  void combine(ThreadPool& pool, const Routing& r, const float* rows, const float* scale, DType t, void* out) const;
  // combine for bf16 expert rows [S, H] and a bf16 output (the packed forward and backward; AVX-512); a null
  // scale weighs every row 1.
  void combine_bf16_rows(ThreadPool& pool, const Routing& r, const bf16* rows, const float* scale, bf16* out) const;
  void for_each_block(ThreadPool& pool, const Routing& r, int cols,
                      const std::function<void(int e, int64_t row0, int rows, int col0, int ncols)>& fn) const;
  void for_each_expert(ThreadPool& pool, const Routing& r,
                       const std::function<void(int e, int64_t row0, int rows)>& fn) const;
  // Tasks over (expert, chunk of at most `chunk` rows) for experts with rows: per-expert tasks alone leave
  // threads idle with 64 or 128 experts.
  void for_each_row_chunk(ThreadPool& pool, const Routing& r, int64_t chunk,
                          const std::function<void(int e, int64_t row0, int rows)>& fn) const;
  // fp32 rows [S, 2I] to the cache's 24-bit planes and back, in parallel (the exact path; the packed one
  // splits in its epilogue).
  void split_pre_activations(ThreadPool& pool, int64_t S, const float* gu, const ForwardCache& cache) const;
  void merge_pre_activations(ThreadPool& pool, int64_t S, const ForwardCache& cache, float* gu) const;

  // Element i of a weight tensor, W_gu[e] row `row`, W_d[e] row `row` (either dtype).
  const void* weight_element(const void* base, int64_t i) const;
  const void* gate_up_weights(int e, int row) const;
  const void* down_weights(int e, int row) const;
  bool use_bf16_dot(DType act) const;
  // Throws std::logic_error when the weights were released (release_weights): `what` reads them.
  void require_weights(const char* what) const;

  // One call of each long pass, as the phases it books with PhaseLaps (experts_backward.cpp, experts_packed.cpp),
  // on top of what every pass reads (PassContext, below the class).
  struct PassContext;
  struct ExactBackward;
  struct PackedForward;
  struct PackedBackward;

  ExpertWeights w_;
  const GemmKernels* k_;
  const PackedKernels* pk_ = nullptr;
  // The packed passes' work around the panels, in the instruction set of the packed kernels (packed.h).
  const PackedRowOps& row_ops() const { return *pk_->ops; }
  const Fp8Kernels* fp8_ = nullptr;
  PackedTensor packed_gate_up_, packed_down_;
  int pack_count_ = 0;
  AlignedBuffer down_columns_, gate_up_columns_;  // the backward's column blocks of W_d and W_gu
  std::mutex call_mutex_;  // scratch_ serves one call at a time
  ExpertsScratch scratch_;
};

// What one call of a pass works on: the op, the pool, the routing, the inputs, the LoRA factors and the sizes.
struct ExpertsOp::PassContext {
  ExpertsOp& op;
  ThreadPool& pool;
  const Routing& r;
  const Activations& act;
  const LoraFactors& lora;
  const int H, I, I2, R;  // hidden, intermediate, 2 * intermediate, LoRA rank
  const int64_t S;        // routed rows of the call

  PassContext(ExpertsOp& op, ThreadPool& pool, const Routing& r, const Activations& act, const LoraFactors& lora)
      : op(op),
        pool(pool),
        r(r),
        act(act),
        lora(lora),
        H(op.w_.hidden),
        I(op.w_.intermediate),
        I2(2 * I),
        R(lora.rank),
        S(r.num_rows()) {}
};

}  // namespace kt

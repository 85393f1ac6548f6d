// Dense GEMM building blocks of the experts operator, one table per instruction set.
//
// Each table lives in its own translation unit compiled for its ISA; the dispatcher (kernels.cpp) hands
// out only tables this CPU runs. Everything here is fp32-accumulating. Layouts (all row-major):
//   nt: C[M,N] (+)= A[M,K] . B[N,K]^T   (forward: activations x weights [out, in])
//   nn: C[M,N] (+)= A[M,K] . B[K,N]     (backward: gradients x weights, no transposed copy needed)
//   tn: C[M,N] (+)= A[K,M]^T . B[K,N]   (LoRA factor gradients; fp32 only)
#pragma once

#include <cstdint>

namespace kt {

using bf16 = uint16_t;

// kFP8E4M3: weights only, block-quantized as DeepSeek-V3 ships them (Fp8View below).
enum class DType { kF32, kBF16, kFP8E4M3 };

struct GemmKernels {
  const char* name;
  // B (weights) fp32 or bf16, A and C fp32.
  void (*nt)(int M, int N, int K, const float* A, int lda, const void* B, DType b_type, int ldb, float* C, int ldc,
             bool accumulate);
  void (*nn)(int M, int N, int K, const float* A, int lda, const void* B, DType b_type, int ldb, float* C, int ldc,
             bool accumulate);
  void (*tn)(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc, bool accumulate);
  // bf16 x bf16 -> fp32 with native dot-product instructions, or nullptr where the ISA has none.
  void (*nt_bf16)(int M, int N, int K, const bf16* A, int lda, const bf16* B, int ldb, float* C, int ldc,
                  bool accumulate);
};

// A block-quantized e4m3 weight matrix (DeepSeek-V3 / Kimi FP8 release) seen from (row0, col0): element (r, c)
// of the view is q[(row0 + r) * ld + col0 + c] * scale[scale_row(row0 + r) * ld_scale + (col0 + c) / block_cols],
// the scale being the checkpoint's weight_scale_inv. The product is rounded once to fp32: the weight the kernels
// use is exactly `q.float() * scale`, what an fp32 dequantization holds.
struct Fp8View {
  const uint8_t* q = nullptr;    // the whole matrix, e4m3 bytes, row stride ld
  const float* scale = nullptr;  // its block scales [ceil(rows / block_rows), ld_scale]
  int ld = 0;
  int ld_scale = 0;
  int block_rows = 128;
  int block_cols = 128;
  int row0 = 0;
  int col0 = 0;
  // Rows from `split` on start a new row of blocks (0: none). gate_up [2I, H] fuses gate [I, H] and up [I, H],
  // quantized apart: its scales are gate's ceil(I / block_rows) block rows, then up's.
  int split = 0;

  // The block row of matrix row `row`, and the first row past that block.
  int scale_row(int row) const {
    if (split > 0 && row >= split) return (split + block_rows - 1) / block_rows + (row - split) / block_rows;
    return row / block_rows;
  }
  int block_end(int row) const {
    if (split > 0 && row >= split) return split + ((row - split) / block_rows + 1) * block_rows;
    const int end = (row / block_rows + 1) * block_rows;
    return split > 0 && end > split ? split : end;
  }
  const float* scales_of_row(int row) const { return scale + static_cast<int64_t>(scale_row(row)) * ld_scale; }
};

// GEMMs against fp8 weights, which convert e4m3 to fp32 in registers (no dequantized copy); A and C fp32.
struct Fp8Kernels {
  const char* name;
  // C[M,N] (+)= A[M,K] . B^T, B the view [N, K].
  void (*nt)(int M, int N, int K, const float* A, int lda, const Fp8View& B, float* C, int ldc, bool accumulate);
  // C[M,N] (+)= A[M,K] . B, B the view [K, N].
  void (*nn)(int M, int N, int K, const float* A, int lda, const Fp8View& B, float* C, int ldc, bool accumulate);
};

extern const GemmKernels kPortableKernels;
extern const GemmKernels kAvx2Kernels;
extern const GemmKernels kAvx512Kernels;
extern const GemmKernels kAvx512Bf16Kernels;
extern const Fp8Kernels kFp8PortableKernels;
extern const Fp8Kernels kFp8Avx2Kernels;
extern const Fp8Kernels kFp8Avx512Kernels;

// Conversions shared by the operator code (internal linkage: safe to include from any ISA's unit).
static inline float bf16_to_f32(bf16 v) {
  union {
    uint32_t u;
    float f;
  } bits;
  bits.u = static_cast<uint32_t>(v) << 16;
  return bits.f;
}

static inline bf16 f32_to_bf16(float v) {  // round to nearest even, NaN stays NaN
  union {
    float f;
    uint32_t u;
  } bits;
  bits.f = v;
  if ((bits.u & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16>((bits.u >> 16) | 0x40);
  const uint32_t rounding = 0x7fffu + ((bits.u >> 16) & 1u);
  return static_cast<bf16>((bits.u + rounding) >> 16);
}

// e4m3 (bias 7, no infinities, S.1111.111 is NaN) to fp32, exactly.
static inline float fp8_e4m3_to_f32(uint8_t v) {
  union {
    uint32_t u;
    float f;
  } bits;
  const uint32_t sign = static_cast<uint32_t>(v & 0x80u) << 24;
  const uint32_t exponent = (v >> 3) & 0xfu, mantissa = v & 0x7u;
  if ((v & 0x7fu) == 0x7fu) {
    bits.u = sign | 0x7fc00000u;
  } else if (exponent == 0) {  // subnormal: mantissa * 2^-9, exact in fp32
    bits.f = static_cast<float>(mantissa) * (1.f / 512.f);
    bits.u |= sign;
  } else {
    bits.u = sign | (exponent + 120u) << 23 | mantissa << 20;
  }
  return bits.f;
}

}  // namespace kt

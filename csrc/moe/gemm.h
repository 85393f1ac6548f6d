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

enum class DType { kF32, kBF16 };

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

extern const GemmKernels kPortableKernels;
extern const GemmKernels kAvx2Kernels;
extern const GemmKernels kAvx512Kernels;
extern const GemmKernels kAvx512Bf16Kernels;

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

}  // namespace kt

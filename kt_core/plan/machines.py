"""Machines the projection knows. Speeds are effective ones (what our kernels reach), not data-sheet peaks.

Measured on the GPU test machine (benchmarks/RESULTS.md; one H200 or H100 with 16 AMX Xeon cores): 50-55 GB/s
pinned host -> GPU, the streamed experts' grouped GEMMs at ~300 TFLOP/s (bf16, DeepSeek-V2-Lite at 16 x 2048 tokens:
~3,000 rows per expert), and the CPU operator on 15 threads of its 16 AMX Xeon cores (one left to the driving thread)
on full-width DeepSeek-V3 layers, counted as the planner counts (4 passes of 2 x 3 x H x I per routed slot): a mixed
split's CPU share ran at 4.3 TFLOP/s on bf16 experts (8,192 tokens per step, H200, 2026-12-04) and at 4.3-4.95 on FP8
experts dequantized in registers (8,192 and 32,768 tokens, H100, 2026-12-06), as the streaming runtime times it; with
every expert of a layer on the CPU the operator's time came to ~3.0 TFLOP/s as counted (FP8, 8,192 tokens, H200;
2.65 at 2,048 tokens, H100): `ALL_CPU_SPEED`, which the projection applies to bf16 all-CPU runs too (not measured at
this width). Streamed FP8 experts are multiplied from e4m3 (kt_core/streaming/fp8_gemm.py); counted the same way
(5 passes), their GPU share ran at ~100, ~228 and ~290 TFLOP/s at 64, 256 and 1,024 rows per expert (full-width
DeepSeek-V3 at 2,048, 8,192 and 32,768 tokens per step, H100, 2026-12-06): `fp8_gpu_speed` is the saturating curve
through those points. Other machines scale these:
CPU by AMX cores (the same kernels), GPU by the data-sheet bf16 peak (the same kernels at the same share of peak),
PCIe by the link generation. Those scalings are assumptions until measured there.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ALL_CPU_SPEED", "MACHINES", "Machine", "fp8_gpu_speed"]

GIB = 2**30
H200_EFFECTIVE_SHARE = 300e12 / 989e12  # our grouped GEMMs at training batch sizes vs the H200's bf16 dense peak
CPU_FLOPS_PER_AMX_CORE = 4.3e12 / 15  # a mixed split's CPU share (bf16 and FP8 experts), 15 threads measured
ALL_CPU_SPEED = 3.0 / 4.3  # the operator with every expert of a layer, against a mixed split's share (as counted)
FP8_GEMM_PEAK = 342 / 300  # the e4m3 grouped GEMMs' fitted peak, against the bf16 GEMMs' effective speed
FP8_GEMM_HALF_ROWS = 128  # rows per expert at which they reach half that peak
H200_MACHINE_CPU_THREADS = 15  # the operator's threads on the 16-core GPU test machine


def fp8_gpu_speed(rows_per_expert: float) -> float:
    """Streamed FP8 experts' GPU share against bf16 GEMMs, at a step's rows (routed slots) per expert."""
    return FP8_GEMM_PEAK * rows_per_expert / (rows_per_expert + FP8_GEMM_HALF_ROWS)


@dataclass(frozen=True)
class Machine:
    name: str
    gpus: int
    gpu_bytes: int  # per GPU
    gpu_flops: float  # per GPU, effective
    pcie_bytes_per_s: float  # per GPU link, effective
    cpu_flops: float  # a mixed split's CPU share, effective (every expert on the CPU: x ALL_CPU_SPEED)
    host_bytes: int
    about: str


MACHINES = {
    m.name: m
    for m in (
        Machine("h200-16c", 1, 140 * GIB, 300e12, 50e9, H200_MACHINE_CPU_THREADS * CPU_FLOPS_PER_AMX_CORE, 125 * GIB,
                "the GPU test machine, measured: one H200, 16 AMX Xeon cores, 125 GiB"),
        Machine("h100-16c", 1, 80 * GIB, 300e12, 50e9, H200_MACHINE_CPU_THREADS * CPU_FLOPS_PER_AMX_CORE, 125 * GIB,
                "the GPU test machine with an H100 80 GB (same bf16 peak and host), measured"),
        Machine("kt-2x4090-8488c", 2, 48 * GIB, 165e12 * H200_EFFECTIVE_SHARE, 25e9, 96 * CPU_FLOPS_PER_AMX_CORE,
                1536 * GIB, "KTransformers' published class: 2 x RTX 4090 48 GB (PCIe 4), 2 x Xeon 8488C, 1.5 TiB"),
        Machine("h200-2s", 1, 140 * GIB, 300e12, 50e9, 96 * CPU_FLOPS_PER_AMX_CORE, 1536 * GIB,
                "one H200 + a 2-socket 96-core AMX server with 1.5 TiB"),
    )
}  # fmt: skip

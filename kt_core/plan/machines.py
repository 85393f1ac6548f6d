"""Machines the projection knows. Speeds are effective ones (what our kernels reach), not data-sheet peaks.

Measured on the H200 machine (benchmarks/RESULTS.md): 50-55 GB/s pinned host -> GPU, the streamed experts'
grouped GEMMs at ~300 TFLOP/s, and the CPU operator on 15 threads of its 16 AMX Xeon cores (one left to the
driving thread) on full-width DeepSeek-V3 layers at 8,192 tokens per step (2026-12-04), counted as the planner
counts (4 passes of 2 x 3 x H x I per routed slot): 4.3 TFLOP/s on bf16 experts (the mixed split's CPU calls as
the streaming runtime times them), ~3.0 on FP8 experts dequantized in registers (the all-CPU run); the streamed FP8
experts' GPU share ran at ~60 TFLOP/s counted the same way (5 passes), a fifth of the bf16 GEMMs' 300: the GPU
dequantizes each group of experts into its bf16 buffer before their GEMMs, on the same stream (the FP8 streamed run,
2026-12-04, 0.47 s of GPU per MoE layer). Other machines
scale these: CPU by AMX cores (the same kernels), GPU by the data-sheet bf16 peak (the same kernels at the same
share of peak), PCIe by the link generation. Those scalings are assumptions until measured there.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FP8_CPU_SPEED", "FP8_GPU_SPEED", "MACHINES", "Machine"]

GIB = 2**30
H200_EFFECTIVE_SHARE = 300e12 / 989e12  # our grouped GEMMs at training batch sizes vs the H200's bf16 dense peak
CPU_FLOPS_PER_AMX_CORE = 4.3e12 / 15  # the CPU operator's LoRA passes on bf16 experts, 15 threads measured
FP8_CPU_SPEED = 3.0 / 4.3  # the operator's speed on FP8 experts against bf16 (the in-register dequantization)
FP8_GPU_SPEED = 60 / 300  # streamed FP8 experts' GPU share against bf16 (dequantization into the bf16 buffer)
H200_MACHINE_CPU_THREADS = 15  # the operator's threads on the 16-core GPU test machine


@dataclass(frozen=True)
class Machine:
    name: str
    gpus: int
    gpu_bytes: int  # per GPU
    gpu_flops: float  # per GPU, effective
    pcie_bytes_per_s: float  # per GPU link, effective
    cpu_flops: float  # the CPU operator on bf16 experts, effective (FP8: x FP8_CPU_SPEED)
    host_bytes: int
    about: str


MACHINES = {
    m.name: m
    for m in (
        Machine("h200-16c", 1, 140 * GIB, 300e12, 50e9, H200_MACHINE_CPU_THREADS * CPU_FLOPS_PER_AMX_CORE, 125 * GIB,
                "the GPU test machine, measured: one H200, 16 AMX Xeon cores, 125 GiB"),
        Machine("kt-2x4090-8488c", 2, 48 * GIB, 165e12 * H200_EFFECTIVE_SHARE, 25e9, 96 * CPU_FLOPS_PER_AMX_CORE,
                1536 * GIB, "KTransformers' published class: 2 x RTX 4090 48 GB (PCIe 4), 2 x Xeon 8488C, 1.5 TiB"),
        Machine("h200-2s", 1, 140 * GIB, 300e12, 50e9, 96 * CPU_FLOPS_PER_AMX_CORE, 1536 * GIB,
                "one H200 + a 2-socket 96-core AMX server with 1.5 TiB"),
    )
}  # fmt: skip

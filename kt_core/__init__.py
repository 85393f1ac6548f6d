"""kt_core: the shared runtime of kt-plugins.

Routed MoE experts live in host memory and run on the CPU (C++ kernels: AMX / AVX-512 / AVX2 / portable)
while the rest of the model stays on the GPU. Host-framework plugins (kt_plugins.*) build on this API.

Operator
    KTExperts            drop-in replacement for transformers' `*Experts` modules
    ExpertLoRA           per-expert LoRA factors in host memory
    experts_reference    plain-torch reference of the operator (tests, fallback)
Kernels
    available_kernels    variants this CPU runs, best first (KT_KERNEL forces one)
    cpu_features         instruction-set extensions seen at run time
Runtime
    get_thread_pool      the process-wide pool of `cpu_infer` threads
"""

from kt_core.experts import KTExperts
from kt_core.kernels import available_kernels, cpu_features
from kt_core.lora import ExpertLoRA
from kt_core.reference import experts_reference
from kt_core.runtime.pool import get_thread_pool

__all__ = [
    "ExpertLoRA",
    "KTExperts",
    "available_kernels",
    "cpu_features",
    "experts_reference",
    "get_thread_pool",
]

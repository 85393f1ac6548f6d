"""Split each MoE layer between CPU compute and GPU compute on PCIe-streamed expert weights.

    rt = kt_core.enable_streaming(model, gpu_memory_budget="10GiB", device="cuda:0")

planner.py      cost model and per-layer choice of the streamed experts
store.py        pinned host store (cudaHostRegister in place), two device slots on a side stream, residents, int8
gpu_experts.py  grouped-GEMM expert MLP + LoRA with a hand-written backward
hybrid.py       HybridExperts: the split, CPU share on a worker thread, GPU share on the main thread
runtime.py      StreamingRuntime (prefetch order, statistics, per-step logs) and enable_streaming
"""

from kt_core.streaming.hybrid import HybridExperts
from kt_core.streaming.planner import CostModel, LayerPlan, plan_layer
from kt_core.streaming.runtime import StreamingRuntime, enable_streaming
from kt_core.streaming.store import ExpertStore

__all__ = [
    "CostModel",
    "ExpertStore",
    "HybridExperts",
    "LayerPlan",
    "StreamingRuntime",
    "enable_streaming",
    "plan_layer",
]

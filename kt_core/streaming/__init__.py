"""Split each MoE layer between CPU compute and GPU compute on PCIe-streamed expert weights.

    rt = kt_core.enable_streaming(model, expert_gpu_memory="10GiB", device="cuda:0")

planner.py      cost model and per-layer choice of the streamed experts
store.py        pinned host store (cudaHostRegister in place), two device slots on a side stream, residents, int8
gpu_experts.py  grouped-GEMM expert MLP + LoRA with a hand-written backward
share.py        StreamedShare: the GPU share attached to each KTExperts layer (device path, GPU parts)
runtime.py      StreamingRuntime (prefetch order, statistics, per-step logs)
enable.py       enable_streaming: checks the layers, sizes the expert memory, builds the store and the runtime
memory_plan.py  the GPU memory of a training run, planned before it allocates (public as a module)
model_dims.py   what that plan reads of a model (each decoder layer's linears, the routed experts' shapes)

The split itself (which slots go to the CPU, staging, the autograd bridge) belongs to the layer:
kt_core/experts/.
"""

from kt_core.streaming import memory_plan
from kt_core.streaming.enable import enable_streaming
from kt_core.streaming.planner import CostModel, LayerPlan, plan_layer
from kt_core.streaming.runtime import StreamingRuntime
from kt_core.streaming.share import StreamedShare
from kt_core.streaming.store import ExpertStore

__all__ = [
    "CostModel",
    "ExpertStore",
    "LayerPlan",
    "StreamedShare",
    "StreamingRuntime",
    "enable_streaming",
    "memory_plan",
    "plan_layer",
]

"""One MoE layer's routed experts: `KTExperts`, computed by the CPU operator and, where a GPU share is
attached, partly on a GPU.

layer.py    KTExperts: the weights (host memory), expert LoRA, the C++ operator, the attached GPU share
bridge.py   the one autograd bridge: the CPU part, and the GPU part when a share is attached
share.py    what a GPU share provides (streaming's StreamedShare, SGLang's GPU experts)
split.py    the split of a call's slots between the CPU operator and the GPU weight sets
staging.py  inputs to pinned host memory with one wait, results and LoRA factors back to the device
stream_ordered.py  the CPU share enqueued on a CUDA stream without a host wait (serving, CUDA graphs)
"""

from kt_core.experts.layer import KTExperts
from kt_core.experts.share import GpuCall, GpuShare
from kt_core.experts.stream_ordered import PinnedArenas, StreamOrderedForward

__all__ = ["GpuCall", "GpuShare", "KTExperts", "PinnedArenas", "StreamOrderedForward"]

"""Loading checkpoints: reader, meta-device build, memory plan, streaming loader, FP8, multi-GPU split,
and the resume check of training checkpoints."""

from kt_core.loading.checkpoint import Checkpoint, CheckpointError, TensorInfo
from kt_core.loading.convert import convert_model
from kt_core.loading.fp8 import dequantize_fp8_blockwise, quantize_fp8_blockwise
from kt_core.loading.loader import load_model, plan_memory
from kt_core.loading.memory import MemoryPlan, MemoryPlanError, parse_size
from kt_core.loading.multi_gpu import layer_devices_from_transfer_map, split_layers
from kt_core.loading.resume import check_training_checkpoint, last_good_checkpoint

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "MemoryPlan",
    "MemoryPlanError",
    "TensorInfo",
    "check_training_checkpoint",
    "convert_model",
    "dequantize_fp8_blockwise",
    "last_good_checkpoint",
    "layer_devices_from_transfer_map",
    "load_model",
    "parse_size",
    "plan_memory",
    "quantize_fp8_blockwise",
    "split_layers",
]

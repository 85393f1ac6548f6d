"""The memory plan: bytes per GPU and in host RAM, computed from shard headers before any load.

Host RAM holds the expert stores (their full size once loaded) plus one experts layer being read
(the staging peak), plus any non-expert tensor placed on the CPU.

This plan covers loading (the weights). What a training run adds on the GPU (LoRA state, streaming slots and
residents, activations, the loss) is planned in kt_core/streaming/memory_plan.py, which raises the same
MemoryPlanError.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from kt_core.settings import parse_size  # the one size parser; importable from here too

__all__ = [
    "MemoryPlan",
    "MemoryPlanError",
    "available_gpu_bytes",
    "available_host_bytes",
    "expert_store_bytes",
    "parse_size",
]


class MemoryPlanError(RuntimeError):
    """The model, or the training run, does not fit the GPUs or host RAM at hand; raised before it allocates."""


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**26 else f"{n / 2**20:.2f} MiB"


def expert_store_bytes(
    num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype, block: tuple[int, int] | None = None
) -> int:
    """Host bytes of one layer's routed-expert store: gate_up [E, 2I, H] and down [E, H, I] in `dtype`, and for
    fp8 (float8_e4m3fn: 1 byte a weight) their fp32 block scales (`block`, default 128 x 128)."""
    from kt_core.loading.fp8 import DEFAULT_BLOCK, expert_scale_shapes

    E, H, I = num_experts, hidden, intermediate
    item = torch.empty((), dtype=dtype).element_size()
    total = 3 * E * H * I * item
    if dtype == torch.float8_e4m3fn:
        for shape in expert_scale_shapes(E, H, I, block or DEFAULT_BLOCK):
            total += shape[0] * shape[1] * shape[2] * 4
    return total


def available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def available_gpu_bytes(device: str) -> int | None:
    """Free memory on a CUDA device, or None for other devices."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(dev)
    return int(free)


@dataclass
class MemoryPlan:
    """What loading will use.

    Attributes:
        device_bytes: {device: bytes of non-expert tensors (and GPU-kept experts) placed there}.
        expert_bytes: bytes of the expert stores in host RAM.
        staging_bytes: largest experts layer as read from the checkpoint (the loading peak on top).
    """

    device_bytes: dict[str, int] = field(default_factory=dict)
    expert_bytes: int = 0
    staging_bytes: int = 0

    @property
    def host_bytes(self) -> int:
        cpu = sum(b for d, b in self.device_bytes.items() if torch.device(d).type == "cpu")
        return self.expert_bytes + self.staging_bytes + cpu

    @property
    def gpu_bytes(self) -> dict[str, int]:
        return {d: b for d, b in self.device_bytes.items() if torch.device(d).type != "cpu"}

    def __str__(self) -> str:
        gpus = ", ".join(f"{d} {format_bytes(b)}" for d, b in self.gpu_bytes.items()) or "none"
        return (
            f"memory plan: GPU {gpus}; host {format_bytes(self.host_bytes)} "
            f"(experts {format_bytes(self.expert_bytes)} "
            f"+ one layer staging {format_bytes(self.staging_bytes)})"
        )

    def check(
        self,
        *,
        gpu_memory_limit: int | str | Mapping[str, int | str] | None = None,
        host_memory_limit: int | str | None = None,
    ) -> None:
        """Raises MemoryPlanError when the plan does not fit.

        Args:
            gpu_memory_limit: bytes usable per GPU (one value for all, or {device: value}); None uses
                the free memory CUDA reports.
            host_memory_limit: bytes of host RAM usable; None uses MemAvailable.
        """
        problems = []
        for device, need in self.gpu_bytes.items():
            per_device = isinstance(gpu_memory_limit, Mapping)
            limit_value = gpu_memory_limit.get(device) if per_device else gpu_memory_limit
            key = "gpu_memory_limit" if not per_device else f"gpu_memory_limit[{device!r}]"
            limit = parse_size(limit_value, key) if limit_value is not None else available_gpu_bytes(device)
            source = "gpu_memory_limit" if limit_value is not None else "free memory reported by CUDA"
            if limit is not None and need > limit:
                problems.append(
                    f"{device} needs {format_bytes(need)} for its weights but {format_bytes(limit)} is "
                    f"available ({source}). Spread the layers over more GPUs "
                    "(device=['cuda:0', 'cuda:1', ...]) or place some modules on the CPU with a rule."
                )
        limit = (
            parse_size(host_memory_limit, "host_memory_limit")
            if host_memory_limit is not None
            else available_host_bytes()
        )
        source = "host_memory_limit" if host_memory_limit is not None else "MemAvailable in /proc/meminfo"
        if limit is not None and self.host_bytes > limit:
            problems.append(
                f"host RAM needs {format_bytes(self.host_bytes)} (experts {format_bytes(self.expert_bytes)}, "
                f"staging {format_bytes(self.staging_bytes)}, CPU-placed modules "
                f"{format_bytes(self.host_bytes - self.expert_bytes - self.staging_bytes)}) but "
                f"{format_bytes(limit)} is available ({source}). Use a machine with more RAM, or keep some "
                "experts layers on a GPU with a rule."
            )
        if problems:
            raise MemoryPlanError("The model does not fit:\n  - " + "\n  - ".join(problems) + f"\n({self})")

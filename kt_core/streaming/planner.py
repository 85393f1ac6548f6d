"""Which experts of a MoE layer the CPU computes and which the GPU computes on streamed weights.

Per layer and step, the cost of an expert set is modeled as

    CPU   cpu_passes  * (2 * 3 * H * I * slots_on_cpu) / cpu_flops + cpu_expert_s * experts_on_cpu
          + cpu_calls * cpu_call_s                               (only when the CPU has slots)
    PCIe  pcie_passes * streamed_experts * expert_bytes / pcie_bytes_per_s   (the bytes as streamed: FP8 1 a weight
                                                                             + block scales, int8 + row scales)
    GPU   gpu_passes  * (2 * 3 * H * I * slots_on_gpu) / gpu_flops

and the three run at the same time (CPU thread, side-stream copies, compute stream), so a layer costs
their maximum. Streaming an expert costs the same bytes whatever its token count while its CPU cost grows
with it, so the best split streams the experts with the most routed slots: the planner sorts them and
picks how many to stream (within the slot capacity the GPU memory budget allows). Experts resident on
the GPU cost no PCIe time and are always computed there.

A CPU share also costs a fixed amount per call (copying the routing and hidden states to the host, the
thread hand-off, the small GEMM tails: ~15 ms per call measured on the H200 machine), paid once per pass
(cpu_calls: forward, recomputation, backward). The GPU side pays it as well: a mixed split takes the host
path, whose synchronisation drains the GPU's queue. So a CPU share is only given when it takes enough
work off a PCIe- or GPU-bound layer to pay for both.

Passes per training step with gradient checkpointing: the CPU runs forward, recomputed forward and
backward (~2x a forward): 4; a streamed layer crosses PCIe twice (forward; backward, shared with the
recomputation); the GPU runs forward, recomputed forward and a backward that also recomputes: 5.

The measured speeds replace the defaults as steps run (exponential moving averages of what the
streaming runtime times), so the split follows the machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kt_core.loading.fp8 import expert_scale_bytes

__all__ = [
    "DEQUANT_BYTES",
    "PIECE_ROWS",
    "STAGE_BYTES",
    "CostModel",
    "LayerPlan",
    "allocator_margin",
    "dequant_buffer_bytes",
    "dequant_group",
    "expert_memory_split",
    "plan_layer",
    "slot_bytes_per_expert",
    "slot_capacity",
    "stage_bytes",
    "stored_expert_bytes",
]

MODES = ("auto", "cpu", "gpu")
FP8_WORKING_ITEM = 2  # bytes a weight of the bf16 buffer FP8 experts are dequantized into (store.FP8_WORKING_DTYPE)
PIECE_ROWS = 32768  # sorted slots per piece of a device-path call (bounds its intermediates)
DEQUANT_BYTES = 512 * 2**20  # default size of the bf16 buffer FP8 experts are dequantized into, a group at a time
STAGE_BYTES = 64 * 2**20  # the staging buffer the packed copy's tiles cross PCIe into (kt_core/streaming/tiles.py)


def allocator_margin(limit: int) -> int:
    """Bytes of a gpu_memory_limit left unplanned for the CUDA allocator's rounding and fragmentation."""
    return max(2**28, limit // 50)


@dataclass
class CostModel:
    """Speeds the planner trades off; `observe_*` folds measurements in."""

    pcie_bytes_per_s: float = 50e9  # pinned host -> H200 measured 50-55 GB/s
    cpu_flops: float = 0.8e12  # the CPU operator's effective speed measured on 16 Xeon cores
    gpu_flops: float = 300e12
    cpu_expert_s: float = 20e-6  # fixed CPU cost per expert that has slots (scheduling, small GEMM tails)
    cpu_call_s: float = 15e-3  # fixed cost of a call with a CPU share (host copies, synchronisation, hand-off)
    cpu_calls: float = 3.0  # calls per step with checkpointing: forward, recomputation, backward
    cpu_passes: float = 4.0
    pcie_passes: float = 2.0
    gpu_passes: float = 5.0
    smoothing: float = 0.5  # weight of a new measurement

    def _mix(self, old: float, new: float) -> float:
        return (1 - self.smoothing) * old + self.smoothing * new

    def observe_pcie(self, nbytes: float, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            self.pcie_bytes_per_s = self._mix(self.pcie_bytes_per_s, nbytes / seconds)

    def observe_cpu(self, flops: float, seconds: float) -> None:
        if flops > 0 and seconds > 0:
            self.cpu_flops = self._mix(self.cpu_flops, flops / seconds)

    def observe_gpu(self, flops: float, seconds: float) -> None:
        if flops > 0 and seconds > 0:
            self.gpu_flops = self._mix(self.gpu_flops, flops / seconds)


@dataclass
class LayerPlan:
    """The experts one layer streams, and the modeled per-step seconds of each side."""

    stream: list[int] = field(default_factory=list)  # expert ids to copy into a slot, hottest first
    resident: list[int] = field(default_factory=list)  # expert ids already on the GPU
    cpu_s: float = 0.0
    pcie_s: float = 0.0
    gpu_s: float = 0.0

    @property
    def step_s(self) -> float:
        return max(self.cpu_s, self.pcie_s, self.gpu_s)


def plan_layer(
    counts: Sequence[float],
    *,
    hidden: int,
    intermediate: int,
    expert_bytes: int,
    capacity: int,
    cost: CostModel,
    resident: Sequence[int] = (),
    mode: str = "auto",
) -> LayerPlan:
    """Chooses the streamed experts of one layer.

    Args:
        counts: [E] routed slots per expert (measured, or expected for the coming call).
        hidden, intermediate: H, I.
        expert_bytes: bytes one expert's weights take on PCIe (gate_up + down, as streamed: int8 or FP8 weights
            with their scales; stored_expert_bytes).
        capacity: experts one streaming slot holds (from the GPU memory budget).
        cost: the speeds.
        resident: experts kept on the GPU (computed there, never streamed).
        mode: "auto" (cost model), "cpu" (stream nothing), "gpu" (stream every routed expert that fits).
    """
    if mode not in MODES:
        raise ValueError(f"streaming mode must be one of {MODES}, got {mode!r}")
    flops_per_slot = 2 * 3 * hidden * intermediate
    resident_set = set(resident)
    on_gpu = sum(counts[e] for e in resident_set)
    order = sorted((e for e, c in enumerate(counts) if c > 0 and e not in resident_set), key=lambda e: -counts[e])
    limit = min(capacity, len(order))
    total_rest = sum(counts[e] for e in order)

    def costs(k: int) -> tuple[float, float, float]:
        streamed = sum(counts[e] for e in order[:k])
        rest = total_rest - streamed
        cpu = cost.cpu_passes * (rest * flops_per_slot / cost.cpu_flops + cost.cpu_expert_s * (len(order) - k))
        pcie = cost.pcie_passes * k * expert_bytes / cost.pcie_bytes_per_s
        gpu = cost.gpu_passes * (streamed + on_gpu) * flops_per_slot / cost.gpu_flops
        if k < len(order):  # a CPU share: its fixed cost per call, which the GPU waits out too (host split)
            cpu += cost.cpu_calls * cost.cpu_call_s
            gpu += cost.cpu_calls * cost.cpu_call_s
        return cpu, pcie, gpu

    if mode == "cpu":
        best = 0
    elif mode == "gpu":
        best = limit
    else:
        best, best_s = 0, max(costs(0))
        for k in range(1, limit + 1):
            s = max(costs(k))
            if s < best_s:
                best, best_s = k, s
    cpu_s, pcie_s, gpu_s = costs(best)
    return LayerPlan(stream=order[:best], resident=sorted(resident_set), cpu_s=cpu_s, pcie_s=pcie_s, gpu_s=gpu_s)


def slot_capacity(
    budget_bytes: int,
    num_experts: int,
    expert_gpu_bytes: int,
    slots: int = 2,
    *,
    group: int = 0,
    group_expert_bytes: int = 0,
) -> int:
    """Experts per streaming slot that `slots` slots fit in `budget_bytes` (at most E), beside the FP8 dequantization
    buffer of min(capacity, `group`) experts of `group_expert_bytes` each (dequant_buffer_bytes; 0: none)."""
    per = max(1, slots * expert_gpu_bytes)
    work = group_expert_bytes if group > 0 else 0
    if work and budget_bytes >= group * (per + work):  # a full group: the buffer is fixed
        capacity = (budget_bytes - group * work) // per
    else:  # fewer experts than a group: the buffer holds the whole slot
        capacity = budget_bytes // (per + work)
    return max(0, min(num_experts, capacity))


def dequant_group(hidden: int, intermediate: int, dequant_bytes: int = DEQUANT_BYTES) -> int:
    """Experts per group of the FP8 dequantization buffer: as many bf16 experts as `dequant_bytes` holds, at least 1;
    0 for no buffer (0 bytes: the GEMMs multiply from e4m3, kt_core.streaming.fp8_gemm)."""
    if dequant_bytes <= 0:
        return 0
    return max(1, int(dequant_bytes) // (3 * hidden * intermediate * FP8_WORKING_ITEM))


def stage_bytes(gate_up_bytes: int, capacity: int) -> int:
    """Device bytes of the staging buffer that layers streaming from the packed copy use: whole experts' gate_up tiles
    (`gate_up_bytes` each), as many as `STAGE_BYTES` holds, at least one, at most a slot's (0 when nothing streams)."""
    if capacity <= 0:
        return 0
    return min(capacity, max(1, STAGE_BYTES // gate_up_bytes)) * gate_up_bytes


def dequant_buffer_bytes(
    hidden: int,
    intermediate: int,
    capacity: int,
    *,
    block: tuple[int, int] | None,
    dequant_bytes: int = DEQUANT_BYTES,
) -> int:
    """Device bytes of the bf16 buffer FP8 experts are dequantized into, one per device whatever the slot capacity:
    min(capacity, dequant_group) experts (0 when the experts are not FP8 or nothing streams).

    The slots' experts (and FP8 residents) are computed a group of that many at a time, each group dequantized into
    the buffer right before its GEMMs.
    """
    if block is None or capacity <= 0:
        return 0
    experts = min(capacity, dequant_group(hidden, intermediate, dequant_bytes))
    return experts * 3 * hidden * intermediate * FP8_WORKING_ITEM


def slot_bytes_per_expert(
    hidden: int,
    intermediate: int,
    item: int,
    quantize: str | None = None,
    *,
    block: tuple[int, int] | None = None,
) -> int:
    """Device bytes per expert of slot capacity: the expert in both slots, plus the int8 dequantization scratch.

    Args:
        hidden, intermediate: H, I of one expert (gate_up [2I, H], down [H, I]).
        item: bytes per weight as stored on the host (2 for bf16, 1 for FP8).
        quantize: None, or "int8" (int8 weights and fp32 row scales streamed; a bf16 scratch to dequantize into).
        block: the quantization block of FP8 experts (None: not FP8): e4m3 weights and fp32 block scales in both
            slots. Their bf16 working buffer is fixed, not per expert (dequant_buffer_bytes).
    """
    expert = 3 * hidden * intermediate * item
    if block is not None:
        return 2 * stored_expert_bytes(hidden, intermediate, 1, block)
    if quantize is None:
        return 2 * expert
    q_bytes = 3 * hidden * intermediate + 4 * (2 * intermediate + hidden)  # int8 weights, fp32 row scales
    return 2 * q_bytes + expert


def stored_expert_bytes(hidden: int, intermediate: int, item: int, block: tuple[int, int] | None = None) -> int:
    """Bytes of one expert as stored (and streamed over PCIe, and kept resident): gate_up [2I, H] and down [H, I] at
    `item` bytes a weight, plus for FP8 (`block` given, item 1) the fp32 block scales."""
    scales = expert_scale_bytes(hidden, intermediate, block) if block is not None else 0
    return 3 * hidden * intermediate * item + scales


def expert_memory_split(
    expert_gpu_memory: int | None,
    limit_left: int | None,
    *,
    experts: int,
    layers: int,
    expert_bytes: int,
    per_expert: int,
    mode: str = "auto",
    group: int = 0,
    group_expert_bytes: int = 0,
) -> tuple[int, int]:
    """(slot capacity, resident experts per layer) that enable_streaming gives the expert weights.

    Args:
        expert_gpu_memory: bytes for expert weights (slots and residents); None: two full-layer slots.
        limit_left: what gpu_memory_limit leaves once the model is on the device (None: no limit). Without
            expert_gpu_memory, the slots may take half of it, and the residents are sized after step 1.
        experts: E; layers: streamed MoE layers; expert_bytes: one expert's weights as stored;
        per_expert: slot bytes per expert of capacity (slot_bytes_per_expert).
        mode: "cpu" gives the experts no device memory.
        group, group_expert_bytes: FP8 experts: experts per group of the dequantization buffer (dequant_group) and
            bytes of one dequantized expert; the buffer (min(capacity, group) of them) comes out of the same bytes.
    """
    buffer = dict(group=group, group_expert_bytes=group_expert_bytes)
    if mode == "cpu":
        return 0, 0
    if expert_gpu_memory is None:
        if limit_left is None:
            return experts, 0
        capacity = slot_capacity(max(0, limit_left) // 2, experts, per_expert, slots=1, **buffer)
        return capacity, experts if capacity == experts else 0  # residents: as many as fit after step 1
    capacity = slot_capacity(expert_gpu_memory, experts, per_expert, slots=1, **buffer)
    if capacity < experts:
        return capacity, 0
    left = expert_gpu_memory - capacity * per_expert - min(capacity, group) * group_expert_bytes
    return capacity, min(experts, left // max(1, expert_bytes * layers))

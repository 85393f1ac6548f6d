"""Projected LoRA fine-tuning speed and memory of a model on a machine, from the streaming planner's cost model.

Per MoE layer and step the experts are split exactly as the runtime's planner splits them
(`kt_core.streaming.planner.plan_layer`, the same `CostModel` and pass counts), with routing spread evenly
over the experts (the CPU at a mixed split's measured speed, or at the all-CPU one where every expert stays there;
FP8 experts' GPU speed as measured: `kt_core.plan.machines`); the GPU also runs the layer's attention and shared
experts. Their weights are frozen (LoRA), so a GEMM over them runs 3 times a step (forward, recomputation, the input
gradient; no weight gradient), 2 FLOPs per weight and token; the causal attention scores 4.5 times (the forward,
the recomputation and flash attention's backward, about 2.5 forwards); lm_head twice (the fused loss computes the
logits and their input gradient in one chunked pass, `kt_core.loss`). A layer costs the attention, then the slower
of its CPU and GPU expert shares; the next layer's copy runs under it and shows only where it takes longer
(`max(attention + experts, PCIe)`); each layer is copied twice a step (forward, then recomputation and backward)
but the last two of each GPU's forward, which stay in its two slots for their backward. Layers are split over the
GPUs in ranges, one GPU working at a time (today's runtime), each with its own PCIe link and two slots. FP8 experts'
GPU speed follows the rows per expert (`kt_core.plan.machines.fp8_gpu_speed`).

GPU memory per GPU: its layers' non-expert weights, two slots of the experts it streams, the checkpointed
layer inputs of its layers, one layer's working set (36 hidden-sized tensors of the step's tokens: measured
4.8 GiB at 32,768 tokens x H 2048 on the H200 run of 2026-12-03) and, on the last GPU, the lm_head and the
loss (`kt_core.loss.loss_workspace_bytes`, Liger); slots sized as the runtime sizes them
(`kt_core.streaming.planner.slot_bytes_per_expert`: FP8 slots hold e4m3 weights and block scales, plus once per GPU
the fixed bf16 buffer the GPU dequantizes them into a group of experts at a time, `dequant_buffer_bytes`).
Host RAM: as the runtime holds the routed experts with a packed kernel (the speeds above are the packed AMX
kernels'): once. With every expert on the CPU the training run frees the weights once packed
(`kt_core.pack_experts(release=True)`, the training plugins' default for bf16 runs); where some stream, a layer streams
from its weights until its first CPU share packs it, then from the packed copy, and frees the weights
(kt_core/streaming/tiles.py), so the peak holds one layer twice: the one packing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kt_core.loss import loss_workspace_bytes
from kt_core.plan.machines import ALL_CPU_SPEED, Machine, fp8_gpu_speed
from kt_core.plan.models import ModelShape
from kt_core.streaming.planner import (
    CostModel,
    LayerPlan,
    dequant_buffer_bytes,
    dequant_group,
    plan_layer,
    slot_bytes_per_expert,
    slot_capacity,
    stored_expert_bytes,
)

__all__ = ["Projection", "project"]

WORKING_SET_TENSORS = 36  # one layer's recomputation + backward, in [tokens, H] bf16 tensors (measured, see above)
BYTES_PER_WEIGHT = {"bf16": 2, "fp8": 1, "int8": 1}
FP8_BLOCK = (128, 128)  # DeepSeek-V3's / Kimi-K2's weight_block_size
SLOTS = 2  # streaming slots per GPU (kt_core.streaming.store)
FROZEN_GEMM_PASSES = 3  # forward, recomputation, input gradient
SCORE_PASSES = 4.5  # forward, recomputation, flash attention's backward (~2.5 forwards)
HEAD_PASSES = 2  # the fused loss: logits and their input gradient, chunk by chunk


@dataclass
class Projection:
    """The projected step: time split, memory, and what does not fit."""

    tokens_per_step: int
    step_s: float
    layer_s: float  # one MoE layer
    plan: LayerPlan  # one MoE layer's split
    experts_streamed: int  # per MoE layer
    slot_capacity: int  # experts one slot holds
    gpu_bytes: list[int]  # per GPU
    host_bytes: int
    problems: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s


def project(
    model: ModelShape,
    machine: Machine,
    *,
    tokens_per_step: int,
    seq: int = 2048,
    expert_dtype: str = "bf16",
    lora_rank: int = 8,
    expert_gpu_memory: int | None = None,
) -> Projection:
    """Projects one LoRA training step (gradient checkpointing, bf16 non-expert weights).

    Args:
        expert_gpu_memory: GPU bytes for the streaming slots, as the runtime's `expert_gpu_memory` (0: every
            expert on the CPU); None: all the room the rest leaves.
    """
    if expert_dtype not in BYTES_PER_WEIGHT:
        raise ValueError(f"expert_dtype: got {expert_dtype!r}, expected one of {', '.join(BYTES_PER_WEIGHT)}")
    n, h = tokens_per_step, model.hidden
    item = BYTES_PER_WEIGHT[expert_dtype]
    block = FP8_BLOCK if expert_dtype == "fp8" else None
    quantize = "int8" if expert_dtype == "int8" else None
    H, I = model.hidden, model.expert_intermediate
    expert_bytes = stored_expert_bytes(H, I, item, block)  # streamed over PCIe, per expert
    slot_bytes = slot_bytes_per_expert(H, I, 2 if quantize else item, quantize, block=block)  # GPU, per expert
    layers_per_gpu = -(-model.layers // machine.gpus)
    activations = layers_per_gpu * n * h * 2 + WORKING_SET_TENSORS * n * h * 2
    lora = 4 * 4 * lora_rank * model.attention_params // h  # fp32 factors, grads, Adam moments (attention LoRA)
    weights = layers_per_gpu * (model.layer_params_on_gpu(True) * 2 + lora)
    head = 2 * model.vocab * h * 2 + loss_workspace_bytes(n, model.vocab, h, backend="liger")
    room = machine.gpu_bytes - weights - activations - head
    group = dict(group=dequant_group(H, I), group_expert_bytes=3 * H * I * 2) if block else {}  # FP8 buffer
    budget = max(0, room if expert_gpu_memory is None else min(room, expert_gpu_memory))
    capacity = slot_capacity(budget, model.experts, slot_bytes, slots=1, **group)
    cpu_flops = machine.cpu_flops * (ALL_CPU_SPEED if capacity == 0 else 1.0)
    rows = n * model.experts_per_token / model.experts  # routed slots per expert, routing spread evenly
    expert_gpu_flops = machine.gpu_flops * (fp8_gpu_speed(rows) if expert_dtype == "fp8" else 1.0)
    cost = CostModel(pcie_bytes_per_s=machine.pcie_bytes_per_s, cpu_flops=cpu_flops, gpu_flops=expert_gpu_flops)

    plan = plan_layer(
        [rows] * model.experts,
        hidden=h,
        intermediate=model.expert_intermediate,
        expert_bytes=expert_bytes,
        capacity=capacity,
        cost=cost,
    )
    rest_s = _non_routed_s(model, machine, n, seq, moe=True)  # attention, shared experts, router
    layer_s = max(rest_s + max(plan.cpu_s, plan.gpu_s), plan.pcie_s)
    # The two layers each GPU's forward streams last are still in its slots for their backward: copied once a step.
    kept = min(SLOTS * machine.gpus, model.moe_layers)
    kept_s = kept * max(rest_s + max(plan.cpu_s, plan.gpu_s), plan.pcie_s / 2)
    dense_s = _non_routed_s(model, machine, n, seq, moe=False)
    head_s = HEAD_PASSES * 2 * n * model.vocab * h / machine.gpu_flops
    step_s = (model.moe_layers - kept) * layer_s + kept_s + model.dense_layers * dense_s + head_s

    used = weights + activations + capacity * slot_bytes + dequant_buffer_bytes(H, I, capacity, block=block)
    gpu_bytes = [used] * (machine.gpus - 1) + [used + head]
    layer_bytes = model.experts * expert_bytes
    packing = layer_bytes if capacity > 0 else 0  # a streamed layer's weights beside the packed copy it is making
    host_bytes = model.moe_layers * layer_bytes + packing
    problems = []
    if capacity == 0 and expert_gpu_memory != 0:
        problems.append(
            f"GPU: {_gib(machine.gpu_bytes)} per GPU leaves no room for a streaming slot after the non-expert "
            f"weights ({_gib(weights)}), activations ({_gib(activations)}) and lm_head + loss ({_gib(head)}): "
            "fewer tokens per step or more GPUs"
        )
    if host_bytes > machine.host_bytes:
        problems.append(
            f"host RAM: the routed experts take {_gib(host_bytes)} in {expert_dtype} "
            + ("(once, + one layer while it packs)" if packing else "(the packed copy)")
            + f", the machine has {_gib(machine.host_bytes)}: "
            + ("store them in fp8 or int8, or use more RAM" if expert_dtype == "bf16" else "use more RAM")
        )
    return Projection(n, step_s, layer_s, plan, len(plan.stream), capacity, gpu_bytes, host_bytes, problems)


def _non_routed_s(model: ModelShape, machine: Machine, tokens: int, seq: int, *, moe: bool) -> float:
    """GPU seconds of a layer's non-routed work: its frozen GEMMs and the causal attention scores, every pass."""
    gemms = FROZEN_GEMM_PASSES * model.layer_params_on_gpu(moe)
    scores = SCORE_PASSES * model.attention_width * seq / 2
    return 2 * tokens * (gemms + scores) / machine.gpu_flops


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"

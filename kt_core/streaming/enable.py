"""`enable_streaming`: split every MoE layer of a model between CPU compute and GPU compute on streamed weights.

    rt = kt_core.enable_streaming(model, expert_gpu_memory="10GiB", device="cuda:0")
    ...train as usual...                      # each step logs the CPU / PCIe / GPU split (logger kt_core.streaming)
    rt.disable()                              # back to CPU-only experts; unpins host memory

It checks the layers, sizes the device memory for expert weights (two slots, the FP8 working buffer, residents),
builds the store and the runtime (kt_core/streaming/runtime.py), attaches each layer's GPU share and places the
expert-LoRA factors.

`expert_gpu_memory` bounds the device bytes of expert weights (the two slots, the int8 scratch or the FP8 working
buffer, and the resident experts); the rest of the model and the activations come on top. `gpu_memory_limit` bounds the
whole run: the resident experts are sized from the first step's measured peak so that the total stays under it.
The front ends check the whole run against it before streaming starts (kt_core/streaming/memory_plan.py).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from kt_core.experts import KTExperts
from kt_core.settings import optional_size, parse_size, renamed
from kt_core.streaming import fp8_gemm
from kt_core.streaming.planner import (
    DEQUANT_BYTES,
    CostModel,
    dequant_group,
    expert_memory_split,
    slot_bytes_per_expert,
)
from kt_core.streaming.runtime import StreamingRuntime
from kt_core.streaming.share import StreamedShare
from kt_core.streaming.store import ExpertStore

__all__ = ["enable_streaming"]

logger = logging.getLogger("kt_core.streaming")


def enable_streaming(
    model: nn.Module,
    expert_gpu_memory: int | str | None = None,
    device: str | torch.device | None = None,
    *,
    mode: str = "auto",
    quantize: str | None = None,
    cost: CostModel | None = None,
    keep_bytes: int | str = "1GiB",
    gpu_memory_limit: int | str | None = None,
    gpu_memory_budget: int | str | None = None,
    dequant_bytes: int | str = DEQUANT_BYTES,
    expert_lora_on_gpu: bool | None = None,
) -> StreamingRuntime:
    """Splits every KTExperts layer of `model` between CPU compute and GPU compute on streamed weights.

    Args:
        model: a model whose routed experts are KTExperts (kt_core.load_model, convert_model, KTCallback).
        expert_gpu_memory: device bytes for expert weights ("10GiB", bytes, or None: two full-layer slots).
            What two slots of all E experts leave over is spent on resident experts (the hottest of each layer).
        device: the GPU (default cuda:0). "cpu" runs the same code with the CPU standing in for the GPU
            (tests of the split on machines without one); it is only ever used when asked for by name.
        mode: "auto" (per-layer cost model), "cpu" (everything on the CPU), "gpu" (stream every expert).
        quantize: None (stream the weights as stored) or "int8" (half the PCIe bytes; per-row symmetric int8,
            relative weight error 4e-3 on uniform and 8e-3 on Gaussian random bf16 weights; LoRA stays exact).
            FP8 experts stream as FP8 (half the bytes of bf16, no further error) and take None.
        cost: starting speeds for the planner (measured ones replace them as steps run).
        keep_bytes: device bytes of a checkpointed layer's expert intermediates kept from its recomputation
            for the backward that follows ("1GiB" default); the backward recomputes whatever did not fit.
            More is faster, less bounds the activation memory of large batches.
        gpu_memory_limit: the most device memory the whole run may hold ("24GiB": weights, activations, the
            loss and the experts together; the same limit `load_model` plans the weights with). The first
            step runs with the streaming slots alone; from its measured peak the runtime keeps only as many
            resident experts as fit under the limit (and warns, naming what to lower, when step 1 alone
            exceeded it). None: residents fill what `expert_gpu_memory` leaves over the slots.
        gpu_memory_budget: the former name of `expert_gpu_memory` (accepted with a warning).
        dequant_bytes: FP8 experts where the GEMMs do not multiply them from e4m3 (kt_core.streaming.fp8_gemm: CUDA
            with Triton, widths and block multiples of 64; there no buffer is made): device bytes of the bf16 buffer
            they are dequantized into ("512MiB" default;
            whole experts, at least one, at most a slot's). The slots' experts and the residents are computed a group
            of that many experts at a time, each group dequantized right before its GEMMs, so the buffer stays the
            same whatever the slot capacity; it is counted in `expert_gpu_memory`. Larger: fewer, larger GEMMs and
            dequantizations (a slot that fits whole is dequantized once for the forward, the recomputation and the
            backward); smaller: more experts per slot in the same budget.
        expert_lora_on_gpu: where the expert-LoRA factors live (kt_core.lora). True: on the GPU, with their
            gradients and optimizer states, so gradient clipping and the optimizer step on them run there, not
            on the host between two steps; the CPU operator reads host copies. False: host memory. None: the GPU
            when their state (factors, gradients, two optimizer states) takes at most a quarter of the GPU's free
            memory (KTCallback and LLaMA-Factory pass what their GPU memory plan decided instead). Host memory
            always with mode "cpu" and in distributed runs (their gradient reduction reads the factors there).

    Returns:
        The StreamingRuntime (per-step reports in `.history`; `.disable()` undoes it).
    """
    layers = [m for m in model.modules() if isinstance(m, KTExperts)]
    if not layers:
        raise ValueError("enable_streaming: the model has no KTExperts layers (convert its experts first)")
    if quantize not in (None, "int8"):
        raise ValueError(f"enable_streaming: quantize must be None or 'int8', got {quantize!r}")
    if mode not in ("auto", "cpu", "gpu"):
        raise ValueError(f"enable_streaming: mode must be 'auto', 'cpu' or 'gpu', got {mode!r}")
    device = torch.device(device or "cuda:0")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"enable_streaming: streaming experts to the GPU needs a CUDA device, and {device} is not available "
            "(torch.cuda.is_available() is False); leave the GPU memory budget unset to run the experts on the CPU"
        )
    partial = [m for m in layers if m.host_rows is not None or m.gpu_share is not None]
    if partial:
        raise ValueError(
            f"enable_streaming: {len(partial)} KTExperts layers already have experts computed elsewhere "
            "(expert_ids, or a GPU share attached); streaming needs every expert of a layer in host memory"
        )
    released = [m for m in layers if m.host_weights_released]
    if released and quantize is not None:
        raise ValueError(
            f"enable_streaming: {len(released)} KTExperts layers released their host weights once packed "
            f"(release_host_weights), and quantize={quantize!r} makes its int8 copies from them; "
            "restore_host_weights() on each gives them back"
        )
    first = layers[0]
    E = first.num_experts
    fp8 = [m.is_fp8 for m in layers]
    if any(fp8) and quantize is not None:
        raise ValueError(
            f"enable_streaming: quantize={quantize!r} re-quantizes bf16 / fp32 experts; these are FP8 and stream as "
            "FP8 already (half the bytes of bf16): leave quantize unset"
        )
    if any(fp8) and not all(fp8):
        raise ValueError("enable_streaming: some layers keep FP8 experts and others do not; store them all alike")
    block = first.weight_block_size if first.is_fp8 else None
    expert_bf = sum(t[0].numel() * t.element_size() for t in _stored(first))  # one resident, as stored
    per_expert = slot_bytes_per_expert(
        first.hidden_dim, first.intermediate_dim, first.gate_up_proj.element_size(), quantize, block=block
    )
    dequant = fp8_gemm.dequant_bytes_needed(
        parse_size(dequant_bytes, "dequant_bytes"), first.hidden_dim, first.intermediate_dim, block, device
    )
    group = dequant_group(first.hidden_dim, first.intermediate_dim, dequant) if block is not None else 0
    group_expert = 3 * first.hidden_dim * first.intermediate_dim * 2 if block is not None else 0  # bf16
    expert_gpu_memory = renamed("gpu_memory_budget", gpu_memory_budget, "expert_gpu_memory", expert_gpu_memory)
    budget = optional_size(expert_gpu_memory, "expert_gpu_memory")
    limit = optional_size(gpu_memory_limit, "gpu_memory_limit")
    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    capacity, resident = expert_memory_split(
        budget,
        None if limit is None else limit - held,
        experts=E,
        layers=len(layers),
        expert_bytes=expert_bf,
        per_expert=per_expert,
        mode=mode,
        group=group,
        group_expert_bytes=group_expert,
    )
    if budget is not None and capacity == 0 and mode != "cpu":
        logger.warning("enable_streaming: a budget of %d bytes holds no expert; the CPU computes all", budget)
    store = ExpertStore(device, capacity, quantize=quantize, dequant_bytes=dequant)
    rt = StreamingRuntime(
        device,
        store,
        mode=mode,
        cost=cost or CostModel(),
        resident_per_layer=resident,
        keep_bytes=parse_size(keep_bytes, "keep_bytes"),
        gpu_memory_limit=limit,
    )
    for m in layers:
        i = rt.add_layer(m)
        if m.host_weights_released and not rt.stream_from_tiles(i):
            store.close()
            raise ValueError(
                f"enable_streaming: layer {i} released its host weights once packed (release_host_weights), and its "
                f"kernel's packed copy ({m.kernel}) cannot stream in their place (padded or quantized tiles); "
                "restore_host_weights() on each such layer gives them back"
            )
        m.attach_gpu_share(StreamedShare(rt, i))  # same module, names and state dict; the layer splits each call
    lora_on_gpu = _expert_lora_on_gpu(layers, expert_lora_on_gpu, mode, device)
    for m in layers:
        if m.lora is not None and lora_on_gpu:
            m.lora.place_(device)
        for factor in m.lora.factors() if m.lora is not None and not lora_on_gpu else ():
            store.pin(factor.data)  # the per-call device copies of the expert LoRA then travel by DMA
    if any(m.lora is not None for m in layers):
        logger.info("streaming: expert-LoRA factors in %s", device if lora_on_gpu else "host memory")
    logger.info(
        "streaming: %d layers on %s, slot capacity %d of %d experts, %s%d resident/layer, %.2f GiB of expert "
        "weights on the device, mode %s%s%s",
        len(layers), device, capacity, E, "up to " if limit is not None else "", resident, store.gpu_bytes() / 2**30,
        mode, ", int8" if quantize else f", fp8 (dequantized {store.group} experts at a time)" if store.fp8 else "",
        "" if store.pin_ok else ", host memory NOT pinned",
    )  # fmt: skip
    return rt


def _expert_lora_on_gpu(layers: list[KTExperts], wanted: bool | None, mode: str, device: torch.device) -> bool:
    """Whether the layers' expert-LoRA factors move to `device` (enable_streaming's expert_lora_on_gpu)."""
    factors = [f for m in layers if m.lora is not None for f in m.lora.factors()]
    if not factors or wanted is False:
        return False
    from kt_core.distributed import deepspeed_running

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    why_not = (
        "mode 'cpu' computes every expert on the CPU"
        if mode == "cpu"
        else f"{device} is not a CUDA device"
        if device.type != "cuda"
        else "a distributed run reduces their gradients in host memory"
        if distributed and torch.distributed.get_world_size() > 1
        else "under DeepSpeed they have an optimizer of their own, in host memory"
        if deepspeed_running()
        else None
    )
    if why_not is not None:
        if wanted:
            raise ValueError(f"enable_streaming(expert_lora_on_gpu=True): {why_not}; leave it unset")
        return False
    if wanted:
        return True
    state = sum(f.numel() * f.element_size() for f in factors) * 4  # factors, gradients, two optimizer states
    free, _ = torch.cuda.mem_get_info(device)
    return state <= free // 4


def _stored(m: KTExperts) -> tuple[torch.Tensor, ...]:
    """A layer's expert tensors as kept in host memory (FP8: with their block scales)."""
    if m.is_fp8:
        return m.gate_up_proj, m.down_proj, m.gate_up_proj_scale_inv, m.down_proj_scale_inv
    return m.gate_up_proj, m.down_proj

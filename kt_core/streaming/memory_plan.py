"""The GPU memory of a training run, planned before the run allocates it: each part in bytes, and whether it fits.

    dims = model_dims(model)                   # the loaded model (PEFT or not), or: before loading,
    inputs = checkpoint_inputs(path, RunShape(batch=16, seq_len=2048), lora=LoraSizes(8, ("all",)), ...)
    plan = plan_gpu_memory(inputs, gpu_memory_limit="24GiB")
    check_and_log(plan, TRAINER_KNOBS)         # logs plan.table(); MemoryPlanError naming the knob and the number

Two limits, never to be confused:
    expert_gpu_memory  the expert weights only: the two streaming slots (with the int8 / FP8 dequantization
                       buffer) and the resident experts. It decides how much of each MoE layer the GPU computes,
                       not what the run may hold.
    gpu_memory_limit   everything the run holds on the GPU: every part below, the expert weights included.
                       None: the free memory CUDA reports, plus what this process's allocator holds already.

The parts (T = batch x sequence tokens, d = bytes of the compute dtype, L = decoder layers on the GPU,
H = hidden, V = vocab, E = experts, K = experts per token, I = expert intermediate, r = expert-LoRA rank,
P = min(PIECE_ROWS, T*K) sorted slots per piece of a streamed call):

    non-expert weights         parameters and buffers on the GPU outside the CPU experts, LoRA factors included
    trainable state            trainable bytes on the GPU x (1 gradient + optimizer states: 2 for Adam)
    expert LoRA on the GPU     streaming (not mode "cpu") with expert LoRA: L_moe x E*r*(2H + 3I) x 4 x
                               (2 + optimizer states), the fp32 factors with their gradients and optimizer states,
                               when they fit beside everything but the residents (or StreamingSizes says so);
                               else 0 and the factors stay in host memory (enable_streaming's expert_lora_on_gpu)
    streaming slots            capacity x slot_bytes_per_expert (the split enable_streaming makes, planner.py); FP8
                               experts: e4m3 bytes and fp32 block scales in both slots, plus once the bf16 buffer
                               they are dequantized into a group at a time (dequant_buffer_bytes: min(capacity,
                               dequant_group) experts, fixed by `dequant_bytes`; FP8 residents go through it too),
                               where the GEMMs do not multiply from e4m3 (fp8_gemm.dequant_bytes_needed)
    packed-copy staging        streaming bf16 / FP8 experts, not quantized: the buffer the tiles of layers that stream
                               from their packed copy cross PCIe into (planner.stage_bytes: whole experts' gate_up,
                               as many as STAGE_BYTES holds, at least one)
    resident experts           residents per layer x MoE layers x the expert as stored (3*H*I*item, + the block
                               scales of FP8); under a gpu_memory_limit, as many as fit beside everything else
                               (what the runtime keeps after step 1)
    layer inputs               checkpointing: (L + 1) x T*H*d (each layer's input and the final hidden states);
                               without it: every layer's saved activations, sum of saved(layer)
    one layer's working set    checkpointing: the largest saved(layer) + transient(layer); without: transient
    kept expert intermediates  streaming with checkpointing, slots of all E experts: min(keep_bytes, T*K*2I*d)
    loss workspace             kt_core.loss.loss_workspace_bytes(T, V, H, backend)

    saved(layer)     = T x [ d x sum over the layer's non-expert linears of (in + out)
                             + (d + 1) x sum of the LoRA'd linears' inputs, when lora_dropout > 0
                             + 4 x attention heads (the attention's log-sum-exp)
                             + MoE: 8E + 12K (router logits and probabilities; top-k weights and ids)
                                    + (d + 4) x H (the experts' output and its fp32 sum) ]
                       + streamed MoE with expert LoRA: E*r*(2H + 3I)*d (the factors' device copy)
    transient(layer) = T x 2d x widest linear output (a gradient in, one out)
                       + MoE: T x 4H (the experts' fp32 input gradient)
                       + streamed MoE: 2 x P x (2H + 3I) x d (a piece's forward and backward) + 40 x T*K (routing)
                                       + E*r*(2H + 3I)*4 (the factors' fp32 gradients)

peak = weights + trainable state + expert LoRA + slots + residents + layer inputs
       + max(loss workspace, working set + kept):
the loss runs, and frees its workspace, before the backward recomputes the last layer. The check refuses when
peak + allocator_margin(limit) exceeds the limit. An estimate, by a formula: benchmarks/bench_sft.py prints it
beside torch.cuda.max_memory_allocated (`last_plan()` is the one logged last in this process).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from kt_core.loading.memory import MemoryPlanError, format_bytes
from kt_core.loss import loss_workspace_bytes
from kt_core.settings import optional_size, parse_size
from kt_core.streaming import fp8_gemm
from kt_core.streaming.model_dims import LayerDims, ModelDims, matches_lora_target, model_dims
from kt_core.streaming.planner import (
    DEQUANT_BYTES,
    PIECE_ROWS,
    allocator_margin,
    dequant_buffer_bytes,
    dequant_group,
    expert_memory_split,
    slot_bytes_per_expert,
    stage_bytes,
)

__all__ = [
    "TRAINER_KNOBS",
    "GpuMemoryPlan",
    "Knobs",
    "LayerDims",
    "LoraSizes",
    "ModelDims",
    "PlanInputs",
    "RunShape",
    "StreamingSizes",
    "check_and_log",
    "checkpoint_inputs",
    "expert_lora_state_bytes",
    "last_plan",
    "loss_backend",
    "matches_lora_target",
    "model_dims",
    "optimizer_states",
    "plan_gpu_memory",
    "usable_gpu_bytes",
]

logger = logging.getLogger("kt_core.memory")

_last: GpuMemoryPlan | None = None


# ---- what the plan reads ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunShape:
    """What the run does per step.

    Attributes:
        batch: sequences per device and micro-batch (per_device_train_batch_size).
        seq_len: tokens per sequence (the longest); None: activations and the loss are not planned.
        gradient_checkpointing: whether the decoder layers are checkpointed.
        dtype: the compute dtype of the activations.
        loss_backend: what computes the loss: "off" (transformers'), "chunked", "liger", "cce" (loss_backend()).
        lm_head_trainable: whether lm_head's weight gets a gradient.
        loss_on_device: whether lm_head (and so the loss) is on this GPU.
    """

    batch: int
    seq_len: int | None
    gradient_checkpointing: bool = True
    dtype: torch.dtype = torch.bfloat16
    loss_backend: str = "chunked"
    lm_head_trainable: bool = False
    loss_on_device: bool = True

    @property
    def tokens(self) -> int:
        return self.batch * (self.seq_len or 0)


@dataclass(frozen=True)
class StreamingSizes:
    """The streaming settings that take GPU memory (see kt_core.enable_streaming).

    Attributes:
        expert_gpu_memory: bytes for expert weights (slots and residents); None: two full-layer slots.
        quantize: None or "int8".
        keep_bytes: a recomputed layer's expert intermediates kept for its backward, at most.
        mode: "auto", "cpu" or "gpu".
        dequant_bytes: FP8 experts: the bf16 buffer they are dequantized into, a group of experts at a time.
        expert_lora_on_gpu: the expert-LoRA factors on the GPU (True), in host memory (False), or on the GPU
            when they fit (None; the plan's `expert_lora_on_gpu` says what it decided).
    """

    expert_gpu_memory: int | str | None = None
    quantize: str | None = None
    keep_bytes: int | str = "1GiB"
    mode: str = "auto"
    dequant_bytes: int | str = DEQUANT_BYTES
    expert_lora_on_gpu: bool | None = None


@dataclass(frozen=True)
class PlanInputs:
    """Everything a plan is computed from.

    Attributes:
        dims: the model's shapes.
        run: batch, sequence, checkpointing, dtype, loss.
        weights_bytes: parameters and buffers on the GPU outside the CPU experts (LoRA factors included).
        trainable_bytes: the trainable part of them (each gets a gradient and optimizer states).
        optimizer_states: optimizer states per trainable parameter, in its dtype (optimizer_states()).
        streaming: the streaming settings, or None (the CPU computes every expert).
        device: the planned GPU.
    """

    dims: ModelDims
    run: RunShape
    weights_bytes: int
    trainable_bytes: int = 0
    optimizer_states: int = 2
    streaming: StreamingSizes | None = None
    device: str = "cuda:0"


@dataclass(frozen=True)
class Knobs:
    """How the user spells each setting the refusal may ask to change (LLaMA-Factory keys, Trainer arguments)."""

    limit: str = "gpu_memory_limit"
    batch: str = "per_device_train_batch_size"
    seq_len: str = "the sequence length"
    experts: str = "expert_gpu_memory"
    keep: str = "stream_keep_bytes"


TRAINER_KNOBS = Knobs(
    limit="KTCallback(gpu_memory_limit)",
    batch="TrainingArguments.per_device_train_batch_size",
    seq_len="KTCallback(max_seq_length)",
    experts="KTCallback(expert_gpu_memory)",
    keep="KTCallback(stream_keep_bytes)",
)


def optimizer_states(optim: str | None) -> int:
    """Optimizer states per trainable parameter, by the Trainer's `optim` name (2 for the Adam family)."""
    name = str(getattr(optim, "value", optim) or "adamw").lower()
    if name.startswith(("sgd", "adafactor")):
        return 0  # plain SGD holds none; Adafactor's factored rows and columns are negligible here
    if name.startswith(("lion", "adagrad", "rmsprop")):
        return 1
    return 2


def loss_backend(mode: str, device: str | torch.device) -> str:
    """What kt_core.loss will compute the loss with for a loss `mode` on `device` (as EfficientLoss chooses)."""
    if mode != "auto":
        return mode
    if torch.device(device).type != "cuda":
        return "chunked"
    from kt_core.loss import _library

    return "chunked" if isinstance(_library("liger"), str) else "liger"


def usable_gpu_bytes(device: str | torch.device) -> int | None:
    """What the run may use on `device` when no gpu_memory_limit is given: CUDA's free memory plus what this
    process's allocator already holds there (the model, when it is loaded already); None without CUDA."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(dev)
    return int(free) + int(torch.cuda.memory_reserved(dev))


# ---- the plan --------------------------------------------------------------------------------------------------


# How far the estimate may be from the measured peak: +7% on DeepSeek-V2-Lite at 16 x 2048 through the stock
# Trainer (benchmarks/RESULTS.md, 2026-12-03), -4% to +4% on the other recorded runs.
ESTIMATE_TOLERANCE = 0.10


@dataclass
class GpuMemoryPlan:
    """The planned bytes of each part on one GPU, and the limit they are checked against.

    Attributes:
        inputs: what the plan was computed from.
        parts: {part: bytes}, in the order of the module docstring.
        peak: the planned peak (see the module docstring).
        limit: bytes the run may hold (None: unknown, nothing is checked).
        limit_source: where `limit` came from ("gpu_memory_limit", or CUDA's free memory).
        capacity, residents: experts per streaming slot, resident experts per layer.
        elastic_residents: whether the residents were fitted under the limit (they then never refuse a plan).
        expert_lora_on_gpu: whether the expert-LoRA factors are planned on the GPU (enable_streaming's setting).
    """

    inputs: PlanInputs
    parts: dict[str, int] = field(default_factory=dict)
    peak: int = 0
    limit: int | None = None
    limit_source: str = "gpu_memory_limit"
    capacity: int = 0
    residents: int = 0
    elastic_residents: bool = False
    expert_lora_on_gpu: bool = False

    @property
    def margin(self) -> int:
        return allocator_margin(self.limit) if self.limit is not None else 0

    @property
    def fits(self) -> bool:
        return self.limit is None or self.peak + self.margin <= self.limit

    def table(self) -> str:
        """The breakdown as one table (logged at the start of the run)."""
        run = self.inputs.run
        tokens = (
            f"batch {run.batch} x {run.seq_len} tokens" if run.seq_len else f"batch {run.batch}, no sequence length"
        )
        head = (
            f"GPU memory plan, {self.inputs.device} ({tokens}, gradient checkpointing "
            f"{'on' if run.gradient_checkpointing else 'off'}, {str(run.dtype).removeprefix('torch.')}, "
            f"loss {run.loss_backend if run.loss_on_device else 'on another GPU'}):"
        )
        rows = [(self._label(name), nbytes) for name, nbytes in self.parts.items()]
        rows.append(("peak: static parts + layer inputs + max(loss, layer + kept)", self.peak))
        width = max(len(label) for label, _ in rows)
        lines = [head] + [f"  {label:<{width}}  {format_bytes(n):>11}" for label, n in rows]
        if self.limit is None:
            lines.append("  no limit to check against (no CUDA device, no gpu_memory_limit)")
        else:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            lines.append(
                f"  {'limit (' + self.limit_source + ')':<{width}}  {format_bytes(self.limit):>11}  "
                f"(allocator margin {format_bytes(self.margin)}): {verdict}"
            )
        if run.seq_len is None:
            lines.append("  activations and the loss are not planned: the sequence length is unknown")
        return "\n".join(lines)

    def _label(self, name: str) -> str:
        d, s = self.inputs.dims, self.inputs.streaming
        if name == "trainable state":
            return f"trainable state (gradients + {self.inputs.optimizer_states} optimizer states)"
        if name == "streaming slots" and s is not None:
            kind = ", int8" if s.quantize else ""
            if d.expert_block and self.capacity:
                group = min(self.capacity, dequant_group(d.hidden, d.expert_intermediate, _dequant_bytes(self.inputs)))
                kind = f", fp8 + bf16 dequantization buffer of {group}" if group else ", fp8, multiplied from e4m3"
            return f"streaming slots (2 x {self.capacity} experts{kind})"
        if name == "resident experts" and s is not None:
            return f"resident experts ({self.residents}/layer x {d.moe_layers}{', fitted' * self.elastic_residents})"
        if name == "layer inputs" and self.inputs.run.gradient_checkpointing:
            return f"layer inputs kept by checkpointing ({len(d.layers) + 1} x [T, H])"
        if name == "layer inputs":
            return f"saved activations of {len(d.layers)} layers"
        return name

    def check(self, knobs: Knobs = Knobs()) -> None:
        """Raises MemoryPlanError, naming what to change and to what, when the plan does not fit its limit.

        Against CUDA's free memory (no limit given), a plan over it by less than ESTIMATE_TOLERANCE only warns:
        the plan is an estimate, and must not refuse a run that fits. A given limit is always enforced.
        """
        if self.fits:
            return
        over = (self.peak + self.margin) / self.limit - 1
        if self.limit_source != "gpu_memory_limit" and over <= ESTIMATE_TOLERANCE:
            logger.warning(
                "GPU memory plan for %s: the run is planned at %s (+ %s allocator margin), %.0f%% over the %s "
                "(%s); within the estimate's error, so the run goes on. Set %s to have such a plan refused.",
                self.inputs.device, format_bytes(self.peak), format_bytes(self.margin), 100 * over,
                self.limit_source, format_bytes(self.limit), knobs.limit,
            )  # fmt: skip
            return
        source = knobs.limit if self.limit_source == "gpu_memory_limit" else self.limit_source
        remedies = self._remedies(knobs)
        raise MemoryPlanError(
            f"GPU memory plan for {self.inputs.device}: the run needs {format_bytes(self.peak)} "
            f"(+ {format_bytes(self.margin)} allocator margin), {source} is {format_bytes(self.limit)}. "
            + "; or ".join([remedies[0][:1].upper() + remedies[0][1:], *remedies[1:]])
            + ".\n"
            + self.table()
        )

    def _remedies(self, knobs: Knobs) -> list[str]:
        """What would make the plan fit, each with the number to set (computed by planning again)."""
        run, inputs = self.inputs.run, self.inputs
        if self.limit_source == "gpu_memory_limit":
            gib = _smallest_gib(self.peak, lambda n: self._fits_with(limit=n * 2**30))
            out = [f"raise {knobs.limit} to >= {gib}GiB"]
        else:
            gib = math.ceil((self.peak + allocator_margin(self.peak)) / 2**30)
            out = [
                f"free GPU memory, or use a larger GPU (the run needs >= {gib}GiB), or set {knobs.limit} to what "
                "the run may use if you know the estimate is high here"
            ]
        if run.seq_len:
            batch = _largest(run.batch - 1, lambda b: self._fits_with(run=dataclasses.replace(run, batch=b)))
            seq = _largest(run.seq_len - 1, lambda n: self._fits_with(run=dataclasses.replace(run, seq_len=n)))
            lower = [f"{knobs.batch} to <= {batch}"] if batch else []
            lower += [f"{knobs.seq_len} to <= {seq}"] if seq else []
            if lower:
                out.append("lower " + " or ".join(lower))
        expert = self.parts["streaming slots"] + (0 if self.elastic_residents else self.parts["resident experts"])
        if expert:
            stream = inputs.streaming
            mib = _largest(
                expert // 2**20 - 1,
                lambda n: self._fits_with(streaming=dataclasses.replace(stream, expert_gpu_memory=n * 2**20)),
            )
            if mib:
                size = f"{mib / 1024:.1f}GiB" if mib >= 1024 and mib % 1024 == 0 else f"{mib}MiB"
                out.append(f"lower {knobs.experts} to <= {size} (expert weights now {format_bytes(expert)})")
            elif self._fits_with(streaming=None):
                out.append(f"leave {knobs.experts} out (the CPU computes every expert)")
        kept = self.parts["kept expert intermediates"]
        if kept:
            out.append(f"lower {knobs.keep} (now {format_bytes(kept)} kept)")
        return out

    def _fits_with(self, *, limit: int | None = None, **changes) -> bool:
        """Whether the plan fits with other inputs, or under another gpu_memory_limit."""
        inputs = dataclasses.replace(self.inputs, **changes)
        if limit is not None:
            return plan_gpu_memory(inputs, limit).fits
        user = self.limit if self.limit_source == "gpu_memory_limit" else None
        return plan_gpu_memory(inputs, user, limit=self.limit).fits


def _smallest_gib(peak: int, fits) -> int:
    """The smallest whole GiB n >= peak with fits(n) (a limit without expert_gpu_memory sizes the slots)."""
    n = max(1, math.ceil(peak / 2**30))
    for _ in range(4096):
        if fits(n):
            return n
        n += 1
    return n


def _largest(high: int, fits) -> int:
    """The largest n in [1, high] with fits(n) (fits grows monotonically smaller with n), or 0."""
    low, best = 1, 0
    while low <= high:
        mid = (low + high) // 2
        if fits(mid):
            best, low = mid, mid + 1
        else:
            high = mid - 1
    return best


def plan_gpu_memory(
    inputs: PlanInputs, gpu_memory_limit: int | str | None = None, *, limit: int | None = None
) -> GpuMemoryPlan:
    """The bytes of each part (module docstring) and the limit they are checked against.

    Args:
        inputs: the model's shapes, the run, the weights on the GPU, the streaming settings.
        gpu_memory_limit: the most the whole run may hold ("24GiB"); None: CUDA's free memory on the device
            (plus what this process holds there already), or no check without CUDA.
        limit: the bytes to check against when gpu_memory_limit is None (a caller that read them already).
    """
    user_limit = optional_size(gpu_memory_limit, "gpu_memory_limit")
    plan = GpuMemoryPlan(inputs)
    if user_limit is not None:
        plan.limit = user_limit
    else:
        plan.limit = limit if limit is not None else usable_gpu_bytes(inputs.device)
        plan.limit_source = "the free memory CUDA reports"
    dims, run, s = inputs.dims, inputs.run, inputs.streaming
    d = torch.tensor([], dtype=run.dtype).element_size()
    streamed = s is not None and dims.moe_layers > 0
    per_expert = slot_bytes_per_expert(
        dims.hidden, dims.expert_intermediate, dims.expert_item, s.quantize if s else None, block=dims.expert_block
    )
    dequant = _dequant_bytes(inputs)
    if streamed:
        budget = optional_size(s.expert_gpu_memory, "expert_gpu_memory")
        left = None if user_limit is None else user_limit - inputs.weights_bytes
        fp8 = dims.expert_block is not None
        plan.capacity, plan.residents = expert_memory_split(
            budget, left, experts=dims.experts, layers=dims.moe_layers, expert_bytes=dims.expert_bytes,
            per_expert=per_expert, mode=s.mode,
            group=dequant_group(dims.hidden, dims.expert_intermediate, dequant) if fp8 else 0,
            group_expert_bytes=3 * dims.hidden * dims.expert_intermediate * 2 if fp8 else 0,
        )  # fmt: skip
        plan.elastic_residents = user_limit is not None and plan.residents > 0
    on_device = streamed and plan.capacity == dims.experts  # whole layers in a slot: the device path, which keeps
    parts = plan.parts
    parts["non-expert weights"] = inputs.weights_bytes
    parts["trainable state"] = inputs.trainable_bytes * (1 + inputs.optimizer_states)
    parts["expert LoRA on the GPU"] = 0
    parts["streaming slots"] = plan.capacity * per_expert + dequant_buffer_bytes(
        dims.hidden, dims.expert_intermediate, plan.capacity, block=dims.expert_block, dequant_bytes=dequant
    )
    gate_up = 2 * dims.expert_intermediate * dims.hidden * dims.expert_item  # bytes of one expert's gate_up
    exact_tiles = streamed and not s.quantize and dims.expert_item in (1, 2)  # bf16 / FP8 packed copies stream
    parts["packed-copy staging"] = stage_bytes(gate_up, plan.capacity) if exact_tiles else 0
    parts["resident experts"] = 0
    inputs_bytes, layer_bytes = _activations(dims, run, d, streamed)
    parts["layer inputs"] = inputs_bytes
    parts["one layer's working set"] = layer_bytes
    T, K, H, I = run.tokens, dims.top_k, dims.hidden, dims.expert_intermediate
    kept = min(parse_size(s.keep_bytes, "keep_bytes"), T * K * 2 * I * d) if on_device else 0
    parts["kept expert intermediates"] = kept if run.gradient_checkpointing else 0
    parts["loss workspace"] = (
        loss_workspace_bytes(T, dims.vocab, H, backend=run.loss_backend, dtype=run.dtype,
                             lm_head_trainable=run.lm_head_trainable)
        if T and run.loss_on_device else 0
    )  # fmt: skip
    plan.peak = _peak(parts)
    lora_state = expert_lora_state_bytes(dims, inputs.optimizer_states) if streamed and s.mode != "cpu" else 0
    if lora_state and s.expert_lora_on_gpu is not False:
        parts["expert LoRA on the GPU"] = lora_state
        plan.peak = _peak(parts)
        plan.expert_lora_on_gpu = s.expert_lora_on_gpu or plan.fits
        if not plan.expert_lora_on_gpu:  # host memory then: slower steps, no refusal for their sake
            parts["expert LoRA on the GPU"] = 0
            plan.peak = _peak(parts)
    if streamed and plan.residents:
        per_resident = dims.moe_layers * dims.expert_bytes  # one more resident in every layer
        if plan.elastic_residents:  # the runtime keeps what fits after step 1
            room = plan.limit - plan.peak - allocator_margin(plan.limit)
            plan.residents = min(plan.residents, max(0, room // max(1, per_resident)))
        parts["resident experts"] = plan.residents * per_resident
        plan.peak = _peak(parts)
    return plan


def _dequant_bytes(inputs: PlanInputs) -> int:
    """The FP8 working buffer as enable_streaming sizes it: none where the GEMMs multiply from e4m3."""
    s, dims = inputs.streaming, inputs.dims
    asked = parse_size(s.dequant_bytes, "dequant_bytes") if s is not None else DEQUANT_BYTES
    return fp8_gemm.dequant_bytes_needed(asked, dims.hidden, dims.expert_intermediate, dims.expert_block, inputs.device)


def expert_lora_state_bytes(dims: ModelDims, optimizer_states: int = 2) -> int:
    """The expert-LoRA factors of every MoE layer in fp32 with their gradients and optimizer states."""
    factors = dims.experts * dims.expert_lora_rank * (2 * dims.hidden + 3 * dims.expert_intermediate)
    return dims.moe_layers * factors * 4 * (2 + optimizer_states)


def _peak(parts: dict[str, int]) -> int:
    static = sum(
        parts[k]
        for k in (
            "non-expert weights", "trainable state", "expert LoRA on the GPU", "streaming slots", "resident experts"
        )
    )  # fmt: skip
    transient = max(parts["loss workspace"], parts["one layer's working set"] + parts["kept expert intermediates"])
    return static + parts["layer inputs"] + transient


def _activations(dims: ModelDims, run: RunShape, d: int, streamed: bool) -> tuple[int, int]:
    """(layer inputs, one layer's working set) in bytes; see the module docstring for the formulas."""
    T = run.tokens
    if not T or not dims.layers:
        return 0, 0
    H, E, K, I, r = dims.hidden, dims.experts, dims.top_k, dims.expert_intermediate, dims.expert_lora_rank
    factors = E * r * (2 * H + 3 * I)  # expert-LoRA elements of one layer
    pieces = min(PIECE_ROWS, T * K)

    def saved(layer: LayerDims) -> int:
        per_token = d * layer.linear + (d + 1) * layer.lora_inputs + 4 * dims.heads
        if layer.moe:
            per_token += 8 * E + 12 * K + (d + 4) * H
        return T * per_token + (factors * d if layer.moe and streamed else 0)

    def transient(layer: LayerDims) -> int:
        out = T * 2 * d * layer.widest
        if layer.moe:
            out += T * 4 * H
            if streamed:
                out += 2 * pieces * (2 * H + 3 * I) * d + 40 * T * K + factors * 4
        return out

    if run.gradient_checkpointing:
        return (len(dims.layers) + 1) * T * H * d, max(saved(x) + transient(x) for x in dims.layers)
    return sum(saved(x) for x in dims.layers), max(transient(x) for x in dims.layers)


# ---- from a checkpoint folder, before loading ----------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSizes:
    """The LoRA a run will put on the model (PEFT's LoraConfig as a host framework builds it).

    Attributes:
        rank: r.
        targets: module names PEFT matches by suffix, or ["all"] (every linear but lm_head).
        dropout: lora_dropout (> 0: each targeted linear's input is copied, with a mask).
        item: bytes per factor element (4: fp32 factors, what PEFT and LLaMA-Factory train by default).
        experts: whether the routed experts get LoRA too (host-side factors; their device copies when streamed).
    """

    rank: int
    targets: tuple[str, ...]
    dropout: float = 0.0
    item: int = 4
    experts: bool = True


def checkpoint_inputs(
    path,
    run: RunShape,
    *,
    device=None,
    rules=None,
    dtype: torch.dtype | None = None,
    lora: LoraSizes | None = None,
    loss_mode: str = "auto",
    optimizer_states: int = 2,
    streaming: StreamingSizes | None = None,
    expert_dtype: torch.dtype | str | None = None,
) -> PlanInputs | None:
    """The plan's inputs for the checkpoint folder `path`, from its config.json alone (no weight is read).

    The model is built on the meta device and placed as kt_core.load_model places it (same devices, rules,
    dtype); the plan is for the first device. Returns None when that is not a GPU.

    Args:
        path: the checkpoint folder.
        run: batch, sequence, checkpointing (its dtype and loss backend are replaced by what is resolved here).
        device, rules: as load_model takes them.
        dtype: the compute dtype (None: the config's, as load_model resolves it without a checkpoint header).
        lora: the LoRA the run adds (None: none).
        loss_mode: kt_core.loss mode ("off" for transformers' loss), resolved on the device (loss_backend()).
        optimizer_states, streaming: as PlanInputs.
        expert_dtype: as load_model takes it: "fp8" keeps an FP8 checkpoint's experts as FP8 (1 byte a weight and
            block scales, in host RAM, in the streaming slots and as residents); None: dequantized at load.
    """
    import json
    from pathlib import Path

    from kt_core.architectures import get_architecture
    from kt_core.loading.loader import resolve_devices, resolve_rules
    from kt_core.loading.meta import build_meta_model
    from kt_core.placement import resolve_placement

    devices = resolve_devices(device)
    if torch.device(devices[0]).type != "cuda":
        return None
    config_dict = json.loads((Path(path).expanduser() / "config.json").read_text())
    arch = get_architecture(config_dict)
    config = arch.build_config({k: v for k, v in config_dict.items() if k != "quantization_config"})
    dtype = dtype or _config_dtype(config, config_dict)
    model = build_meta_model(config, dtype)
    placement = resolve_placement(
        model, resolve_rules(rules, arch, devices), arch=arch, default_device=devices[0], devices=devices,
        warn_unmatched=False,
    )  # fmt: skip

    def on_device(name: str) -> bool:
        return placement.expert_module_of(name) is None and placement.device_of(name) == devices[0]

    targets = list(lora.targets) if lora is not None else []
    lora_bytes = sum(
        lora.rank * (m.in_features + m.out_features) * lora.item
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and targets and on_device(name) and matches_lora_target(name, targets)
    )
    tensors = [*model.named_parameters(), *model.named_buffers()]
    dims = model_dims(
        model,
        include=lambda name, linear: on_device(name),
        lora_targets=targets,
        lora_dropout=lora.dropout if lora is not None else 0.0,
        expert_lora_rank=lora.rank if lora is not None and lora.experts else 0,
    )
    if expert_dtype is not None:
        from kt_core.loading.fp8 import expert_store_dtype, fp8_block_size

        block = fp8_block_size(config_dict)
        if expert_store_dtype(expert_dtype, block is not None, "auto", dtype) == torch.float8_e4m3fn:
            dims = dataclasses.replace(dims, expert_item=1, expert_block=block)
    run = dataclasses.replace(
        run,
        dtype=dtype,
        loss_backend=loss_backend(loss_mode, devices[0]),
        loss_on_device=placement.device_of("lm_head.weight") == devices[0],
    )
    return PlanInputs(
        dims,
        run,
        weights_bytes=sum(t.numel() * t.element_size() for n, t in tensors if on_device(n)) + lora_bytes,
        trainable_bytes=lora_bytes,
        optimizer_states=optimizer_states,
        streaming=streaming,
        device=devices[0],
    )


def _config_dtype(config, config_dict: dict) -> torch.dtype:
    configured = getattr(config, "dtype", None) or config_dict.get("torch_dtype")
    if isinstance(configured, str):
        configured = getattr(torch, configured, None)
    return configured if configured in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16


# ---- for the front ends ------------------------------------------------------------------------------------------


def check_and_log(plan: GpuMemoryPlan, knobs: Knobs = Knobs(), log: logging.Logger | None = None) -> GpuMemoryPlan:
    """Logs the plan's table, remembers it (last_plan()), and refuses it when it does not fit (MemoryPlanError)."""
    global _last
    _last = plan
    (log or logger).info("%s", plan.table())
    plan.check(knobs)
    return plan


def last_plan() -> GpuMemoryPlan | None:
    """The plan check_and_log saw last in this process (benchmarks print it beside the measured peak)."""
    return _last

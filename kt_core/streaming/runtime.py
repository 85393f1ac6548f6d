"""StreamingRuntime and `enable_streaming`: split every MoE layer of a model between CPU and GPU compute.

    rt = kt_core.enable_streaming(model, expert_gpu_memory="10GiB", device="cuda:0")
    ...train as usual...                      # each step logs the CPU / PCIe / GPU split (logger kt_core.streaming)
    rt.last_report                            # the last step's numbers, as a dict
    rt.disable()                              # back to CPU-only experts; unpins host memory

The runtime owns the weight store (pinned host weights, two device slots, residents), the cost model and
the per-layer routing statistics. A layer's call (`begin`) makes sure its streamed experts are in a slot
(copying them now only when no prefetch did), then starts the copy of the next layer in pass order on the
side stream: the following layer in the forward, the preceding one in the backward and in the recomputation
of a checkpointed layer (which runs inside the backward and so shares the backward's copy).

Plans are made ahead, once per step and layer, from the routing statistics of the steps before (uniform
counts on the first step): the routing counts accumulate on the device during a step and come to the host
once, when the step closes. When a plan leaves the CPU nothing to do, the layer streams all its experts, so
its calls take the device path (kt_core/streaming/share.py) (no host synchronisation, no CPU thread hand-off).
A layer whose CPU operator is not built yet and whose experts all fit a slot gets a CPU share only when the share's
modeled saving over the steps left (`set_steps_left`, from the training plugins) pays for packing the operator.

Host RAM: a layer streams from its weights until its CPU operator packs them (its first CPU share); from the next step
on it streams from the packed copy and frees the weights (`release_packed_weights`, which the training plugins set as
they set the release of CPU-only layers), so host RAM holds each layer's experts once (kt_core/streaming/tiles.py).

FP8 experts (KTExperts(dtype=torch.float8_e4m3fn)) stream and stay resident as FP8, dequantized to bf16 on the
device right before their GEMMs, a group of experts at a time into one working buffer of `dequant_bytes` (store.py).

`expert_gpu_memory` bounds the device bytes of expert weights (the two slots, the int8 scratch or the FP8 working
buffer, and the resident experts); the rest of the model and the activations come on top. `gpu_memory_limit` bounds the
whole run: the resident experts are sized from the first step's measured peak so that the total stays under it.
The front ends check the whole run against it before streaming starts (kt_core/streaming/memory_plan.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from kt_core.experts import KTExperts
from kt_core.settings import optional_size, parse_size, renamed
from kt_core.streaming import fp8_gemm
from kt_core.streaming.planner import (
    DEQUANT_BYTES,
    PIECE_ROWS,
    CostModel,
    LayerPlan,
    allocator_margin,
    dequant_group,
    expert_memory_split,
    plan_layer,
    slot_bytes_per_expert,
)
from kt_core.streaming.share import StreamedShare
from kt_core.streaming.store import ExpertStore
from kt_core.streaming.tiles import tiles_of

__all__ = ["StreamingRuntime", "enable_streaming"]

logger = logging.getLogger("kt_core.streaming")

# Host bytes a second the CPU operator packs (its tile layout) on 15 AMX threads: a full-width DeepSeek-V3 layer,
# FP8 (11.3 GB), in ~9.5 s (benchmarks/RESULTS.md 2026-12-06); bf16 (22.5 GB) in ~20 s.
PACK_BYTES_PER_S = 1.1e9


class StreamingRuntime:
    """Shared state of the streamed layers of one model (see the module docstring)."""

    def __init__(
        self,
        device,
        store: ExpertStore,
        *,
        mode: str,
        cost: CostModel,
        resident_per_layer: int,
        keep_bytes: int = 2**30,
        piece_rows: int = PIECE_ROWS,
        gpu_memory_limit: int | None = None,
    ):
        self.device = torch.device(device)
        self.keep_bytes = keep_bytes  # a recomputed layer's expert intermediates kept for its backward, at most
        self.piece_rows = piece_rows  # sorted slots per piece of a device-path call (bounds its intermediates)
        self.store = store
        self.mode = mode
        self.cost = cost
        self.resident_per_layer = resident_per_layer  # at most; a gpu_memory_limit can lower it after step 1
        self.gpu_memory_limit = gpu_memory_limit  # bytes the whole run may hold on the device (None: no check)
        self.peak_bytes = self._device_peak  # what step 1 peaked at; replaceable where there is no CUDA
        self.layers: list[KTExperts] = []  # in forward-pass order
        self.counts: list[torch.Tensor | None] = []  # [E] float EMA of routed slots per expert
        self.plans: list[LayerPlan] = []
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kt-cpu-experts")
        self.history: list[dict] = []
        self.last_report: dict | None = None
        self._taken = 0  # history entries take_totals() has summed already
        self._fresh: list[bool] = []  # plans[i] made for this step
        self._step_counts: list[torch.Tensor | None] = []  # [E] routed slots per expert this step (device)
        self._positions: dict[tuple, torch.Tensor] = {}  # expert list -> [E] position map on the device
        self._kept: dict[int, tuple] = {}  # layer -> (key, intermediates) from a recomputation, for its backward
        self._saw_backward = False
        self._step_t0 = time.perf_counter()
        # Steps left in the run (the training plugins set it each step; None: unknown). A layer whose CPU operator is
        # not built yet gets a CPU share only when the share's modeled saving over these steps pays for the packing.
        self.remaining_steps: int | None = None
        # Whether a layer whose CPU operator has packed its experts streams from that copy and frees its weights
        # (`_stream_from_packed_copies`): the training plugins set it as they decide the release of CPU-only layers
        # (kt_core.runtime.pack_cache.training_releases_weights); off otherwise (the weights stay).
        self.release_packed_weights = False
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._cpu = [0.0, 0.0, 0]  # seconds, flops, slots
        self._gpu: list = []  # (start, end) events or seconds
        self._gpu_flops = 0.0
        self._gpu_slots = 0
        self._streamed: list[int] = [0] * len(self.layers)

    # ---- per call ---------------------------------------------------------------------------------

    def begin(self, layer: int, ids: torch.Tensor, phase: str) -> list[tuple]:
        """Weights of the GPU side of `layer` for this call: [(experts, w13 [G, 2I, H], w2 [G, H, I]), ...].

        Never waits for the device, nor makes it wait: the routing counts are accumulated where `ids` lives; the
        call makes the compute stream wait for the slot (`store.ready`) and starts the next layer's copy (`prefetch`)
        right before its GPU work.
        """
        if phase == "fwd":
            if layer == 0 and self._saw_backward:
                self.end_step()
            self._count(layer, ids)
        else:
            self._saw_backward = True
        slots = ids.numel()
        if self.store.holds(layer) is None:
            self.store.load(layer, self.plan(layer, slots).stream)
        experts, w13, w2 = self.store.acquire(layer)
        lw = self.store.layers[layer]
        in_slot = set(lw.resident) & set(experts)  # residents a whole-layer slot holds as well
        if phase == "fwd" and layer < len(self._streamed):
            self._streamed[layer] = len(experts) - len(in_slot)
        out = [(experts, w13, w2)] if experts else []
        if lw.resident and not in_slot:
            out.append((lw.resident, *self.store.resident_weights(layer)))
        return out

    def prefetch(self, layer: int, phase: str, slots: int) -> None:
        """Starts copying the layer after `layer` in this pass's order (the following one in the forward, the
        preceding one in the backward and the recomputation) into the other slot.

        Call it once the call's own host-to-device copies are queued (the expert-LoRA factors): copies from the
        host share the GPU's copy engine whatever their stream, so a small copy the compute stream needs, queued
        behind a whole layer's weights, would hold the layer's compute until that prefetch is done.
        """
        nxt = layer + (1 if phase == "fwd" else -1)
        if 0 <= nxt < len(self.layers):
            self.store.load(nxt, self.plan(nxt, slots).stream, avoid=layer)

    def _count(self, layer: int, ids: torch.Tensor) -> None:
        E = self.layers[layer].num_experts
        flat = ids.reshape(-1).long()
        ones = (flat >= 0).float()
        if self._step_counts[layer] is None:
            self._step_counts[layer] = torch.zeros(E, dtype=torch.float32, device=ids.device)
        self._step_counts[layer].index_add_(0, flat.clamp(min=0), ones)

    def local_index(self, experts: list[int], device: torch.device) -> torch.Tensor:
        """[E] int64 map from expert id to its position in `experts` (-1 where absent), on `device`."""
        key = (tuple(experts), str(device))
        pos = self._positions.get(key)
        if pos is None:
            E = self.layers[0].num_experts
            host = torch.full((E,), -1, dtype=torch.int64)
            host[torch.tensor(experts, dtype=torch.int64)] = torch.arange(len(experts))
            pos = self._positions[key] = host.to(device)
        return pos

    def keep(self, layer: int, key: tuple, state: tuple) -> None:
        """Holds a recomputation's intermediates for the backward of the same layer that follows it."""
        self._kept[layer] = (tuple(t.data_ptr() for t in key), state)

    def end(self, layer: int) -> None:
        self.store.release(layer)

    def take_kept(self, layer: int, key: tuple) -> tuple | None:
        held = self._kept.pop(layer, None)
        if held is None or held[0] != tuple(t.data_ptr() for t in key):
            return None
        return held[1]

    def plan(self, layer: int, slots: int) -> LayerPlan:
        """This step's plan of `layer` (made once per step, from the steps before; uniform on the first)."""
        if self._fresh[layer]:
            return self.plans[layer]
        m = self.layers[layer]
        E = m.num_experts
        counts = self.counts[layer].tolist() if self.counts[layer] is not None else [slots / E] * E
        resident = self.store.layers[layer].resident
        p = self._plan_layer(layer, counts, self.mode)
        rest = [e for e in range(E) if e not in set(resident)]
        if self.mode == "auto" and len(rest) <= self.store.capacity:
            p = self._unless_packing_costs_more(layer, p, counts)
        covered = set(p.stream) | set(resident)
        if (
            self.mode != "cpu"
            and rest
            and len(rest) <= self.store.capacity
            and all(e in covered for e, c in enumerate(counts) if c > 0)
        ):  # the CPU has nothing to do: stream the whole layer (same bytes give or take, no host split)
            p.stream = rest
            p.pcie_s = self.cost.pcie_passes * len(rest) * self.store.expert_bytes(layer) / self.cost.pcie_bytes_per_s
        self.plans[layer] = p
        self._fresh[layer] = True
        return p

    def _plan_layer(self, layer: int, counts: list[float], mode: str) -> LayerPlan:
        m = self.layers[layer]
        return plan_layer(
            counts,
            hidden=m.hidden_dim,
            intermediate=m.intermediate_dim,
            expert_bytes=self.store.expert_bytes(layer),
            capacity=self.store.capacity,
            cost=self.cost,
            resident=self.store.layers[layer].resident,
            mode=mode,
        )

    def set_steps_left(self, optimizer_steps: int, accumulation: int = 1) -> None:
        """The run's optimizer steps left and its gradient accumulation: the streaming steps (forward + backward
        passes) left, which decide whether packing a layer's CPU operator pays (`plan`)."""
        self.remaining_steps = max(0, int(optimizer_steps)) * max(1, int(accumulation))

    def _unless_packing_costs_more(self, layer: int, p: LayerPlan, counts: list[float]) -> LayerPlan:
        """`p`, or the plan streaming every routed expert when `p`'s CPU share would first have to pack the layer's
        CPU operator (a full-width FP8 DeepSeek-V3 layer: ~10 s, inside the step) and saves less than that over the
        steps left. Only for layers whose routed experts all fit a slot, so that no CPU share is left either way."""
        m = self.layers[layer]
        streamed = set(p.stream) | set(self.store.layers[layer].resident)
        if all(e in streamed for e, c in enumerate(counts) if c > 0):
            return p  # no CPU share
        pack_bytes = m.pending_pack_bytes()
        if not pack_bytes:
            return p  # built already (or a kernel that packs nothing)
        gpu = self._plan_layer(layer, counts, "gpu")
        pack_s = pack_bytes / PACK_BYTES_PER_S
        saving_s = gpu.step_s - p.step_s
        if self.remaining_steps is not None and saving_s * self.remaining_steps < pack_s:
            return gpu
        logger.info(
            "streaming: layer %d takes a CPU share: its CPU operator packs now (%.1f GiB, ~%.0f s at %.1f GB/s), "
            "saving a modeled %.0f ms a step over %s steps left",
            layer,
            pack_bytes / 2**30,
            pack_s,
            PACK_BYTES_PER_S / 1e9,
            saving_s * 1e3,
            "unknown" if self.remaining_steps is None else self.remaining_steps,
        )
        return p

    def submit_cpu(self, layer: int, phase: str, fn, *, slots: int) -> Future:
        m = self.layers[layer]
        flops = slots * 6 * m.hidden_dim * m.intermediate_dim * (2 if phase == "bwd" else 1)

        def timed():
            t0 = time.perf_counter()
            out = fn()
            self._cpu[0] += time.perf_counter() - t0
            self._cpu[1] += flops
            self._cpu[2] += slots if phase == "fwd" else 0
            return out

        return self.pool.submit(timed)

    @contextlib.contextmanager
    def gpu_timer(self, layer: int, phase: str, slots: int):
        m = self.layers[layer]
        self._gpu_flops += slots * 6 * m.hidden_dim * m.intermediate_dim * (4 if phase == "bwd" else 1)
        self._gpu_slots += slots if phase == "fwd" else 0
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._gpu.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._gpu.append(time.perf_counter() - t0)

    # ---- per step ---------------------------------------------------------------------------------

    def take_totals(self) -> dict | None:
        """The steps closed since the last call, summed (None when none closed): `steps`, `cpu_s` (the CPU
        operator's seconds), `pcie_s`, `pcie_gb`, `gpu_s`, and `cpu_slot_share` (mean over those steps)."""
        new = self.history[self._taken :]
        self._taken = len(self.history)
        if not new:
            return None
        totals = {key: sum(r[key] for r in new) for key in ("cpu_s", "pcie_s", "pcie_gb", "gpu_s")}
        totals["steps"] = len(new)
        totals["cpu_slot_share"] = sum(r["cpu_slot_share"] for r in new) / len(new)
        return totals

    def end_step(self) -> dict:
        """Closes a step (called on the first layer's next forward, or by the training loop): logs and re-plans."""
        wall = time.perf_counter() - self._step_t0
        for i, c in enumerate(self._step_counts):  # this step's routing joins the statistics (one copy per layer)
            if c is not None:
                c = c.cpu()
                old = self.counts[i]
                self.counts[i] = c if old is None else 0.5 * old + 0.5 * c
        self._step_counts = [None] * len(self.layers)
        self._kept.clear()
        pcie_s, pcie_bytes = self.store.take_pcie()
        self._stream_from_packed_copies()
        if self.device.type == "cuda":
            for _, e in self._gpu:
                e.synchronize()
            gpu_s = sum(s.elapsed_time(e) / 1e3 for s, e in self._gpu)
        else:
            gpu_s = sum(self._gpu)
        cpu_s, cpu_flops, cpu_slots = self._cpu
        self.cost.observe_pcie(pcie_bytes, pcie_s)
        self.cost.observe_cpu(cpu_flops, cpu_s)
        self.cost.observe_gpu(self._gpu_flops, gpu_s)
        total_slots = cpu_slots + self._gpu_slots
        report = dict(
            step=len(self.history) + 1,
            wall_s=wall,
            cpu_s=cpu_s,
            pcie_s=pcie_s,
            pcie_gb=pcie_bytes / 1e9,
            gpu_s=gpu_s,
            cpu_slot_share=cpu_slots / total_slots if total_slots else 0.0,
            streamed_per_layer=list(self._streamed),
            resident_per_layer=[len(lw.resident) for lw in self.store.layers],
            pcie_gb_per_s=self.cost.pcie_bytes_per_s / 1e9,
            cpu_tflops=self.cost.cpu_flops / 1e12,
            gpu_tflops=self.cost.gpu_flops / 1e12,
        )
        self.history.append(report)
        self.last_report = report
        s = report["streamed_per_layer"]
        logger.info(
            "streaming step %d: %.0f ms | CPU %.0f ms (%.0f%% of slots) | PCIe %.0f ms (%.2f GB) | GPU %.0f ms | "
            "streamed experts/layer %s (mean %.1f of %d) | resident/layer %d",
            report["step"], wall * 1e3, cpu_s * 1e3, 100 * report["cpu_slot_share"], pcie_s * 1e3,
            report["pcie_gb"], gpu_s * 1e3, s, sum(s) / max(1, len(s)),
            self.layers[0].num_experts if self.layers else 0, self.resident_per_layer,
        )  # fmt: skip
        if len(self.history) == 1 and self.gpu_memory_limit is not None:
            self.resident_per_layer = self._residents_within_limit()
        if self.resident_per_layer and not any(lw.resident for lw in self.store.layers):
            for i, c in enumerate(self.counts):  # hottest experts of each layer stay on the GPU from now on
                if c is not None:
                    self.store.invalidate(i)
                    self.store.set_resident(i, torch.argsort(c, descending=True)[: self.resident_per_layer].tolist())
        self._fresh = [False] * len(self.layers)
        for i in range(len(self.layers)):  # a slot holding last step's plan of a layer is refilled if it changed
            held = self.store.holds(i)
            if held is not None and held != self.store.slot_content(i, self.plan(i, 0).stream):
                self.store.invalidate(i)
        self._reset_counters()
        self._saw_backward = False
        self._step_t0 = time.perf_counter()
        return report

    def _stream_from_packed_copies(self) -> None:
        """Layers whose CPU operator has packed their experts stream from that copy from now on and free their weights
        (the module docstring), where `release_packed_weights` allows it."""
        if not self.release_packed_weights:
            return
        freed = sum(m.release_host_weights() for i, m in enumerate(self.layers) if self.stream_from_tiles(i))
        if freed:
            logger.info(
                "streaming: %.2f GiB of expert weights freed: their layers stream from the CPU operator's packed copy "
                "(keep_host_weights / kt_keep_host_weights keeps both)",
                freed / 2**30,
            )

    def stream_from_tiles(self, layer: int) -> bool:
        """Makes `layer` stream from its CPU operator's packed copy if it has one that keeps the weights exactly in
        tiles without padding (kt_core/streaming/tiles.py); True when it does so now. The weights stay until the
        caller frees them (KTExperts.release_host_weights)."""
        m = self.layers[layer]
        if self.store.layers[layer].tiles is not None or self.store.quantize is not None:
            return False
        op = m.packed_operator()
        if op is None or not op.packed_backward("bfloat16"):
            return False
        tiles = tiles_of(op, m.gate_up_proj, m.down_proj)
        if tiles is None:
            return False
        self.store.stream_from_tiles(layer, tiles, owner=op)
        return True

    def _device_peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0

    def _residents_within_limit(self) -> int:
        """Residents per layer that fit under `gpu_memory_limit` on top of what step 1 peaked at.

        Step 1 ran with the slots only, so its peak holds everything else a step needs (weights, activations,
        the loss, the kept intermediates); residents are static weights and add exactly their bytes.
        """
        peak, limit = self.peak_bytes(), self.gpu_memory_limit
        per_resident = len(self.layers) * self.store.resident_bytes(0)  # one more resident in every layer
        margin = allocator_margin(limit)
        fit = max(0, (limit - peak - margin) // max(1, per_resident))
        chosen = min(self.resident_per_layer, fit)
        gib = 2**30
        if peak > limit:
            logger.warning(
                "streaming: step 1 peaked at %.2f GiB, over gpu_memory_limit %.2f GiB, before any resident expert; "
                "lower the batch size or the sequence length, or stream_keep_bytes (kept intermediates, now "
                "%.2f GiB), or give the experts less (expert_gpu_memory)",
                peak / gib, limit / gib, self.keep_bytes / gib,
            )  # fmt: skip
        logger.info(
            "streaming: gpu_memory_limit %.2f GiB, step 1 peaked at %.2f GiB with the slots alone: %d resident "
            "experts per layer (%.2f GiB)%s",
            limit / gib, peak / gib, chosen, chosen * per_resident / gib,
            "" if chosen == self.resident_per_layer else f", {self.resident_per_layer} would have fit the budget",
        )  # fmt: skip
        return chosen

    def disable(self) -> None:
        """Restores the CPU-only forward of every layer, brings expert-LoRA factors on the GPU back to host
        memory, and releases pinned memory and device buffers."""
        for m in self.layers:
            m.detach_gpu_share()
            if m.lora is not None and m.lora.device.type != "cpu":
                m.lora.place_("cpu")
        self.store.close()
        self.pool.shutdown()


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
    for i, m in enumerate(layers):
        scales = (m.gate_up_proj_scale_inv.detach(), m.down_proj_scale_inv.detach()) if m.is_fp8 else None
        store.add_layer(m.gate_up_proj.detach(), m.down_proj.detach(), scales=scales, block=m.weight_block_size)
        rt.layers.append(m)
        rt.counts.append(None)
        rt.plans.append(LayerPlan())
        rt._fresh.append(False)
        rt._step_counts.append(None)
        if m.host_weights_released and not rt.stream_from_tiles(i):
            store.close()
            raise ValueError(
                f"enable_streaming: layer {i} released its host weights once packed (release_host_weights), and its "
                f"kernel's packed copy ({m.kernel}) cannot stream in their place (padded or quantized tiles); "
                "restore_host_weights() on each such layer gives them back"
            )
        m.attach_gpu_share(StreamedShare(rt, i))  # same module, names and state dict; the layer splits each call
    rt._reset_counters()
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

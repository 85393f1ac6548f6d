"""StreamingRuntime: the shared state of a model's streamed MoE layers (made by `enable_streaming`, enable.py).

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
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from kt_core.experts import KTExperts
from kt_core.streaming.planner import (
    PIECE_ROWS,
    CostModel,
    LayerPlan,
    allocator_margin,
    plan_layer,
)
from kt_core.streaming.store import ExpertStore
from kt_core.streaming.tiles import tiles_of

__all__ = ["StreamingRuntime"]

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

    def add_layer(self, m: KTExperts) -> int:
        """Streams layer `m` (the next in forward-pass order) from the store; returns its index."""
        i = len(self.layers)
        scales = (m.gate_up_proj_scale_inv.detach(), m.down_proj_scale_inv.detach()) if m.is_fp8 else None
        self.store.add_layer(m.gate_up_proj.detach(), m.down_proj.detach(), scales=scales, block=m.weight_block_size)
        self.layers.append(m)
        self.counts.append(None)
        self.plans.append(LayerPlan())
        self._fresh.append(False)
        self._step_counts.append(None)
        self._streamed.append(0)
        return i

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

"""StreamingRuntime and `enable_streaming`: split every MoE layer of a model between CPU and GPU compute.

    rt = kt_core.enable_streaming(model, gpu_memory_budget="10GiB", device="cuda:0")
    ...train as usual...                      # each step logs the CPU / PCIe / GPU split (logger kt_core.streaming)
    rt.last_report                            # the last step's numbers, as a dict
    rt.disable()                              # back to CPU-only experts; unpins host memory

The runtime owns the weight store (pinned host weights, two device slots, residents), the cost model and
the per-layer routing statistics. A layer's call (`begin`) makes sure its streamed experts are in a slot
(copying them now only when no prefetch did), then starts the copy of the next layer in pass order on the
side stream: the following layer in the forward, the preceding one in the backward and in the recomputation
of a checkpointed layer (which runs inside the backward and so shares the backward's copy).

`gpu_memory_budget` bounds the device bytes of expert weights (the two slots, the int8 scratch and the
resident experts); the rest of the model and the activations come on top.
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from kt_core.experts import KTExperts
from kt_core.runtime.staging import to_device
from kt_core.streaming.hybrid import HybridExperts
from kt_core.streaming.planner import CostModel, LayerPlan, parse_bytes, plan_layer, slot_capacity
from kt_core.streaming.store import ExpertStore

__all__ = ["StreamingRuntime", "enable_streaming"]

logger = logging.getLogger("kt_core.streaming")


class StreamingRuntime:
    """Shared state of the streamed layers of one model (see the module docstring)."""

    def __init__(self, device, store: ExpertStore, *, mode: str, cost: CostModel, resident_per_layer: int):
        self.device = torch.device(device)
        self.store = store
        self.mode = mode
        self.cost = cost
        self.resident_per_layer = resident_per_layer
        self.layers: list[HybridExperts] = []
        self.counts: list[torch.Tensor | None] = []  # [E] float EMA of routed slots per expert
        self.plans: list[LayerPlan] = []
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kt-cpu-experts")
        self.history: list[dict] = []
        self.last_report: dict | None = None
        self._saw_backward = False
        self._step_t0 = time.perf_counter()
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._cpu = [0.0, 0.0, 0]  # seconds, flops, slots
        self._gpu: list = []  # (start, end) events or seconds
        self._gpu_flops = 0.0
        self._gpu_slots = 0
        self._streamed: list[int] = [0] * len(self.layers)

    # ---- per call ---------------------------------------------------------------------------------

    def phase(self, *, forward: bool) -> str:
        """'fwd', 'recompute' (a checkpointed layer's forward inside the backward) or 'bwd'."""
        if not forward:
            return "bwd"
        return "recompute" if torch._C._current_graph_task_id() != -1 else "fwd"

    def begin(self, layer: int, ids_host: torch.Tensor, phase: str) -> list[tuple]:
        """Weights of the GPU side of `layer` for this call: [(experts, w13 [G, 2I, H], w2 [G, H, I]), ...]."""
        E = self.layers[layer].experts.num_experts
        counts = torch.bincount(ids_host.reshape(-1).clamp(min=-1) + 1, minlength=E + 1)[1:].float()  # [E]
        if phase == "fwd":
            if layer == 0 and self._saw_backward:
                self.end_step()
            old = self.counts[layer]
            self.counts[layer] = counts if old is None else 0.5 * old + 0.5 * counts
        else:
            self._saw_backward = True
        if self.store.holds(layer) is None:
            self.store.load(layer, self.plan(layer, counts).stream)
        step = 1 if phase == "fwd" else -1
        nxt = layer + step
        experts, w13, w2 = self.store.acquire(layer)
        if 0 <= nxt < len(self.layers):  # prefetch one layer ahead, in this pass's order
            self.store.load(nxt, self.plan(nxt, counts).stream, avoid=layer)
        if phase == "fwd" and layer < len(self._streamed):
            self._streamed[layer] = len(experts)
        lw = self.store.layers[layer]
        out = [(experts, w13, w2)] if experts else []
        if lw.resident:
            out.append((lw.resident, lw.res_w13, lw.res_w2))
        return out

    def end(self, layer: int) -> None:
        self.store.release(layer)

    def plan(self, layer: int, fallback_counts: torch.Tensor) -> LayerPlan:
        counts = self.counts[layer] if self.counts[layer] is not None else fallback_counts
        m = self.layers[layer].experts
        p = plan_layer(
            counts.tolist(),
            hidden=m.hidden_dim,
            intermediate=m.intermediate_dim,
            expert_bytes=self.store.expert_bytes(layer),
            capacity=self.store.capacity,
            cost=self.cost,
            resident=self.store.layers[layer].resident,
            mode=self.mode,
        )
        self.plans[layer] = p
        return p

    def submit_cpu(self, layer: int, phase: str, fn, *, slots: int) -> Future:
        m = self.layers[layer].experts
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
        m = self.layers[layer].experts
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

    def device_lora(self, layer: int, lora) -> tuple[torch.Tensor, ...] | None:
        """Device copies of the layer's LoRA factors ([E, ...] each) in the weights' dtype, fresh per call."""
        if not lora:
            return None
        dtype = self.layers[layer].experts.gate_up_proj.dtype
        if self.device.type != "cuda":
            return tuple(f.detach().to(dtype) for f in lora)
        # Through torch's pinned staging buffers (the optimizer rewrites the factors in place between steps).
        return tuple(to_device(f.detach(), self.device).to(dtype) for f in lora)

    @staticmethod
    def scaling(module: KTExperts) -> float:
        return module.lora.scaling if module.lora is not None else 1.0

    # ---- per step ---------------------------------------------------------------------------------

    def end_step(self) -> dict:
        """Closes a step (called on the first layer's next forward, or by the training loop): logs and re-plans."""
        wall = time.perf_counter() - self._step_t0
        pcie_s, pcie_bytes = self.store.take_pcie()
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
            self.layers[0].experts.num_experts if self.layers else 0, self.resident_per_layer,
        )  # fmt: skip
        if self.resident_per_layer and not any(lw.resident for lw in self.store.layers):
            for i, c in enumerate(self.counts):  # hottest experts of each layer stay on the GPU from now on
                if c is not None:
                    self.store.invalidate(i)
                    self.store.set_resident(i, torch.argsort(c, descending=True)[: self.resident_per_layer].tolist())
        self._reset_counters()
        self._saw_backward = False
        self._step_t0 = time.perf_counter()
        return report

    def disable(self) -> None:
        """Restores the CPU-only forward of every layer and releases pinned memory and device buffers."""
        for h in self.layers:
            h.experts.__dict__.pop("forward", None)
        self.store.close()
        self.pool.shutdown()


def enable_streaming(
    model: nn.Module,
    gpu_memory_budget: int | str | None = None,
    device: str | torch.device | None = None,
    *,
    mode: str = "auto",
    quantize: str | None = None,
    cost: CostModel | None = None,
) -> StreamingRuntime:
    """Splits every KTExperts layer of `model` between CPU compute and GPU compute on streamed weights.

    Args:
        model: a model whose routed experts are KTExperts (kt_core.load_model, convert_model, KTCallback).
        gpu_memory_budget: device bytes for expert weights ("10GiB", bytes, or None: two full-layer slots).
            What two slots of all E experts leave over is spent on resident experts (the hottest of each layer).
        device: the GPU (default cuda:0; without CUDA the CPU device stands in for it, for tests).
        mode: "auto" (per-layer cost model), "cpu" (everything on the CPU), "gpu" (stream every expert).
        quantize: None (stream the weights as stored) or "int8" (half the PCIe bytes; per-row symmetric int8,
            relative weight error 4e-3 on uniform and 8e-3 on Gaussian random bf16 weights; LoRA stays exact).
        cost: starting speeds for the planner (measured ones replace them as steps run).

    Returns:
        The StreamingRuntime (per-step reports in `.history`; `.disable()` undoes it).
    """
    layers = [m for m in model.modules() if isinstance(m, KTExperts)]
    if not layers:
        raise ValueError("enable_streaming: the model has no KTExperts layers (convert its experts first)")
    device = torch.device(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"enable_streaming: device {device} requested but CUDA is not available")
    first = layers[0]
    E = first.num_experts
    expert_bf = sum(t[0].numel() * t.element_size() for t in (first.gate_up_proj, first.down_proj))
    # Device bytes per expert of slot capacity: two slots, plus the dequantization scratch for int8.
    if quantize is None:
        per_expert = 2 * expert_bf
    else:
        q_bytes = first.gate_up_proj[0].numel() + first.down_proj[0].numel()  # int8 weights
        q_bytes += 4 * (2 * first.intermediate_dim + first.hidden_dim)  # fp32 row scales
        per_expert = 2 * q_bytes + expert_bf
    budget = parse_bytes(gpu_memory_budget)
    if mode == "cpu":
        capacity, resident = 0, 0
    elif budget is None:
        capacity, resident = E, 0
    else:
        capacity = slot_capacity(budget, E, per_expert, slots=1)
        left = budget - capacity * per_expert
        resident = min(E, left // max(1, expert_bf * len(layers))) if capacity == E else 0
        if capacity == 0:
            logger.warning("enable_streaming: a budget of %d bytes holds no expert; the CPU computes all", budget)
    store = ExpertStore(device, capacity, quantize=quantize)
    rt = StreamingRuntime(device, store, mode=mode, cost=cost or CostModel(), resident_per_layer=resident)
    for i, m in enumerate(layers):
        store.add_layer(m.gate_up_proj.detach(), m.down_proj.detach())
        hybrid = HybridExperts(m, rt, i)
        rt.layers.append(hybrid)
        rt.counts.append(None)
        rt.plans.append(LayerPlan())
        m.__dict__["forward"] = hybrid.forward  # same module, names and state dict; calls go through the split
    rt._reset_counters()
    logger.info(
        "streaming: %d layers on %s, slot capacity %d of %d experts, %d resident/layer, %.2f GiB of expert "
        "weights on the device, mode %s%s%s",
        len(layers), device, capacity, E, resident, store.gpu_bytes() / 2**30, mode,
        ", int8" if quantize else "", "" if store.pin_ok else ", host memory NOT pinned",
    )  # fmt: skip
    return rt

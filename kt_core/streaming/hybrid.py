"""HybridExperts: one MoE layer's routed experts split between the CPU operator and the GPU.

Same call as KTExperts: `(hidden [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]`. The slots
routed to experts held on the GPU (streamed into a slot, or resident) are computed there with grouped
GEMMs; every other slot goes to the CPU operator with the GPU-side ids set to -1 (which it skips), on a
worker thread while the main thread queues the GPU work. The two partial outputs add up. The backward
splits the same way: CPU backward (kt_core.kernels.experts_backward) on the thread, GPU backward on the
main thread; dx and the routing-weight gradients add, and each LoRA factor receives one gradient, the sum
of both sides' (the GPU side computes with a device copy of the factors, so LoRA stays exact whoever
computes an expert).

Legend: T = tokens, K = experts per token, E = experts, H = hidden, I = expert intermediate, r = LoRA rank,
S = slots on one GPU part, G = experts of that part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from kt_core import kernels
from kt_core.experts import KTExperts
from kt_core.runtime.staging import to_device, to_host
from kt_core.streaming.gpu_experts import Groups, expert_mlp_backward, expert_mlp_forward

if TYPE_CHECKING:
    from kt_core.streaming.runtime import StreamingRuntime

__all__ = ["HybridExperts"]


@dataclass
class _Part:
    """Slots of one GPU weight set (the streaming slot, or the resident experts)."""

    experts: list[int]  # [G] expert ids, in the order of the weights
    w13: torch.Tensor  # [G, 2I, H] device
    w2: torch.Tensor  # [G, H, I] device
    groups: Groups
    tok: torch.Tensor  # [S] token of each slot (device)
    flat: torch.Tensor  # [S] index into the flattened [T*K] slots (device)


class HybridExperts(nn.Module):
    """Wraps a KTExperts (its weights, kernel and LoRA) and splits each call between CPU and GPU.

    Args:
        experts: the layer's KTExperts.
        runtime: the StreamingRuntime that owns the weight store, planner and statistics.
        layer: this layer's index in the runtime (its order in the forward pass).
    """

    def __init__(self, experts: KTExperts, runtime: StreamingRuntime, layer: int):
        super().__init__()
        self.experts = experts
        self.layer = layer
        object.__setattr__(self, "runtime", runtime)  # not a submodule

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        lora = self.experts.lora.factors() if self.experts.lora is not None else ()
        return _HybridFunction.apply(self, hidden_states, top_k_index, top_k_weights, *lora)

    # ---- the split ------------------------------------------------------------------------------

    def split(self, ids_host: torch.Tensor, weights) -> tuple[torch.Tensor, list[_Part]]:
        """CPU ids [T, K] (GPU slots set to -1) and the GPU parts, given [(experts, w13, w2), ...]."""
        K = ids_host.shape[1]
        E = self.experts.num_experts
        cpu_ids = ids_host.clone()  # [T, K]; slots taken by a part become -1
        parts = []
        device = self.runtime.device
        for experts, w13, w2 in weights:
            if not experts:
                continue
            pos = torch.full((E + 1,), -1, dtype=torch.int64)
            pos[torch.tensor(experts)] = torch.arange(len(experts))
            local = pos[cpu_ids.view(-1)]  # [T*K]; id -1 reads pos[E] = -1
            sel = (local >= 0).nonzero().squeeze(1)  # [S]
            if sel.numel() == 0:
                continue
            order = torch.argsort(local[sel], stable=True)
            flat = sel[order]  # [S] sorted by expert
            counts = torch.bincount(local[flat], minlength=len(experts)).tolist()
            cpu_ids.view(-1)[flat] = -1
            tok, flat_dev = _upload(flat // K, device), _upload(flat, device)
            parts.append(_Part(list(experts), w13, w2, Groups(counts, device), tok, flat_dev))
        return cpu_ids, parts


def _upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _gpu_forward(hybrid: HybridExperts, x, w_flat, parts, lora_dev, scaling):
    """Sum over parts of routing weight * expert output, [T, H] fp32 on the device."""
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for p in parts:
        xs = x[p.tok].to(p.w13.dtype)  # [S, H]
        sub = tuple(f[p.experts] for f in lora_dev) if lora_dev else None
        out = expert_mlp_forward(xs, p.groups, p.w13, p.w2, sub, scaling)  # [S, H]
        y.index_add_(0, p.tok, out.float() * w_flat[p.flat].float()[:, None])
    return y


class _HybridFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hybrid: HybridExperts, x, ids, w, *lora):
        rt, module = hybrid.runtime, hybrid.experts
        phase = rt.phase(forward=True)
        ids_host = to_host(ids).to(torch.int64)  # [T, K]
        w_host = to_host(w).to(torch.float32)  # [T, K]
        weights = rt.begin(hybrid.layer, ids_host, phase)
        cpu_ids, parts = hybrid.split(ids_host, weights)
        needs_grad = any(ctx.needs_input_grad[1:])
        run_cpu = bool((cpu_ids >= 0).any())
        x_host = to_host(x) if run_cpu else None
        future = None
        if run_cpu:
            future = rt.submit_cpu(
                hybrid.layer,
                phase,
                lambda: kernels.experts_forward(
                    module,
                    x_host,
                    cpu_ids,
                    w_host,
                    lora=lora or None,
                    save_for_backward=needs_grad,
                    pin_output=x.device.type != "cpu",
                ),
                slots=int((cpu_ids >= 0).sum()),
            )
        y = None
        if parts:
            with rt.gpu_timer(hybrid.layer, phase, sum(p.groups.rows for p in parts)):
                lora_dev = rt.device_lora(hybrid.layer, lora)
                y = _gpu_forward(hybrid, x, w.reshape(-1), parts, lora_dev, rt.scaling(module))
        rt.end(hybrid.layer)
        cache = None
        if future is not None:
            y_cpu, cache = future.result()
            y_cpu = to_device(y_cpu, x.device)
            y = y_cpu.float() if y is None else y + y_cpu.float()
        if y is None:
            y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        if needs_grad:
            ctx.hybrid, ctx.w_dtype = hybrid, w.dtype
            # Gradient checkpointing compares the shapes of what is saved here with the recomputation's,
            # whose split may differ: the CPU cache always has its full shape (untouched, so unbacked,
            # host pages when the CPU computed nothing), and cpu_ids tell the backward whose split it is.
            if cache is None and module.kernel != kernels.TORCH_KERNEL:
                rows = kernels._cache_row_floats(module, lora)
                cache = torch.empty(ids_host.numel() * rows, dtype=torch.float32)
            cache = cache if cache is not None else torch.empty(0)
            ctx.save_for_backward(x, ids_host, w_host, cpu_ids, cache, *lora)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        hybrid = ctx.hybrid
        rt, module = hybrid.runtime, hybrid.experts
        x, ids_host, w_host, fwd_cpu_ids, cache, *lora = ctx.saved_tensors
        phase = "bwd"
        weights = rt.begin(hybrid.layer, ids_host, phase)
        cpu_ids, parts = hybrid.split(ids_host, weights)
        if cache.numel() == 0 or not torch.equal(cpu_ids, fwd_cpu_ids):
            cache = None  # the split moved since the forward: the CPU recomputes what it needs
        dy = dy.contiguous()
        cpu_mask = cpu_ids >= 0
        future = None
        if bool(cpu_mask.any()):
            x_host, dy_host = to_host(x), to_host(dy).to(x.dtype)
            future = rt.submit_cpu(
                hybrid.layer,
                phase,
                lambda: kernels.experts_backward(
                    module, x_host, cpu_ids, w_host, dy_host, cache=cache, lora=lora or None
                ),
                slots=int(cpu_mask.sum()),
            )
        dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
        dw = torch.zeros(ids_host.shape, dtype=torch.float32, device=x.device)  # [T, K]
        lora_grads = [torch.zeros_like(f) for f in lora] if lora else None  # host fp32, [E, ...]
        gpu_lora = []
        if parts:
            with rt.gpu_timer(hybrid.layer, phase, sum(p.groups.rows for p in parts)):
                lora_dev = rt.device_lora(hybrid.layer, lora)
                w_dev = w_host.to(x.device, non_blocking=True).reshape(-1) if x.is_cuda else w_host.reshape(-1)
                for p in parts:
                    xs = x[p.tok].to(p.w13.dtype)  # [S, H]
                    dys = dy[p.tok]  # [S, H]
                    dout = (dys.float() * w_dev[p.flat][:, None]).to(p.w13.dtype)
                    sub = tuple(f[p.experts] for f in lora_dev) if lora_dev else None
                    out, dxs, grads = expert_mlp_backward(xs, dout, p.groups, p.w13, p.w2, sub, rt.scaling(module))
                    dx.index_add_(0, p.tok, dxs.float())
                    dw.view(-1).index_copy_(0, p.flat, (dys.float() * out.float()).sum(-1))
                    if grads is not None:
                        gpu_lora.append((p.experts, grads))
        rt.end(hybrid.layer)
        for experts, grads in gpu_lora:  # device -> host, into the factors' gradients
            idx = torch.tensor(experts)
            for total, g in zip(lora_grads, grads, strict=True):
                total.index_add_(0, idx, g.cpu())
        if future is not None:
            dx_cpu, dw_cpu, cpu_lora = future.result()
            dx += to_device(dx_cpu, x.device).float()
            dw += to_device(torch.where(cpu_mask, dw_cpu, 0.0), x.device)
            if cpu_lora is not None:
                for total, g in zip(lora_grads, cpu_lora, strict=True):
                    total.add_(g)
        grads = [
            None,
            dx.to(x.dtype) if ctx.needs_input_grad[1] else None,
            None,
            dw.to(ctx.w_dtype) if ctx.needs_input_grad[3] else None,
        ]
        return (*grads, *(lora_grads or ()))

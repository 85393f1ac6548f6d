"""HybridExperts: one MoE layer's routed experts split between the CPU operator and the GPU.

Same call as KTExperts: `(hidden [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]`. The slots
routed to experts held on the GPU (streamed into a slot, or resident) are computed there with grouped
GEMMs; every other slot goes to the CPU operator with the GPU-side ids set to -1 (which it skips), on a
worker thread while the main thread queues the GPU work. The two partial outputs add up. The backward
splits the same way: CPU backward (kt_core.kernels.experts_backward) on the thread, GPU backward on the
main thread; dx and the routing-weight gradients add, and each LoRA factor receives one gradient, the sum
of both sides' (the GPU side computes with a device copy of the factors, so LoRA stays exact whoever
computes an expert).

Two paths, chosen per call from what the layer's GPU weights cover (fixed for the step by the planner):

- device path (one GPU weight set holds all E experts: everything streamed, or everything resident): the
  routing never leaves the device. Slots are sorted by expert and the grouped-GEMM offsets are computed
  there, so the call queues its kernels without waiting for the GPU; the only synchronisation is the
  backward's device-to-host copy of the LoRA factor gradients (the factors live on the host). In the
  recomputation of a checkpointed layer the intermediates are kept for the backward that follows it.
- host path (mixed splits): the routing ids come to the host, which splits them between the CPU operator
  and the GPU parts.

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
from kt_core.streaming.fused import combine, dout_and_dots
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
        lora = self.experts.active_lora_factors()
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


@dataclass
class _Route:
    """Device-path routing of all T*K slots, sorted by expert (no host synchronisation)."""

    order: torch.Tensor  # [T*K] slot index (into the flattened [T, K]) of each sorted row
    inv: torch.Tensor  # [T*K] sorted row of each slot (the inverse of order)
    tok: torch.Tensor  # [T*K] token of each sorted row
    ws: torch.Tensor  # [T*K] routing weight of each sorted row
    w_tok: torch.Tensor  # [T*K] fp32 routing weights in slot order
    groups: Groups


def _route(rt: StreamingRuntime, ids: torch.Tensor, w: torch.Tensor, experts: list[int]) -> _Route:
    K = ids.shape[1]
    local = rt.local_index(experts, ids.device)[ids.reshape(-1).long()]  # [T*K] position in the weights
    sorted_local, order = torch.sort(local, stable=True)
    ends = torch.searchsorted(sorted_local, torch.arange(len(experts), device=ids.device), right=True)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.shape[0], device=ids.device)
    w_flat = w.reshape(-1)
    groups = Groups.on_device(ends.to(torch.int32), sorted_local)
    return _Route(order, inv, order // K, w_flat[order], w_flat.float(), groups)


def _lora_sub(lora_dev, experts: list[int], E: int):
    # the device factors of `experts` ([G, ...] each), or all of them
    if not lora_dev:
        return None
    if experts == list(range(E)):
        return lora_dev
    return tuple(f[experts] for f in lora_dev)


def _empty_cache(module: KTExperts, lora, slots: int, dtype: torch.dtype) -> torch.Tensor:
    """A placeholder of the CPU cache's shape for activations of `dtype` (untouched host pages), or empty."""
    if module.kernel != kernels.TORCH_KERNEL:
        return torch.empty(slots * kernels._cache_row_floats(module, lora, dtype), dtype=torch.float32)
    return torch.empty(0)


def _grads_to_host(grads: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Device tensors -> host fp32 tensors with one device-to-host copy (one wait on this stream)."""
    if grads[0].device.type == "cpu":
        return [g.float() for g in grads]
    flat = to_host(torch.cat([g.reshape(-1).float() for g in grads]))
    out, at = [], 0
    for g in grads:
        out.append(flat[at : at + g.numel()].view(g.shape))
        at += g.numel()
    return out


def _gpu_forward(hybrid: HybridExperts, x, w_flat, parts, lora_dev, scaling):
    """Sum over parts of routing weight * expert output, [T, H] fp32 on the device."""
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for p in parts:
        xs = x[p.tok].to(p.w13.dtype)  # [S, H]
        sub = tuple(f[p.experts] for f in lora_dev) if lora_dev else None
        out, _ = expert_mlp_forward(xs, p.groups, p.w13, p.w2, sub, scaling)  # [S, H]
        combine(y, out, 0, inv=None, tok=p.tok, w_sorted=w_flat[p.flat])
    return y


class _HybridFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hybrid: HybridExperts, x, ids, w, *lora):
        rt, module = hybrid.runtime, hybrid.experts
        phase = rt.phase(forward=True)
        needs_grad = any(ctx.needs_input_grad[1:])
        weights = rt.begin(hybrid.layer, ids, phase)
        full = rt.covering(hybrid.layer, weights)
        if full is not None:
            y = _device_forward(hybrid, x, ids, w, lora, full, phase, keep=needs_grad and phase == "recompute")
            cpu_ids = torch.full(ids.shape, -1, dtype=torch.int64)
            cache = _empty_cache(module, lora, ids.numel(), x.dtype) if needs_grad else None
        else:
            y, cpu_ids, cache = _host_forward(hybrid, x, ids, w, lora, weights, phase, needs_grad)
        if needs_grad:
            ctx.hybrid, ctx.w_dtype = hybrid, w.dtype
            # Gradient checkpointing compares the metadata of what is saved here with the recomputation's,
            # whose path may differ: both paths save the same tensors (the CPU cache always has its full
            # shape: untouched, so unbacked, host pages when the CPU computed nothing), and cpu_ids tell the
            # backward whose split it is.
            ctx.save_for_backward(x, ids, w, cpu_ids, cache, *lora)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        hybrid = ctx.hybrid
        rt = hybrid.runtime
        x, ids, w, fwd_cpu_ids, cache, *lora = ctx.saved_tensors
        weights = rt.begin(hybrid.layer, ids, "bwd")
        full = rt.covering(hybrid.layer, weights)
        dy = dy.contiguous()
        if full is not None:
            dx, dw, device_grads = _device_backward(hybrid, x, ids, w, dy, lora, full)
            lora_grads = None
            if device_grads is not None:
                lora_grads = rt.defer_lora_grads(hybrid, device_grads, full[0], ctx.needs_input_grad[4:])
        else:
            dx, dw, lora_grads = _host_backward(hybrid, x, ids, w, dy, lora, weights, fwd_cpu_ids, cache)
        grads = [
            None,
            dx.to(x.dtype) if ctx.needs_input_grad[1] else None,
            None,
            dw.to(ctx.w_dtype) if ctx.needs_input_grad[3] else None,
        ]
        return (*grads, *(lora_grads or ()))


# ---- device path ---------------------------------------------------------------------------------------


def _pieces(r: _Route, rows: int):
    """(start, end, groups) of consecutive ranges of at most `rows` sorted slots (bounds the intermediates)."""
    total = r.groups.rows
    if total <= rows:
        yield 0, total, r.groups
        return
    for a in range(0, total, rows):
        b = min(total, a + rows)
        yield a, b, r.groups.piece(a, b)


def _kept_bytes(rows: int, H: int, I: int, itemsize: int) -> int:
    """Device bytes of one piece's kept intermediates: out [rows, H], gu [rows, 2I], h [rows, I]."""
    return rows * (H + 3 * I) * itemsize


def _device_forward(hybrid: HybridExperts, x, ids, w, lora, full, phase: str, *, keep: bool):
    """[T, H] fp32 output of all slots on the GPU, in pieces of sorted slots.

    With `keep` (the recomputation of a checkpointed layer), the pieces' intermediates are kept for the
    backward that follows, up to the runtime's `keep_bytes`; the backward recomputes the rest.
    """
    rt, module = hybrid.runtime, hybrid.experts
    experts, w13, w2 = full
    T, K = ids.shape
    with rt.gpu_timer(hybrid.layer, phase, T * K):
        r = _route(rt, ids, w, experts)
        sub = _lora_sub(rt.device_lora(hybrid.layer, lora), experts, module.num_experts)
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
        kept, kept_bytes = [], 0
        for a, b, g in _pieces(r, rt.piece_rows):
            tok = r.tok[a:b]
            nbytes = _kept_bytes(b - a, module.hidden_dim, module.intermediate_dim, w13.element_size())
            keep_piece = keep and kept_bytes + nbytes <= rt.keep_bytes
            xs = x[tok].to(w13.dtype)  # [P, H]
            out, saved = expert_mlp_forward(xs, g, w13, w2, sub, rt.scaling(module), keep=keep_piece)
            combine(y, out, a, inv=r.inv, tok=tok, w_tok=r.w_tok, w_sorted=r.ws[a:b])
            kept.append((out, saved) if keep_piece else None)
            kept_bytes += nbytes if keep_piece else 0
            del xs, out, saved
    if keep:
        rt.keep(hybrid.layer, (ids, x, w13), (r, kept))
    rt.end(hybrid.layer)
    return y


def _device_backward(hybrid: HybridExperts, x, ids, w, dy, lora, full):
    """dx [T, H] fp32, dw [T, K] fp32 and the LoRA factor gradients of the layer's E experts (device, fp32).

    Piece by piece over the sorted slots: the kept intermediates of a piece, or its forward recomputed.
    """
    rt, module = hybrid.runtime, hybrid.experts
    experts, w13, w2 = full
    T, K = ids.shape
    scaling = rt.scaling(module)
    with rt.gpu_timer(hybrid.layer, "bwd", T * K):
        sub = _lora_sub(rt.device_lora(hybrid.layer, lora), experts, module.num_experts)
        held = rt.take_kept(hybrid.layer, (ids, x, w13))
        r, kept = held if held is not None else (_route(rt, ids, w, experts), None)
        dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
        dw = torch.empty(T * K, dtype=torch.float32, device=x.device)
        grads = None
        for i, (a, b, g) in enumerate(_pieces(r, rt.piece_rows)):
            tok = r.tok[a:b]
            xs = x[tok].to(w13.dtype)  # [P, H]
            out, saved = kept[i] if kept is not None and kept[i] is not None else (None, None)
            if kept is not None:
                kept[i] = None  # freed as the pieces go
            if saved is None:
                out, saved = expert_mlp_forward(xs, g, w13, w2, sub, scaling, keep=True)
            dout, dots = dout_and_dots(dy, tok, r.ws[a:b], out, xs.dtype)  # [P, H], [P]
            dw[r.order[a:b]] = dots
            del out, dots
            _, dxs, piece_grads = expert_mlp_backward(xs, dout, g, w13, w2, sub, scaling, saved=saved)
            del saved, dout, xs
            combine(dx, dxs, a, inv=r.inv, tok=tok)
            del dxs
            if piece_grads is not None:
                grads = piece_grads if grads is None else [t.add_(p) for t, p in zip(grads, piece_grads, strict=True)]
    rt.end(hybrid.layer)
    return dx, dw.view(T, K), grads


# ---- host path -----------------------------------------------------------------------------------------


def _host_forward(hybrid: HybridExperts, x, ids, w, lora, weights, phase, needs_grad):
    rt, module = hybrid.runtime, hybrid.experts
    ids_host = to_host(ids).to(torch.int64)  # [T, K]
    w_host = to_host(w).to(torch.float32)  # [T, K]
    cpu_ids, parts = hybrid.split(ids_host, weights)
    run_cpu = bool((cpu_ids >= 0).any())
    future = None
    if run_cpu:
        x_host = to_host(x)
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
    if needs_grad and cache is None:
        cache = _empty_cache(module, lora, ids_host.numel(), x.dtype)
    return y, cpu_ids, cache


def _host_backward(hybrid: HybridExperts, x, ids, w, dy, lora, weights, fwd_cpu_ids, cache):
    rt, module = hybrid.runtime, hybrid.experts
    phase = "bwd"
    ids_host = to_host(ids).to(torch.int64)  # [T, K]
    w_host = to_host(w).to(torch.float32)  # [T, K]
    cpu_ids, parts = hybrid.split(ids_host, weights)
    if cache.numel() == 0 or not torch.equal(cpu_ids, fwd_cpu_ids):
        cache = None  # the split moved since the forward: the CPU recomputes what it needs
    cpu_mask = cpu_ids >= 0
    future = None
    if bool(cpu_mask.any()):
        x_host, dy_host = to_host(x), to_host(dy).to(x.dtype)
        future = rt.submit_cpu(
            hybrid.layer,
            phase,
            lambda: kernels.experts_backward(module, x_host, cpu_ids, w_host, dy_host, cache=cache, lora=lora or None),
            slots=int(cpu_mask.sum()),
        )
    dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
    dw = torch.zeros(ids_host.shape, dtype=torch.float32, device=x.device)  # [T, K]
    lora_grads = [torch.zeros_like(f) for f in lora] if lora else None  # host fp32, [E, ...]
    gpu_lora = []
    if parts:
        with rt.gpu_timer(hybrid.layer, phase, sum(p.groups.rows for p in parts)):
            lora_dev = rt.device_lora(hybrid.layer, lora)
            w_dev = w.reshape(-1).float()
            for p in parts:
                xs = x[p.tok].to(p.w13.dtype)  # [S, H]
                sub = tuple(f[p.experts] for f in lora_dev) if lora_dev else None
                scaling = rt.scaling(module)
                out, saved = expert_mlp_forward(xs, p.groups, p.w13, p.w2, sub, scaling, keep=True)
                dout, dots = dout_and_dots(dy, p.tok, w_dev[p.flat], out, xs.dtype)
                dw.view(-1).index_copy_(0, p.flat, dots)
                del out
                _, dxs, grads = expert_mlp_backward(xs, dout, p.groups, p.w13, p.w2, sub, scaling, saved=saved)
                combine(dx, dxs, 0, inv=None, tok=p.tok)
                if grads is not None:
                    gpu_lora.append((p.experts, grads))
    rt.end(hybrid.layer)
    for experts, grads in gpu_lora:  # device -> host, into the factors' gradients
        idx = torch.tensor(experts)
        for total, g in zip(lora_grads, _grads_to_host(grads), strict=True):
            total.index_add_(0, idx, g.to(total.dtype))
    if future is not None:
        dx_cpu, dw_cpu, cpu_lora = future.result()
        dx += to_device(dx_cpu, x.device).float()
        dw += to_device(torch.where(cpu_mask, dw_cpu, 0.0), x.device)
        if cpu_lora is not None:
            for total, g in zip(lora_grads, cpu_lora, strict=True):
                total.add_(g)
    return dx, dw, lora_grads

"""StreamedShare: the GPU share of one streamed MoE layer (kt_core/experts/share.py describes the contract).

At each call the runtime makes sure the layer's streamed experts are in a device slot (and starts the
prefetch of the next layer); the resident experts, if any, are a second weight set. Two ways to compute:

- device path (one weight set holds all E experts: everything streamed, or everything resident): the
  routing never leaves the device. Slots are sorted by expert and the grouped-GEMM offsets are computed
  there, so the call queues its kernels without waiting for the GPU. The work runs in pieces of at most
  `piece_rows` sorted slots (bounds the intermediates); in the recomputation of a checkpointed layer the
  pieces' intermediates are kept, up to `keep_bytes`, for the backward that follows it.
- parts (mixed splits): the layer has split the slots on the host (kt_core/experts/split.py); each GPU
  part is a grouped-GEMM MLP over its sorted slots, in pieces of at most `piece_rows` as well, while the CPU
  share runs on the runtime's worker thread.

FP8 layers: the weight sets are GroupedWeights (kt_core.streaming.store): the e4m3 experts, dequantized on the device
into the store's bf16 working buffer a group of experts at a time, right before the GEMMs with them
(kt_core.streaming.gpu_experts), so both ways compute in bf16 (`compute_dtype`), and the layer uploads its
expert-LoRA factors in that dtype, not in the weights' e4m3. A device-path call whose weights go in more than one
group reads the routing's per-expert row counts on the host once (the groups' row ranges).

Legend: T = tokens, K = experts per token, E = experts, H = hidden, I = expert intermediate, r = LoRA rank,
P = slots of one piece, S = slots of one GPU part.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kt_core.streaming import fp8_gemm
from kt_core.streaming.fused import combine
from kt_core.streaming.gpu_experts import Groups, expert_mlp_backward, expert_mlp_forward, to_keep

if TYPE_CHECKING:
    from kt_core.experts.split import GpuPart
    from kt_core.streaming.runtime import StreamingRuntime

__all__ = ["StreamedShare"]


class StreamedShare:
    """The GPU share of layer `layer` (its index in the forward pass) of a StreamingRuntime.

    Attributes:
        takes_fp8: FP8 expert weights are dequantized by the share itself (the store's working buffer).
        reads_host_weights: it copies the layer's host weights to the GPU (KTExperts.release_host_weights refuses);
            False once the layer streams from its packed copy (store.stream_from_tiles).
        compute_dtype: the dtype of the weights its GEMMs take (bf16 for FP8 layers; else the weights' own),
            in which the layer uploads the expert-LoRA factors.
    """

    takes_fp8 = True

    def __init__(self, runtime: StreamingRuntime, layer: int):
        self.runtime = runtime
        self.layer = layer
        self.device = runtime.device

    @property
    def reads_host_weights(self) -> bool:
        return self.runtime.store.layers[self.layer].tiles is None

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.runtime.store.compute_dtype

    def begin(self, ids: torch.Tensor, phase: str) -> _StreamedCall:
        weight_sets = self.runtime.begin(self.layer, ids, phase)
        return _StreamedCall(self, phase, weight_sets, ids.numel())


@dataclass
class _Route:
    """Device-path routing of all T*K slots, sorted by expert (no host synchronisation)."""

    order: torch.Tensor  # [T*K] slot index (into the flattened [T, K]) of each sorted row
    inv: torch.Tensor  # [T*K] sorted row of each slot (the inverse of order)
    tok: torch.Tensor  # [T*K] token of each sorted row
    ws: torch.Tensor  # [T*K] routing weight of each sorted row
    w_tok: torch.Tensor  # [T*K] fp32 routing weights in slot order
    groups: Groups


class _StreamedCall:
    def __init__(self, share: StreamedShare, phase: str, weight_sets: list[tuple], slots: int):
        self.share, self.phase, self.slots = share, phase, slots
        self._prefetched = False
        rt = share.runtime
        self.module = rt.layers[share.layer]
        E = self.module.num_experts
        self.full = weight_sets[0] if len(weight_sets) == 1 and len(weight_sets[0][0]) == E else None
        self.covers_all = self.full is not None
        self.weight_sets = weight_sets
        self.experts = [e for experts, _, _ in weight_sets for e in experts]

    # ---- the contract -------------------------------------------------------------------------------

    def prefetch(self) -> None:
        """The next layer's copy, once per call, right before the GPU work (or at the end of a call that has none):
        after the layer has queued its factor upload and, with a host split, after its routing reached the host
        (that wait would otherwise last until the copy is done). StreamingRuntime.prefetch says why."""
        if not self._prefetched:
            self._prefetched = True
            self.share.runtime.prefetch(self.share.layer, self.phase, self.slots)

    def _start_gpu_work(self) -> None:
        self.prefetch()
        self.share.runtime.store.ready(self.share.layer)

    def forward(self, x, ids, w, parts: list[GpuPart] | None, lora_dev, *, keep: bool) -> torch.Tensor:
        rt, layer = self.share.runtime, self.share.layer
        self._start_gpu_work()
        _check_factors(lora_dev, self.share.compute_dtype)
        slots = ids.numel() if self.covers_all else sum(p.flat.numel() for p in parts)
        with rt.gpu_timer(layer, self.phase, slots):
            if self.covers_all:
                return self._device_forward(x, ids, w, lora_dev, keep=keep)
            return self._parts_forward(x, w.reshape(-1), parts, lora_dev)

    def backward(self, x, ids, w, dy, parts: list[GpuPart] | None, lora_dev):
        rt, layer = self.share.runtime, self.share.layer
        self._start_gpu_work()
        _check_factors(lora_dev, self.share.compute_dtype)
        slots = ids.numel() if self.covers_all else sum(p.flat.numel() for p in parts)
        with rt.gpu_timer(layer, "bwd", slots):
            if self.covers_all:
                return self._device_backward(x, ids, w, dy, lora_dev)
            return self._parts_backward(x, ids, w, dy, parts, lora_dev)

    def submit_cpu(self, fn, *, slots: int) -> Future:
        return self.share.runtime.submit_cpu(self.share.layer, self.phase, fn, slots=slots)

    def end(self) -> None:
        self.prefetch()
        self.share.runtime.end(self.share.layer)

    # ---- device path --------------------------------------------------------------------------------

    def _scaling(self) -> float:
        return self.module.lora.scaling if self.module.lora is not None else 1.0

    def _route(self, ids: torch.Tensor, w: torch.Tensor) -> _Route:
        experts = self.full[0]
        K = ids.shape[1]
        local = self.share.runtime.local_index(experts, ids.device)[ids.reshape(-1).long()]  # [T*K]
        sorted_local, order = torch.sort(local, stable=True)
        ends = torch.searchsorted(sorted_local, torch.arange(len(experts), device=ids.device), right=True)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.shape[0], device=ids.device)
        w_flat = w.reshape(-1)
        groups = Groups.on_device(ends.to(torch.int32), sorted_local)
        if any(not isinstance(t, torch.Tensor) and t.group < len(t) and not fp8_gemm.applies(t) for t in self.full[1:]):
            groups.counts  # noqa: B018 (read once, on the host: each piece's groups then derive from them)
        return _Route(order, inv, order // K, w_flat[order], w_flat.float(), groups)

    def _sub(self, lora_dev):
        experts = self.full[0]
        if not lora_dev or experts == list(range(self.module.num_experts)):
            return lora_dev
        return tuple(f[experts] for f in lora_dev)

    def _pieces(self, groups: Groups):
        """(start, end, groups) of consecutive ranges of at most `piece_rows` sorted slots."""
        rows, total = self.share.runtime.piece_rows, groups.rows
        if total <= rows:
            yield 0, total, groups
            return
        for a in range(0, total, rows):
            b = min(total, a + rows)
            yield a, b, groups.piece(a, b)

    def _device_forward(self, x, ids, w, lora_dev, *, keep: bool) -> torch.Tensor:
        rt, m = self.share.runtime, self.module
        _, w13, w2 = self.full
        r = self._route(ids, w)
        sub, scaling = self._sub(lora_dev), self._scaling()
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
        kept, kept_bytes = [], 0
        for a, b, g in self._pieces(r.groups):
            tok = r.tok[a:b]
            nbytes = (b - a) * 2 * m.intermediate_dim * w13.element_size()  # gu (to_keep)
            keep_piece = keep and kept_bytes + nbytes <= rt.keep_bytes
            xs = x[tok].to(w13.dtype)  # [P, H]
            out, saved = expert_mlp_forward(xs, g, w13, w2, sub, scaling, keep=keep_piece)
            combine(y, out, a, inv=r.inv, tok=tok, w_tok=r.w_tok, w_sorted=r.ws[a:b])
            kept.append(to_keep(saved) if keep_piece else None)
            kept_bytes += nbytes if keep_piece else 0
            del xs, out, saved
        if keep:
            rt.keep(self.share.layer, (ids, x, w13), (r, kept))
        return y

    def _device_backward(self, x, ids, w, dy, lora_dev):
        """dx [T, H] fp32, dw [T, K] fp32 and [(experts, LoRA factor gradients)] (device, fp32)."""
        rt = self.share.runtime
        experts, w13, w2 = self.full
        T, K = ids.shape
        sub, scaling = self._sub(lora_dev), self._scaling()
        held = rt.take_kept(self.share.layer, (ids, x, w13))
        r, kept = held if held is not None else (self._route(ids, w), None)
        dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
        dw = torch.empty(T * K, dtype=torch.float32, device=x.device)
        dy = dy.to(w13.dtype)  # [T, H], gathered per piece
        grads = None
        for i, (a, b, g) in enumerate(self._pieces(r.groups)):
            tok = r.tok[a:b]
            xs = x[tok].to(w13.dtype)  # [P, H]
            saved = kept[i] if kept is not None else None  # None: recomputed by the backward
            if kept is not None:
                kept[i] = None  # freed as the pieces go
            dxs, dots, piece_grads = expert_mlp_backward(xs, dy[tok], r.ws[a:b], g, w13, w2, sub, scaling, saved=saved)
            dw[r.order[a:b]] = dots
            del saved, dots, xs
            combine(dx, dxs, a, inv=r.inv, tok=tok)
            del dxs
            grads = _accumulate(grads, piece_grads)
        return dx, dw.view(T, K), [(list(experts), grads)] if grads is not None else None

    # ---- parts --------------------------------------------------------------------------------------

    def _parts_forward(self, x, w_flat, parts: list[GpuPart], lora_dev) -> torch.Tensor:
        """Sum over parts of routing weight * expert output, [T, H] fp32 on the device."""
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for p in parts:
            sub = tuple(f[p.experts] for f in lora_dev) if lora_dev else None
            for a, b, g in self._pieces(Groups(p.counts, x.device)):
                tok = p.tok[a:b]
                xs = x[tok].to(p.w13.dtype)  # [P, H]
                out, _ = expert_mlp_forward(xs, g, p.w13, p.w2, sub, self._scaling())  # [P, H]
                combine(y, out, 0, inv=None, tok=tok, w_sorted=w_flat[p.flat[a:b]])
                del xs, out
        return y

    def _parts_backward(self, x, ids, w, dy, parts: list[GpuPart], lora_dev):
        dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
        dw = torch.zeros(ids.shape, dtype=torch.float32, device=x.device)  # [T, K]
        w_dev = w.reshape(-1).float()
        scaling, out_grads = self._scaling(), []
        for p in parts:
            sub = tuple(f[p.experts] for f in lora_dev) if lora_dev else None
            grads = None
            for a, b, g in self._pieces(Groups(p.counts, x.device)):
                tok, flat = p.tok[a:b], p.flat[a:b]
                xs = x[tok].to(p.w13.dtype)  # [P, H]
                dys = dy[tok].to(xs.dtype)  # [P, H]
                dxs, dots, piece_grads = expert_mlp_backward(xs, dys, w_dev[flat], g, p.w13, p.w2, sub, scaling)
                dw.view(-1).index_copy_(0, flat, dots)
                del xs, dys, dots
                combine(dx, dxs, 0, inv=None, tok=tok)
                del dxs
                grads = _accumulate(grads, piece_grads)
            if grads is not None:
                out_grads.append((p.experts, grads))
        return dx, dw, out_grads or None


def _accumulate(total: list[torch.Tensor] | None, piece: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
    """Sums the LoRA factor gradients of a part's pieces (in place into the first piece's)."""
    if piece is None:
        return total
    return piece if total is None else [t.add_(q) for t, q in zip(total, piece, strict=True)]


def _check_factors(lora_dev, dtype: torch.dtype) -> None:
    """The device copy of the expert-LoRA factors must come in the GEMMs' dtype (never rounded to e4m3)."""
    if lora_dev and lora_dev[0].dtype != dtype:
        raise RuntimeError(
            f"streaming: the expert-LoRA factors reached the device as {lora_dev[0].dtype}, the expert GEMMs take "
            f"{dtype}; the layer must upload them in the share's compute_dtype"
        )

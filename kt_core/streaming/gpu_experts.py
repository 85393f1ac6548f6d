"""Device side of a split MoE layer: the experts' SwiGLU MLP over slots grouped by expert, plus expert LoRA.

The weights are borrowed buffers (a streaming slot or the resident experts) that are overwritten once the
layer is done, so nothing here is recorded by autograd. The backward takes the forward's intermediates when
the caller kept them (the recomputation of a checkpointed layer, which runs just before its backward) or
recomputes them from the saved inputs (the gate/up side only: the routing-weight gradient comes from dh and h,
so the backward never needs the output), then computes dx, the routing-weight gradient and the LoRA factor
gradients by hand. The factor gradients of all groups come from one GEMM each (the rank-r side spread over
G*r columns by group): no loop over experts, no host-side row ranges. The SwiGLU and its backward are fused
element-wise steps (kt_core.streaming.fused).

Grouped GEMMs run through `torch._grouped_mm` (bf16; H100 / H200 on CUDA) or a loop over the groups.

The frozen weights w13 / w2 are tensors, or FP8 experts (kt_core.streaming.store.GroupedWeight): multiplied
from e4m3 by one Triton kernel where it applies (kt_core.streaming.fp8_gemm), else taken a few experts at a time,
each group of experts dequantized into one working buffer right before its GEMMs: the products with them then run
group of experts by group of experts over those experts' rows (each expert's rows times its weight, the same
products), groups without rows skipped. Everything else (the
LoRA, the SwiGLU, the factor gradients) runs over all rows at once, as with tensors.

Legend: S = routed slots on this side (sorted by expert), G = experts in the group list, H = hidden,
I = expert intermediate, r = LoRA rank. `bounds` lists (start, end) of each group's rows in S.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kt_core.streaming import fp8_gemm
from kt_core.streaming.fused import silu_mul, swiglu_backward

__all__ = [
    "Groups",
    "backward_intermediates",
    "expert_mlp_backward",
    "expert_mlp_forward",
    "grouped_mm_available",
    "to_keep",
]


class Groups:
    """Row ranges of the G groups in the sorted slots.

    Held as int32 cumulative ends on the device (grouped GEMM offsets) and a group id per row (weight
    gradients); the host-side bounds (the loop path) are derived on demand, which synchronises with the
    device when the groups were built there. Build from host counts (`Groups(counts, device)`) or from device
    tensors without a synchronisation (`Groups.on_device(offs, gid)`).
    """

    def __init__(self, counts: Sequence[int] | None, device: torch.device):
        self.device = device
        self._counts = None if counts is None else [int(c) for c in counts]  # [G]
        self._offs: torch.Tensor | None = None
        self._gid: torch.Tensor | None = None
        self._bounds: list[tuple[int, int]] | None = None
        self.rows = sum(self._counts) if self._counts is not None else 0
        self.size = len(self._counts) if self._counts is not None else 0

    @classmethod
    def on_device(cls, offs: torch.Tensor, gid: torch.Tensor) -> Groups:
        """offs: [G] int32 cumulative ends (offs[-1] = rows); gid: [S] group of each sorted row."""
        g = cls(None, offs.device)
        g._offs, g._gid, g.rows, g.size = offs, gid, gid.shape[0], offs.shape[0]
        return g

    def piece(self, a: int, b: int) -> Groups:
        """The groups restricted to rows [a, b) of the sorted slots (empty groups kept: weights still line up)."""
        if self._counts is not None:
            return Groups([max(0, min(e, b) - max(s, a)) for s, e in self.bounds], self.device)
        offs = (self._offs - a).clamp_(0, b - a).to(torch.int32)
        return Groups.on_device(offs, self._gid[a:b])

    @property
    def counts(self) -> list[int]:
        if self._counts is None:
            ends = self._offs.tolist()
            self._counts = [b - a for a, b in zip([0, *ends[:-1]], ends, strict=True)]
        return self._counts

    @property
    def bounds(self) -> list[tuple[int, int]]:
        if self._bounds is None:
            ends, total = [], 0
            for c in self.counts:
                total += c
                ends.append(total)
            self._bounds = [(e - c, e) for e, c in zip(ends, self.counts, strict=True)]
        return self._bounds

    @property
    def offs(self) -> torch.Tensor:
        if self._offs is None:  # [G] int32 cumulative ends
            host = torch.tensor([b for _, b in self.bounds], dtype=torch.int32)
            self._offs = host.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else host
        return self._offs

    @property
    def gid(self) -> torch.Tensor:
        if self._gid is None:  # [S] group of each row
            host = torch.repeat_interleave(torch.arange(self.size), torch.tensor(self.counts, dtype=torch.int64))
            self._gid = host.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else host
        return self._gid


def grouped_mm_available(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm on CUDA bf16 (Hopper) with 16-byte aligned rows; anything else takes the loop."""
    aligned = all(d % 8 == 0 for d in (x.shape[1], w.shape[1], w.shape[2]))
    return hasattr(torch, "_grouped_mm") and x.dtype == w.dtype == torch.bfloat16 and x.is_cuda and aligned


def _mm_t(x: torch.Tensor, w: torch.Tensor, g: Groups, out: torch.Tensor | None = None) -> torch.Tensor:
    """[S, in] x, [G, out, in] w -> [S, out]: each group's rows times its w^T (into `out` when given)."""
    if grouped_mm_available(x, w) and g.rows:
        y = torch._grouped_mm(x, w.transpose(1, 2), offs=g.offs)
        return y if out is None else out.copy_(y)
    out = x.new_empty((x.shape[0], w.shape[1])) if out is None else out
    for i, (a, b) in enumerate(g.bounds):
        if b > a:
            torch.mm(x[a:b], w[i].t(), out=out[a:b])
    return out


def _mm_n(x: torch.Tensor, w: torch.Tensor, g: Groups, out: torch.Tensor | None = None) -> torch.Tensor:
    """[S, out] x, [G, out, in] w -> [S, in]: each group's rows times its w (the transposed product)."""
    if grouped_mm_available(x, w) and g.rows:
        y = torch._grouped_mm(x, w, offs=g.offs)
        return y if out is None else out.copy_(y)
    out = x.new_empty((x.shape[0], w.shape[2])) if out is None else out
    for i, (a, b) in enumerate(g.bounds):
        if b > a:
            torch.mm(x[a:b], w[i], out=out[a:b])
    return out


def _frozen(x: torch.Tensor, w, g: Groups, *, transposed: bool) -> torch.Tensor:
    """_mm_t (transposed) or _mm_n of x with a frozen weight: a tensor, or a GroupedWeight taken `w.group` experts at
    a time, each group's rows times that group's weights (the groups' row ranges are read on the host)."""
    mm = _mm_t if transposed else _mm_n
    if isinstance(w, torch.Tensor):
        return mm(x, w, g)
    if fp8_gemm.applies(w) and x.dtype == torch.bfloat16:  # e4m3 tiles dequantized in registers: no working buffer
        return fp8_gemm.grouped_mm(x, w, g.offs, transposed=transposed)
    if w.group >= w.shape[0]:  # the whole set at once
        return mm(x, w.take(0, w.shape[0]), g)
    out = x.new_empty((x.shape[0], w.shape[1] if transposed else w.shape[2]))
    bounds, counts = g.bounds, g.counts
    n = w.shape[0]
    ranges = [(lo, min(n, lo + w.group)) for lo in range(0, n, w.group)]
    ranges = [(lo, hi) for lo, hi in ranges if bounds[hi - 1][1] > bounds[lo][0]]  # groups with rows
    if ranges and w.holds(*ranges[-1]):
        ranges.reverse()  # the buffer holds the last group already: begin with it
    for lo, hi in ranges:
        a, b = bounds[lo][0], bounds[hi - 1][1]
        mm(x[a:b], w.take(lo, hi), Groups(counts[lo:hi], g.device), out=out[a:b])
    return out


_MM_OUT_DTYPE = True  # torch.mm(..., out_dtype=float32) for bf16 on CUDA; cleared if this torch lacks it


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 accumulation and an fp32 result (bf16 inputs stay bf16 on the tensor cores)."""
    global _MM_OUT_DTYPE
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _MM_OUT_DTYPE:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE = False
    return (a @ b).float()


def _spread(z: torch.Tensor, g: Groups) -> torch.Tensor:
    """[S, r] z -> [S, G*r]: each row's values in its group's r columns, zeros elsewhere."""
    S, r = z.shape
    out = z.new_zeros((S, g.size, r))
    out[torch.arange(S, device=z.device), g.gid] = z
    return out.view(S, g.size * r)


def _wgrad(a: torch.Tensor, b: torch.Tensor, g: Groups, *, small: str) -> torch.Tensor:
    """[S, p] a, [S, q] b -> [G, p, q] fp32: each group's a^T @ b (the LoRA factor gradients).

    One GEMM for all groups: the rank-r side (`small`, "a" or "b") is spread over G*r columns by group, so
    no host-side row ranges are needed and no loop over experts runs.
    """
    G = g.size
    if small == "b":
        p, r = a.shape[1], b.shape[1]
        return _mm_f32(a.t(), _spread(b, g)).view(p, G, r).transpose(0, 1).contiguous()
    r, q = a.shape[1], b.shape[1]
    return _mm_f32(_spread(a, g).t(), b).view(G, r, q)


def _lora_in(x, A, g, scaling):
    # [S, in] x, [G, r, in] A -> [S, r] scaled LoRA input
    return _mm_t(x, A, g) * scaling


def _gate_up(xs, g, w13, lora, scaling, *, sum_into_gu: bool):
    """gu [S, 2I] (with the LoRA term, written in when `sum_into_gu`), h [S, I] = silu(gate) * up, z1 [S, r] or None."""
    gu = _frozen(xs, w13, g, transposed=True)  # a fresh tensor (as every product here): updated in place
    z1 = lora_gu = None
    if lora is not None:
        z1 = _lora_in(xs, lora[0], g, scaling)  # [S, r]
        lora_gu = _mm_t(z1, lora[1], g)  # [S, 2I]
    h = silu_mul(gu, lora_gu, sum_into_gu=sum_into_gu)  # the LoRA term added in the same pass
    return gu, h, z1


def expert_mlp_forward(
    xs: torch.Tensor,
    g: Groups,
    w13: torch.Tensor,
    w2: torch.Tensor,
    lora: Sequence[torch.Tensor] | None,
    scaling: float,
    *,
    keep: bool = False,
) -> tuple[torch.Tensor, tuple | None]:
    """out [S, H] = down(silu(gate(xs)) * up(xs)) per group, LoRA included.

    Args:
        xs: [S, H] slots sorted by group. w13: [G, 2I, H]. w2: [G, H, I] (tensors, or GroupedWeights).
        lora: (A1 [G, r, H], B1 [G, 2I, r], A2 [G, r, I], B2 [G, H, r]) in xs.dtype, or None.
        keep: also return the intermediates the backward needs (pass them as its `saved`), else None.
    """
    gu, h, z1 = _gate_up(xs, g, w13, lora, scaling, sum_into_gu=keep)
    out = _frozen(h, w2, g, transposed=True)  # [S, H]
    z2 = None
    if lora is not None:
        z2 = _lora_in(h, lora[2], g, scaling)  # [S, r]
        out.add_(_mm_t(z2, lora[3], g))
    return out, ((gu, h, z1, z2) if keep else None)


def backward_intermediates(
    xs: torch.Tensor, g: Groups, w13: torch.Tensor, lora: Sequence[torch.Tensor] | None, scaling: float
) -> tuple:
    """The intermediates expert_mlp_backward needs, recomputed without the down projection (the backward takes
    the routing-weight gradient from dh and h, not from the output): gu, h, z1, z2."""
    gu, h, z1 = _gate_up(xs, g, w13, lora, scaling, sum_into_gu=True)
    z2 = _lora_in(h, lora[2], g, scaling) if lora is not None else None
    return gu, h, z1, z2


def to_keep(saved: tuple) -> tuple:
    """The forward's intermediates as held between a layer's recomputation and its backward: gu, z1 and z2; h is
    dropped (the backward recomputes it from gu in its element-wise pass), so a kept row takes 2I values."""
    gu, _, z1, z2 = saved
    return gu, None, z1, z2


def expert_mlp_backward(
    xs: torch.Tensor,
    dys: torch.Tensor,
    w: torch.Tensor,
    g: Groups,
    w13: torch.Tensor,
    w2: torch.Tensor,
    lora: Sequence[torch.Tensor] | None,
    scaling: float,
    *,
    saved: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Gradients of the routed sum of expert_mlp_forward (base weights frozen): each row's output enters the layer's
    result times its routing weight.

    The routing-weight gradient <dys, out> is taken as <dh, h> (dh the gradient of h for a unit weight; the output
    is linear in h), so neither the output nor its down projection is needed here.

    Args:
        xs, g, w13, w2, lora, scaling: as for the forward.
        dys: [S, H] gradient of the layer's result at each row's token (in xs.dtype); w: [S] routing weights.
        saved: the forward's intermediates (`keep=True`, or `to_keep` of them); recomputed when not given.

    Returns:
        dxs [S, H], the routing-weight gradients [S] fp32 and the factor gradients (dA1 [G, r, H], dB1 [G, 2I, r],
        dA2 [G, r, I], dB2 [G, H, r], fp32) or None.
    """
    if saved is None:
        saved = backward_intermediates(xs, g, w13, lora, scaling)
    gu, h, z1, z2 = saved
    del saved
    w = w.float()
    dh = _frozen(dys, w2, g, transposed=False)  # [S, I], for a unit routing weight
    grads = lora_dh = None
    if lora is not None:
        A1, B1, A2, B2 = lora
        if h is None:  # held by `to_keep`: recomputed from gu
            h = silu_mul(gu)
        dB2 = _wgrad(dys, (z2 * w[:, None]).to(z2.dtype), g, small="b")  # [G, H, r]
        dz2 = _mm_n(dys, B2, g) * scaling  # [S, r], for a unit routing weight
        dA2 = _wgrad((dz2 * w[:, None]).to(dz2.dtype), h, g, small="a")  # [G, r, I]
        lora_dh = _mm_n(dz2, A2, g)  # [S, I]
    del h
    # [S, 2I] for the rows' weights, and [S] <dh, h>; the LoRA term added in the same pass
    dgu, dots = swiglu_backward(dh, gu, lora_dh, w=w)
    del gu, dh, lora_dh
    dxs = _frozen(dgu, w13, g, transposed=False)  # [S, H]
    if lora is not None:
        dB1 = _wgrad(dgu, z1, g, small="b")  # [G, 2I, r]
        dz1 = _mm_n(dgu, B1, g) * scaling  # [S, r]
        dA1 = _wgrad(dz1, xs, g, small="a")  # [G, r, H]
        dxs.add_(_mm_n(dz1, A1, g))
        grads = (dA1, dB1, dA2, dB2)
    return dxs, dots, grads

"""Device side of a split MoE layer: the experts' SwiGLU MLP over slots grouped by expert, plus expert LoRA.

The weights are borrowed buffers (a streaming slot or the resident experts) that are overwritten once the
layer is done, so nothing here is recorded by autograd: the forward returns the output only, and the
backward recomputes the forward's intermediates from the saved inputs (cheap on a GPU, and it keeps no
[S, 2I] activations alive between the passes) before it computes dx, the routing-weight gradient and the
LoRA factor gradients by hand.

Grouped GEMMs run through `torch._grouped_mm` (bf16; H100 / H200 on CUDA) or a loop over the groups.

Legend: S = routed slots on this side (sorted by expert), G = experts in the group list, H = hidden,
I = expert intermediate, r = LoRA rank. `bounds` lists (start, end) of each group's rows in S.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["Groups", "expert_mlp_backward", "expert_mlp_forward", "grouped_mm_available"]


class Groups:
    """Row ranges of the G groups in the sorted slots, on the host (loop) and as int32 offsets (grouped GEMM)."""

    def __init__(self, counts: Sequence[int], device: torch.device):
        self.counts = [int(c) for c in counts]  # [G]
        ends, total = [], 0
        for c in self.counts:
            total += c
            ends.append(total)
        self.bounds = [(e - c, e) for e, c in zip(ends, self.counts, strict=True)]
        self.rows = total
        self._ends = ends
        self._offs: torch.Tensor | None = None
        self.device = device

    @property
    def offs(self) -> torch.Tensor:
        if self._offs is None:  # [G] int32 cumulative ends
            host = torch.tensor(self._ends, dtype=torch.int32)
            self._offs = host.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else host
        return self._offs


def grouped_mm_available(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm on CUDA bf16 (Hopper) with 16-byte aligned rows; anything else takes the loop."""
    aligned = all(d % 8 == 0 for d in (x.shape[1], w.shape[1], w.shape[2]))
    return hasattr(torch, "_grouped_mm") and x.dtype == w.dtype == torch.bfloat16 and x.is_cuda and aligned


def _mm_t(x: torch.Tensor, w: torch.Tensor, g: Groups) -> torch.Tensor:
    """[S, in] x, [G, out, in] w -> [S, out]: each group's rows times its w^T."""
    if grouped_mm_available(x, w) and g.rows:
        return torch._grouped_mm(x, w.transpose(1, 2), offs=g.offs)
    out = x.new_empty((x.shape[0], w.shape[1]))
    for i, (a, b) in enumerate(g.bounds):
        if b > a:
            torch.mm(x[a:b], w[i].t(), out=out[a:b])
    return out


def _mm_n(x: torch.Tensor, w: torch.Tensor, g: Groups) -> torch.Tensor:
    """[S, out] x, [G, out, in] w -> [S, in]: each group's rows times its w (the transposed product)."""
    if grouped_mm_available(x, w) and g.rows:
        return torch._grouped_mm(x, w, offs=g.offs)
    out = x.new_empty((x.shape[0], w.shape[2]))
    for i, (a, b) in enumerate(g.bounds):
        if b > a:
            torch.mm(x[a:b], w[i], out=out[a:b])
    return out


def _wgrad(a: torch.Tensor, b: torch.Tensor, g: Groups) -> torch.Tensor:
    """[S, p] a, [S, q] b -> [G, p, q] fp32: each group's a^T @ b (factor gradients)."""
    out = torch.zeros((len(g.counts), a.shape[1], b.shape[1]), dtype=torch.float32, device=a.device)
    for i, (s, e) in enumerate(g.bounds):
        if e > s:
            out[i] = a[s:e].t().float() @ b[s:e].float()
    return out


def _lora_in(x, A, g, scaling):
    # [S, in] x, [G, r, in] A -> [S, r] scaled LoRA input
    return _mm_t(x, A, g) * scaling


def expert_mlp_forward(
    xs: torch.Tensor,
    g: Groups,
    w13: torch.Tensor,
    w2: torch.Tensor,
    lora: Sequence[torch.Tensor] | None,
    scaling: float,
) -> torch.Tensor:
    """out [S, H] = down(silu(gate(xs)) * up(xs)) per group, LoRA included.

    Args:
        xs: [S, H] slots sorted by group. w13: [G, 2I, H]. w2: [G, H, I].
        lora: (A1 [G, r, H], B1 [G, 2I, r], A2 [G, r, I], B2 [G, H, r]) in xs.dtype, or None.
    """
    out, _ = _forward(xs, g, w13, w2, lora, scaling, keep=False)
    return out


def _forward(xs, g, w13, w2, lora, scaling, keep):
    gu = _mm_t(xs, w13, g)  # [S, 2I]
    z1 = None
    if lora is not None:
        z1 = _lora_in(xs, lora[0], g, scaling)  # [S, r]
        gu = gu + _mm_t(z1, lora[1], g)
    gate, up = gu.chunk(2, dim=-1)  # [S, I] each
    h = F.silu(gate) * up  # [S, I]
    out = _mm_t(h, w2, g)  # [S, H]
    z2 = None
    if lora is not None:
        z2 = _lora_in(h, lora[2], g, scaling)  # [S, r]
        out = out + _mm_t(z2, lora[3], g)
    return out, ((gate, up, h, z1, z2) if keep else None)


def expert_mlp_backward(
    xs: torch.Tensor,
    dout: torch.Tensor,
    g: Groups,
    w13: torch.Tensor,
    w2: torch.Tensor,
    lora: Sequence[torch.Tensor] | None,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Gradients of expert_mlp_forward (base weights frozen).

    Args:
        xs, g, w13, w2, lora, scaling: as for the forward.
        dout: [S, H] gradient of its output.

    Returns:
        out [S, H] (recomputed, for the routing-weight gradient), dxs [S, H], and the factor gradients
        (dA1 [G, r, H], dB1 [G, 2I, r], dA2 [G, r, I], dB2 [G, H, r], fp32) or None.
    """
    out, (gate, up, h, z1, z2) = _forward(xs, g, w13, w2, lora, scaling, keep=True)
    dh = _mm_n(dout, w2, g)  # [S, I]
    grads = None
    if lora is not None:
        A1, B1, A2, B2 = lora
        dB2 = _wgrad(dout, z2, g)  # [G, H, r]
        dz2 = _mm_n(dout, B2, g) * scaling  # [S, r]
        dA2 = _wgrad(dz2, h, g)  # [G, r, I]
        dh = dh + _mm_n(dz2, A2, g)
    sig = torch.sigmoid(gate.float())
    silu = gate.float() * sig
    dgate = dh.float() * up.float() * sig * (1 + gate.float() * (1 - sig))  # [S, I]
    dup = dh.float() * silu
    dgu = torch.cat([dgate, dup], dim=-1).to(xs.dtype)  # [S, 2I]
    dxs = _mm_n(dgu, w13, g)  # [S, H]
    if lora is not None:
        dB1 = _wgrad(dgu, z1, g)  # [G, 2I, r]
        dz1 = _mm_n(dgu, B1, g) * scaling  # [S, r]
        dA1 = _wgrad(dz1, xs, g)  # [G, r, H]
        dxs = dxs + _mm_n(dz1, A1, g)
        grads = (dA1, dB1, dA2, dB2)
    return out, dxs, grads

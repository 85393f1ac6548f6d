"""Plain-torch reference of the routed-experts operator.

It is the yardstick for the C++ kernels in tests and the fallback when the compiled module is missing.
It is differentiable with torch autograd: dx, d(routing weights) and the expert-LoRA gradients.

Legend: T = tokens, K = experts per token, E = experts, H = hidden, I = expert intermediate, r = LoRA rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["experts_reference"]


def experts_reference(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    lora_scaling: float = 1.0,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Computes sum_k w[t,k] * down_e(silu(gate_e(x_t)) * up_e(x_t)) with e = top_k_index[t,k].

    Slots whose index is -1 (experts owned elsewhere, as SGLang masks them) contribute nothing.

    Args:
        x: [T, H] hidden states.
        top_k_index: [T, K] expert ids in [0, E) or -1.
        top_k_weights: [T, K] routing weights.
        gate_up_proj: [E, 2I, H] fused gate (first I rows) and up projections.
        down_proj: [E, H, I].
        lora: optional (gate_up_A [E, r, H], gate_up_B [E, 2I, r], down_A [E, r, I], down_B [E, H, r]);
            each projection W gains lora_scaling * B @ A.
        lora_scaling: alpha / r.
        compute_dtype: dtype of the arithmetic; the result is cast back to x.dtype.

    Returns:
        [T, H] in x.dtype.
    """
    num_experts = gate_up_proj.shape[0]
    xc = x.to(compute_dtype)  # [T, H]
    wc = top_k_weights.to(compute_dtype)  # [T, K]
    y = torch.zeros_like(xc)  # [T, H]
    for e in torch.unique(top_k_index).tolist():
        if e < 0 or e >= num_experts:
            continue
        token_idx, slot_idx = torch.where(top_k_index == e)  # [n], [n]
        xe = xc[token_idx]  # [n, H]
        gu = xe @ gate_up_proj[e].to(compute_dtype).T  # [n, 2I]
        if lora is not None:
            gu = gu + lora_scaling * (xe @ lora[0][e].to(compute_dtype).T) @ lora[1][e].to(compute_dtype).T
        gate, up = gu.chunk(2, dim=-1)  # [n, I] each
        h = F.silu(gate) * up  # [n, I]
        out = h @ down_proj[e].to(compute_dtype).T  # [n, H]
        if lora is not None:
            out = out + lora_scaling * (h @ lora[2][e].to(compute_dtype).T) @ lora[3][e].to(compute_dtype).T
        y = y.index_add(0, token_idx, out * wc[token_idx, slot_idx, None])
    return y.to(x.dtype)

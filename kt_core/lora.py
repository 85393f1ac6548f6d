"""Expert LoRA: per-expert low-rank factors on the fused gate_up and down projections.

The layout follows the math of the C++ operator: every projection W [E, out, in] gains
scaling * B[e] @ A[e], with A [E, r, in] applied first and B [E, out, r] second. B starts at zero, so a
fresh adapter leaves the model unchanged. The factors are fp32 nn.Parameters in host memory, where the C++
operator reads them and writes their gradients, and the optimizer updates them in place. Where the GPU computes
the experts (streaming), `place_` can move them to the GPU instead: their gradients, the optimizer's work on
them and gradient clipping then stay on the device, and the CPU operator gets host copies per call.

Legend: E = experts, H = hidden, I = expert intermediate, r = rank.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ExpertLoRA"]


class ExpertLoRA(nn.Module):
    """LoRA factors for one layer's routed experts.

    Args:
        num_experts: E.
        hidden_size: H.
        intermediate_size: I.
        rank: r.
        alpha: LoRA alpha; the update is scaled by alpha / r.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *, rank: int, alpha: float):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"ExpertLoRA: rank must be a positive integer, got {rank}")
        self.rank = rank
        self.alpha = float(alpha)
        E, H, I = num_experts, hidden_size, intermediate_size
        cpu32 = {"device": "cpu", "dtype": torch.float32}
        self.gate_up_A = nn.Parameter(torch.empty(E, rank, H, **cpu32))  # [E, r, H]
        self.gate_up_B = nn.Parameter(torch.zeros(E, 2 * I, rank, **cpu32))  # [E, 2I, r]
        self.down_A = nn.Parameter(torch.empty(E, rank, I, **cpu32))  # [E, r, I]
        self.down_B = nn.Parameter(torch.zeros(E, H, rank, **cpu32))  # [E, H, r]
        self.reset_parameters()

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def reset_parameters(self) -> None:
        """Initializes A like PEFT's default (Kaiming-uniform, a=sqrt(5)) per expert and B to zero."""
        for a in (self.gate_up_A, self.down_A):
            bound = 1.0 / math.sqrt(a.shape[-1])  # kaiming_uniform_(a=sqrt(5)) on a [r, in] matrix
            nn.init.uniform_(a, -bound, bound)
        nn.init.zeros_(self.gate_up_B)
        nn.init.zeros_(self.down_B)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (gate_up_A, gate_up_B, down_A, down_B)."""
        return (self.gate_up_A, self.gate_up_B, self.down_A, self.down_B)

    @property
    def device(self) -> torch.device:
        return self.gate_up_A.device

    def place_(self, device: str | torch.device) -> ExpertLoRA:
        """Moves the factors (and any gradients) to `device`, keeping the Parameter objects an optimizer holds.

        Call it before the optimizer has state for them (the streaming runtime does, when it is enabled).
        """
        device = torch.device(device)
        for f in self.factors():
            f.data = f.data.to(device)
            if f.grad is not None:
                f.grad = f.grad.to(device)
        return self

    def _apply(self, fn, recurse=True):
        # Like the base weights, expert LoRA stays where kt-plugins put it: `model.cuda()` must not move it.
        return self

    def extra_repr(self) -> str:
        E, r, H = self.gate_up_A.shape
        return f"experts={E}, hidden={H}, intermediate={self.down_A.shape[-1]}, rank={r}, alpha={self.alpha}"

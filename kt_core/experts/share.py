"""The GPU share of an expert layer: what a KTExperts layer asks of whatever computes experts on a GPU.

A layer with no share computes every expert on the CPU. A share (streaming's `StreamedShare`, SGLang's
`SGLangGpuShare`) is attached with `KTExperts.attach_gpu_share`; at each call the layer asks it for a
`GpuCall`, which says which experts the GPU computes this time and computes them:

- `covers_all`: the GPU holds every expert of the layer for this call (the device path: the routing never
  leaves the device, the CPU does nothing);
- otherwise `weight_sets` lists the GPU's weight sets [(expert ids, w13 [G, 2I, H], w2 [G, H, I]), ...] and
  the layer splits the slots between them and the CPU (kt_core/experts/split.py), or, when `weight_sets` is
  None, the share routes on the device itself and `experts` names the ids it computes. The layer only passes
  w13 / w2 back to the share's own calls: a share may hand out other objects in their place (streaming's FP8
  slots give `GroupedWeight`s, dequantized a group of experts at a time when its GEMMs take them).

The layer owns the rest: staging to the host, the CPU operator, the device copy of the expert-LoRA factors
(made at every call, so no update of the factors can be missed), adding both sides' outputs and gradients.

Legend: T = tokens, K = experts per token, E = experts, H = hidden, I = expert intermediate, r = LoRA rank.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from kt_core.experts.split import GpuPart

__all__ = ["GpuCall", "GpuShare", "LoraGrads", "run_now"]

# Device-side LoRA factor gradients of some experts: (expert ids [G], [dA1 [G, r, H], dB1 [G, 2I, r],
# dA2 [G, r, I], dB2 [G, H, r]] fp32 on the device).
LoraGrads = tuple[list[int], list[torch.Tensor]]


class GpuCall(Protocol):
    """The GPU side of one call of one layer (forward, recomputation or backward)."""

    covers_all: bool
    weight_sets: list[tuple[list[int], torch.Tensor, torch.Tensor]] | None
    experts: list[int]

    def forward(self, x, ids, w, parts: list[GpuPart] | None, lora_dev, *, keep: bool) -> torch.Tensor:
        """Sums routing weight * expert output over the GPU's slots: [T, H] fp32 on x's device."""

    def backward(self, x, ids, w, dy, parts: list[GpuPart] | None, lora_dev):
        """Returns dx [T, H] fp32, dw [T, K] fp32 (zero on CPU slots) and a list of LoraGrads (or None)."""

    def submit_cpu(self, fn, *, slots: int) -> Future:
        """Runs the CPU share (`fn`) while the GPU works; returns its future."""

    def end(self) -> None:
        """Releases what the call held (a streaming slot)."""


class GpuShare(Protocol):
    """Computes some experts of one layer on a GPU.

    Optional attributes: `compute_dtype` (the dtype of the weights its GEMMs take, in which the layer uploads the
    expert-LoRA factors; default the layer's weight dtype), `takes_fp8` (True: it dequantizes fp8 weights
    itself, so an fp8 layer may attach it) and `reads_host_weights` (True: it copies the layer's host weights to the
    GPU, so they must stay: KTExperts.release_host_weights refuses).
    """

    device: torch.device

    def begin(self, ids: torch.Tensor, phase: str) -> GpuCall:
        """Opens a call; `phase` is "fwd", "recompute" (a checkpointed layer's forward inside the backward)
        or "bwd". Must not wait for the device."""


def run_now(fn) -> Future:
    """A future already holding fn's result (the CPU share run inline, on the caller's thread)."""
    future: Future = Future()
    future.set_result(fn())
    return future

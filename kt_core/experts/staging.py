"""Moving a layer's inputs to host memory for the CPU operator, and results back to the device.

Host copies go through pinned buffers from torch's caching host allocator. `stage_to_host` queues the
device-to-host copies of all of a call's tensors and waits once, on the current stream only (not the whole
device); `to_device` returns a host result asynchronously (the allocator keeps a pinned block alive until
the copy that reads it has finished, so reuse is safe). CPU outputs bound for a device are allocated
pinned by the operator itself (`experts_forward(pin_output=True)`), so they travel without a second copy.
"""

from __future__ import annotations

import torch

__all__ = ["stage_to_host", "to_device", "to_host", "upload_factors"]


def stage_to_host(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Contiguous host copies of `tensors` (None passes through), with one wait for all of them."""
    out, device = [], None
    for t in tensors:
        if t is None or t.device.type == "cpu":
            out.append(t if t is None else t.contiguous())
            continue
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        out.append(host)
        device = t.device
    if device is not None:  # the CPU reads these right away: wait for this stream's copies only
        torch.accelerator.current_stream(device).synchronize()
    return out


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor with t's data (t itself when it already is one)."""
    return stage_to_host(t)[0]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on `device` (t itself when it is there); from the CPU the copy is asynchronous through a pinned buffer,
    from another device it is a device-to-device copy (never through host memory)."""
    if device.type == "cpu" or t.device == device:
        return t
    if t.device.type == "cpu" and not t.is_pinned():
        pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        pinned.copy_(t)
        t = pinned
    return t.to(device, non_blocking=True)


def upload_factors(factors, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...] | None:
    """Device copies of the expert-LoRA factors, read now (no cache: nothing can go stale).

    A layer's factors are a few MB; copying them at every call costs less than any rule for knowing whether
    they changed (torch's fused optimizers update parameters in place without bumping their version).
    Factors page-locked by the streaming store travel by DMA straight from the parameters.
    """
    if not factors:
        return None
    if device.type == "cpu" or factors[0].device == device:  # factors on the GPU (or the CPU standing in for it)
        return tuple(f.detach().to(dtype, copy=True) for f in factors)
    return tuple(to_device(f.detach(), device).to(dtype) for f in factors)

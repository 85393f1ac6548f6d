"""Moving activations between an accelerator and host memory for the CPU operator.

Host copies go through pinned buffers from torch's caching host allocator: the device-to-host copy
waits only on the current stream, and the host-to-device copy of the result is asynchronous (the
allocator keeps the pinned block alive until that copy has finished, so reuse is safe).
"""

from __future__ import annotations

import torch

__all__ = ["to_device", "to_host"]


def to_host(t: torch.Tensor) -> torch.Tensor:
    """Returns a contiguous CPU tensor with t's data (t itself when it already is one)."""
    if t.device.type == "cpu":
        return t.contiguous()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    # The CPU kernel reads `host` right away: wait for this stream's copy only, not the whole device.
    torch.accelerator.current_stream(t.device).synchronize()
    return host


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Returns t on `device`; from the CPU the copy is asynchronous through a pinned buffer."""
    if device.type == "cpu":
        return t
    if not t.is_pinned():
        pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        pinned.copy_(t)
        t = pinned
    return t.to(device, non_blocking=True)

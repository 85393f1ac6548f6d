"""Recycled host buffers for the large per-call tensors of the experts operator (the forward's cache).

A fresh allocation of hundreds of MB is returned to the OS when freed, and the next one takes a page fault
per 4 KB page on first touch, inside the operator's parallel loops. On the GPU test machine that cost grew
linearly with the cache (about 2.5 us per page: some 170 ms for the 278 MB cache of a DeepSeek-V2-Lite layer
at T=4096, three times the forward's arithmetic). The pool hands a buffer out again once no tensor but the
pool's own references its storage, so steady-state training touches no fresh pages.
"""

from __future__ import annotations

import threading

import torch

_MIN_BYTES = 8 << 20  # below this, malloc's own free lists serve well
_MAX_BUFFERS = 64  # bounds what the pool keeps alive (in use or not)


def _storage_refs(t: torch.Tensor) -> int:
    """Tensors (and storage handles) referencing t's storage, counting the handle made here."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _use_count_works() -> bool:
    fn = getattr(torch._C, "_storage_Use_Count", None)
    if fn is None:
        return False
    try:
        base = torch.empty(16)
        free = _storage_refs(base)
        view = base[:8]
        used = _storage_refs(view)
        del view
        return used == free + 1 and _storage_refs(base) == free
    except Exception:  # a private API: any surprise turns the pool off
        return False


class HostBufferPool:
    """torch.empty for 1-D host buffers, reusing storages nobody else references any more."""

    def __init__(self, max_buffers: int = _MAX_BUFFERS, min_bytes: int = _MIN_BYTES):
        self._lock = threading.Lock()
        self._buffers: list[torch.Tensor] = []
        self._max = max_buffers
        self._min_bytes = min_bytes
        self._enabled = _use_count_works()
        self._free_refs = _storage_refs(torch.empty(1)) if self._enabled else 0

    def _unused(self, buf: torch.Tensor) -> bool:
        return _storage_refs(buf) == self._free_refs

    def empty(self, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if not self._enabled or numel * dtype.itemsize < self._min_bytes:
            return torch.empty(numel, dtype=dtype)
        with self._lock:
            best = None
            for buf in self._buffers:  # the smallest free buffer that fits without wasting over half of it
                fits = buf.dtype == dtype and numel <= buf.numel() <= 2 * numel
                if fits and (best is None or buf.numel() < best.numel()) and self._unused(buf):
                    best = buf
            if best is None:
                if len(self._buffers) >= self._max:
                    self._buffers = [b for b in self._buffers if not self._unused(b)]
                best = torch.empty(numel, dtype=dtype)
                if len(self._buffers) < self._max:
                    self._buffers.append(best)
            # A tensor of its own on the buffer's storage (counted as a reference until its owner drops it), not
            # a view: an autograd Function may return it as an output that callers modify in place.
            return torch.empty(0, dtype=dtype).set_(best.untyped_storage(), 0, (numel,))

    def clear(self) -> None:
        """Forget every buffer (those still in use stay alive with their users)."""
        with self._lock:
            self._buffers = []


host_buffers = HostBufferPool()

"""Expert weights for the GPU side: pinned host store, two streaming slots filled on a side stream, residents.

- Pinning: each layer's `gate_up_proj` / `down_proj` host tensors (the KTExperts parameters, which the CPU
  kernels also read) are page-locked in place with cudaHostRegister, not copied. When the OS refuses
  (RLIMIT_MEMLOCK, no CUDA), the copies come from pageable memory: a warning says so, the result is the
  same, the copies are slower and no longer overlap the compute.
- Slots: two device buffers of `capacity` experts each. A layer's streamed experts are copied into the
  slot that the current layer does not use, on a side stream, while the current layer computes. When a
  full-layer slot receives every expert the layer's residents do not hold, the residents are copied in
  too (device to device, at their expert positions), so the slot holds the whole layer and the layer's
  calls keep the device path (no host split); the residents still save their PCIe bytes. The
  compute stream waits on the copy's event before using it, and the side stream waits on the slot's
  last use before overwriting it. A slot keeps its layer until overwritten, so the recomputation of a
  checkpointed layer and its backward share one copy, and so do the last layer's forward and backward.
- int8 (optional): per-output-row symmetric int8 copies with fp32 scales are streamed (half the bytes)
  and dequantized on the device into one scratch buffer.
- Without CUDA the same code runs on the CPU device ("fake device"): copies are plain copies, timed.

Legend: E = experts, C = slot capacity (experts), H = hidden, I = expert intermediate.
"""

from __future__ import annotations

import ctypes
import logging
import time
import weakref
from dataclasses import dataclass, field

import torch

__all__ = ["ExpertStore", "pin_in_place", "quantize_rows"]

logger = logging.getLogger(__name__)


_ALREADY_REGISTERED = 712  # cudaErrorHostMemoryAlreadyRegistered


def pin_in_place(t: torch.Tensor) -> bool | None:
    """Page-locks t's memory with cudaHostRegister (no copy).

    Returns True when this call registered it (unregister it later), None when it already was page-locked,
    False, with a warning, when CUDA refused (the caller then streams from pageable memory).
    """
    if not torch.cuda.is_available() or t.is_pinned():
        return None
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    code = int(getattr(err, "value", err))
    if code == 0:
        return True
    _clear_cuda_error()  # a failed runtime call would otherwise fail the next kernel launch check
    if code == _ALREADY_REGISTERED:
        return None
    logger.warning(
        "streaming: cudaHostRegister refused %.2f GiB of expert weights (cudaError %d); streaming from "
        "pageable memory instead: same results, about half the PCIe speed and no copy/compute overlap. "
        "Raise the locked-memory limit (ulimit -l) or free host RAM to fix it.",
        t.numel() * t.element_size() / 2**30,
        code,
    )
    return False


def _clear_cuda_error() -> None:
    """Resets the CUDA runtime's per-thread last error (torch does not expose cudaGetLastError)."""
    major = (torch.version.cuda or "12").split(".")[0]
    try:
        ctypes.CDLL(f"libcudart.so.{major}").cudaGetLastError()
    except OSError:
        logger.debug("streaming: libcudart.so.%s not found to clear the CUDA error", major)


def _unpin_all(tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        unpin(t)
    tensors.clear()


def unpin(t: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, out, in] -> int8 [E, out, in], fp32 scales [E, out] (symmetric, per output row)."""
    q = torch.empty(w.shape, dtype=torch.int8)
    s = torch.empty(w.shape[:2], dtype=torch.float32)
    for e in range(w.shape[0]):  # one expert at a time: bounded fp32 scratch
        we = w[e].float()
        se = we.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # [out]
        s[e] = se
        q[e] = torch.round(we / se[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, s


@dataclass
class _Layer:
    gate_up: torch.Tensor  # [E, 2I, H] host
    down: torch.Tensor  # [E, H, I] host
    q: tuple[torch.Tensor, ...] | None = None  # int8 gate_up, scales [E, 2I], int8 down, scales [E, H]
    resident: list[int] = field(default_factory=list)
    res_w13: torch.Tensor | None = None  # [R, 2I, H] device
    res_w2: torch.Tensor | None = None  # [R, H, I] device


@dataclass
class _Slot:
    bufs: tuple[torch.Tensor, ...]  # w13 [C, 2I, H], w2 [C, H, I] (+ scales [C, 2I], [C, H] for int8)
    tag: tuple[int, tuple[int, ...]] | None = None  # (layer, expert ids) it holds or is receiving
    ready: object = None  # event: copy done
    free: object = None  # event: last compute that read it
    used: int = 0  # when it was last acquired (least recently used is overwritten first)


class ExpertStore:
    """Host store + two device slots + resident experts for every streamed layer of a model."""

    def __init__(self, device: torch.device, capacity: int, *, quantize: str | None = None):
        if quantize not in (None, "int8"):
            raise ValueError(f"streaming: quantize must be None or 'int8', got {quantize!r}")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.capacity = capacity
        self.quantize = quantize
        self.layers: list[_Layer] = []
        self.slots: list[_Slot] = []
        self.scratch: tuple[torch.Tensor, torch.Tensor] | None = None  # int8 mode: dequantized w13, w2
        self.scratch_tag = None
        self.side = torch.cuda.Stream(self.device) if self.cuda else None
        self.pinned: list[torch.Tensor] = []
        self.pin_ok = True
        self._copies: list[tuple[object, object, int]] = []  # (start, end, bytes) of side-stream copies
        self._copy_s = 0.0  # fake device: copy seconds
        self._copy_bytes = 0
        self._clock = 0
        # Registrations must not outlive the tensors (freed, re-used memory would stay mapped): unregister when
        # the store goes away even if close() was never called; the finalizer keeps the tensors alive till then.
        self._finalizer = weakref.finalize(self, _unpin_all, self.pinned) if self.cuda else None

    # ---- setup -----------------------------------------------------------------------------------

    def add_layer(self, gate_up: torch.Tensor, down: torch.Tensor) -> int:
        """Registers one layer's host weights ([E, 2I, H], [E, H, I]); returns its index."""
        layer = _Layer(gate_up, down)
        if self.quantize == "int8":
            q13, s13 = quantize_rows(gate_up)
            q2, s2 = quantize_rows(down)
            layer.q = (q13, q2, s13, s2)  # the order of a slot's buffers
        for t in layer.q or (gate_up, down):
            self.pin(t)
        self.layers.append(layer)
        if not self.slots and self.capacity:
            self._make_slots(gate_up, down)
        return len(self.layers) - 1

    def pin(self, t: torch.Tensor) -> None:
        """Page-locks a host tensor in place (once); after the first refusal, stops trying."""
        if self.cuda and self.pin_ok and not t.is_pinned():
            registered = pin_in_place(t)
            self.pin_ok = registered is not False
            if registered:
                self.pinned.append(t)

    def _make_slots(self, gate_up, down) -> None:
        C, (_, two_I, H), I = self.capacity, gate_up.shape, down.shape[2]
        dt = torch.int8 if self.quantize else gate_up.dtype
        for _ in range(2):
            bufs = [torch.empty((C, two_I, H), dtype=dt, device=self.device)]
            bufs.append(torch.empty((C, H, I), dtype=dt, device=self.device))
            if self.quantize:
                bufs += [torch.empty((C, two_I), device=self.device), torch.empty((C, H), device=self.device)]
            self.slots.append(_Slot(tuple(bufs)))
        if self.quantize:
            self.scratch = (
                torch.empty((C, two_I, H), dtype=gate_up.dtype, device=self.device),
                torch.empty((C, H, I), dtype=gate_up.dtype, device=self.device),
            )

    def set_resident(self, layer: int, experts: list[int]) -> None:
        """Keeps these experts of `layer` on the device (exact copies of the host weights)."""
        lw = self.layers[layer]
        lw.resident = sorted(experts)
        if not experts:
            lw.res_w13 = lw.res_w2 = None
            return
        idx = torch.tensor(lw.resident)
        lw.res_w13 = lw.gate_up[idx].to(self.device)
        lw.res_w2 = lw.down[idx].to(self.device)

    def expert_bytes_bf(self, layer: int = 0) -> int:
        """Device bytes one resident expert takes (the weights as stored on the host)."""
        lw = self.layers[layer]
        return sum(t[0].numel() * t.element_size() for t in (lw.gate_up, lw.down))

    def expert_bytes(self, layer: int = 0) -> int:
        """Bytes one expert moves over PCIe."""
        lw = self.layers[layer]
        if lw.q is not None:
            return sum(t[0].numel() * t.element_size() for t in lw.q)
        return sum(t[0].numel() * t.element_size() for t in (lw.gate_up, lw.down))

    # ---- streaming -------------------------------------------------------------------------------

    def holds(self, layer: int) -> tuple[int, ...] | None:
        for slot in self.slots:
            if slot.tag is not None and slot.tag[0] == layer:
                return slot.tag[1]
        return None

    def invalidate(self, layer: int) -> None:
        for slot in self.slots:
            if slot.tag is not None and slot.tag[0] == layer:
                slot.tag = None

    def slot_content(self, layer: int, streamed: list[int]) -> tuple[int, ...]:
        """The expert ids a slot holds, in slot order, once `streamed` experts of `layer` are loaded."""
        streamed = list(streamed)[: self.capacity]
        resident = self.layers[layer].resident
        E = self.layers[layer].gate_up.shape[0]
        if resident and self.capacity == E and len(set(streamed) | set(resident)) == E:
            return tuple(range(E))  # the whole layer: streamed experts and residents at their positions
        return tuple(streamed)

    def load(self, layer: int, experts: list[int], *, avoid: int | None = None) -> None:
        """Starts copying `experts` of `layer` into a slot not holding `avoid` (no-op if already there)."""
        if not experts or not self.slots or self.holds(layer) is not None:
            return
        content = self.slot_content(layer, experts)
        lw = self.layers[layer]
        resident = set(lw.resident) & set(content)
        streamed = [e for e in content if e not in resident]
        free = [s for s in self.slots if s.tag is None or s.tag[0] != avoid]
        slot = min(free, key=lambda s: (s.tag is not None, s.used))
        slot.tag = (layer, content)
        srcs = lw.q if lw.q is not None else (lw.gate_up, lw.down)
        nbytes = len(streamed) * self.expert_bytes(layer)
        if not self.cuda:
            t0 = time.perf_counter()
            self._copy(slot, srcs, content, resident)
            self._copy_s += time.perf_counter() - t0
            self._copy_bytes += nbytes
            return
        with torch.cuda.stream(self.side):
            if slot.free is not None:
                self.side.wait_event(slot.free)  # the compute that last read this slot
            start = torch.cuda.Event(enable_timing=True)
            start.record(self.side)
            self._copy(slot, srcs, content, resident)
            end = torch.cuda.Event(enable_timing=True)
            end.record(self.side)
        slot.ready = end
        self._copies.append((start, end, nbytes))

    def _copy(self, slot: _Slot, srcs, content: tuple[int, ...], resident: set[int]) -> None:
        """Host -> slot copies of the streamed experts of `content` (residents: see `_fill_residents`)."""
        n = len(content)
        if not resident and content == tuple(range(n)):  # a prefix of the experts: one copy per tensor
            for dst, src in zip(slot.bufs, srcs, strict=True):
                dst[:n].copy_(src[:n], non_blocking=True)
            return
        for dst, src in zip(slot.bufs, srcs, strict=True):
            for j, e in enumerate(content):
                if e not in resident:
                    dst[j].copy_(src[e], non_blocking=True)
        if resident and self.quantize is None:
            self._fill_residents(slot.tag[0], (slot.bufs[0], slot.bufs[1]))

    def _fill_residents(self, layer: int, dst: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Device copies of `layer`'s residents into a whole-layer weight set (positions = expert ids)."""
        lw = self.layers[layer]
        idx = torch.tensor(lw.resident, device=self.device)
        dst[0].index_copy_(0, idx, lw.res_w13)
        dst[1].index_copy_(0, idx, lw.res_w2)

    def acquire(self, layer: int) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
        """The streamed experts of `layer` present in a slot, and their weights [G, 2I, H], [G, H, I].

        The compute stream is made to wait for the copy; call `release(layer)` after the last kernel
        that reads them has been queued.
        """
        slot = next((s for s in self.slots if s.tag is not None and s.tag[0] == layer), None)
        if slot is None:
            return [], None, None
        experts = list(slot.tag[1])
        n = len(experts)
        self._clock += 1
        slot.used = self._clock
        if self.cuda and slot.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        if self.quantize is None:
            return experts, slot.bufs[0][:n], slot.bufs[1][:n]
        if self.scratch_tag != slot.tag:  # dequantize on the compute stream (fp32 scales, per row), one kernel each
            q13, q2, s13, s2 = slot.bufs[0], slot.bufs[1], slot.bufs[2], slot.bufs[3]
            torch.mul(q13[:n], s13[:n, :, None], out=self.scratch[0][:n])
            torch.mul(q2[:n], s2[:n, :, None], out=self.scratch[1][:n])
            if set(self.layers[layer].resident) & set(experts):  # a whole layer: the residents' exact weights
                self._fill_residents(layer, self.scratch)
            self.scratch_tag = slot.tag
        return experts, self.scratch[0][:n], self.scratch[1][:n]

    def release(self, layer: int) -> None:
        if not self.cuda:
            return
        for slot in self.slots:
            if slot.tag is not None and slot.tag[0] == layer:
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(self.device))
                slot.free = ev

    def take_pcie(self) -> tuple[float, int]:
        """(seconds the copies took, bytes) since the last call; synchronizes the copies on CUDA."""
        if not self.cuda:
            out = (self._copy_s, self._copy_bytes)
            self._copy_s, self._copy_bytes = 0.0, 0
            return out
        seconds, nbytes = 0.0, 0
        for start, end, b in self._copies:
            end.synchronize()
            seconds += start.elapsed_time(end) / 1e3
            nbytes += b
        self._copies.clear()
        return seconds, nbytes

    def gpu_bytes(self) -> int:
        """Device bytes held: slots, int8 scratch, residents."""
        ts = [b for s in self.slots for b in s.bufs] + list(self.scratch or ())
        ts += [t for lw in self.layers for t in (lw.res_w13, lw.res_w2) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)

    def close(self) -> None:
        """Unregisters pinned host memory and frees device buffers."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._finalizer()  # unregisters once
        self.pinned.clear()
        self.slots.clear()
        self.scratch = None
        for lw in self.layers:
            lw.res_w13 = lw.res_w2 = None

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
- FP8 experts (KTExperts(dtype=torch.float8_e4m3fn)) stream as stored: the slots hold the e4m3 bytes and the
  fp32 128 x 128 block scales (half the PCIe bytes of bf16). The GEMMs take them as `GroupedWeight`s, multiplied
  from e4m3 where kt_core.streaming.fp8_gemm applies (`dequant_bytes` 0: no buffer is made), else a group of
  at most `group` experts at a time (planner.dequant_group: as many bf16 experts as `dequant_bytes` holds), each
  group dequantized on the compute stream into one bf16 working buffer of `group` experts right before its GEMMs
  (the block-scaled multiply of kt_core.loading.fp8): the GEMMs see exactly the weights of the bf16-dequantized
  model, and the buffer is fixed, whatever the slot capacity. What the buffer holds is remembered per range, so
  a slot that fits it whole is dequantized once for the forward, the recomputation and the backward. Residents
  stay FP8 on the device too; those not part of a whole-layer slot are taken the same way, after the slot's
  experts when both fit the buffer, else from its start.
- From the packed copy (`stream_from_tiles`): a layer whose CPU operator packed its experts (its first CPU share)
  streams the operator's tiles instead of the weights, which the layer then frees: host RAM holds the experts once
  (kt_core/streaming/tiles.py). The tiles cross PCIe into a staging buffer of at most `STAGE_BYTES` (one expert's
  gate_up at least) and are put back in the slot's layout there, by one strided copy per group, on the side stream.
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

from kt_core.loading.fp8 import DEFAULT_BLOCK, scale_blocks_
from kt_core.streaming.planner import DEQUANT_BYTES, dequant_group, stage_bytes
from kt_core.streaming.tiles import untile_

__all__ = ["FP8", "FP8_WORKING_DTYPE", "ExpertStore", "GroupedWeight", "pin_in_place", "quantize_rows"]

FP8 = torch.float8_e4m3fn
FP8_WORKING_DTYPE = torch.bfloat16  # what FP8 experts are dequantized to for the GEMMs

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
    scales: tuple[torch.Tensor, torch.Tensor] | None = None  # FP8: fp32 block scales of gate_up and down
    q: tuple[torch.Tensor, ...] | None = None  # int8 gate_up, int8 down, scales [E, 2I], scales [E, H]
    resident: list[int] = field(default_factory=list)
    res: tuple[torch.Tensor, ...] | None = None  # the residents as stored ([R, ...] each of `stored`), device
    res_ids: torch.Tensor | None = None  # [R] int64 their expert ids, device (a whole-layer slot's positions)
    tiles: tuple[torch.Tensor, torch.Tensor] | None = None  # the packed copy [E, bytes] uint8 streamed instead
    tiles_owner: object = None  # what keeps the tiles' memory (the CPU operator)

    @property
    def stored(self) -> tuple[torch.Tensor, ...]:
        """The host tensors of the weights as kept: gate_up, down (+ their block scales for FP8)."""
        return (self.gate_up, self.down, *(self.scales or ()))

    @property
    def streamed(self) -> tuple[torch.Tensor, ...]:
        """The host tensors copied into a slot, in the order of its buffers."""
        return self.q if self.q is not None else self.stored


def _runs(pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(slot position, expert, count) of the runs where consecutive pairs (position, expert) both advance by one:
    a layer's streamed experts then cross in a few copies per tensor, not one per expert (each copy is a launch)."""
    runs: list[list[int]] = []
    for j, e in pairs:
        if runs and runs[-1][0] + runs[-1][2] == j and runs[-1][1] + runs[-1][2] == e:
            runs[-1][2] += 1
        else:
            runs.append([j, e, 1])
    return [tuple(r) for r in runs]


def _raw(t: torch.Tensor) -> torch.Tensor:
    """e4m3 tensors as their bytes, for the indexing kernels that take no float8 (index_copy_ on the CPU)."""
    return t.view(torch.uint8) if t.dtype == FP8 else t


def _per_expert_bytes(tensors) -> int:
    return sum(t[0].numel() * t.element_size() for t in tensors)


@dataclass
class _Slot:
    # w13 [C, 2I, H], w2 [C, H, I], + for int8 row scales [C, 2I], [C, H], for FP8 block scales [C, 2I/128, H/128],
    # [C, H/128, I/128] (whole blocks rounded up)
    bufs: tuple[torch.Tensor, ...]
    tag: tuple[int, tuple[int, ...]] | None = None  # (layer, expert ids) it holds or is receiving
    ready: object = None  # event: copy done
    free: object = None  # event: last compute that read it
    used: int = 0  # when it was last acquired (least recently used is overwritten first)


class GroupedWeight:
    """One FP8 weight of a weight set (w13 [G, 2I, H] or w2 [G, H, I]) as the GEMMs take it: `group` experts at a time.

    `take(lo, hi)` returns experts [lo, hi) (at most `group` of them) dequantized to bf16 in the store's working
    buffer, on the compute stream; the next `take` of another range may overwrite them, so each group's GEMMs are
    queued before the next group is taken (kt_core.streaming.gpu_experts does so).
    """

    def __init__(self, store: ExpertStore, which: int, q: torch.Tensor, scale: torch.Tensor, key: tuple, at: int):
        self.store = store
        self.which = which  # 0: gate_up (w13), 1: down (w2); also the working buffer it goes to
        self.q, self.scale = q, scale  # [G, ...] e4m3 and its fp32 block scales, on the device
        self.key = key  # what the weights are (a slot's tag, or a layer's residents): the buffer's memory of them
        self.shape = q.shape
        self.dtype = store.compute_dtype
        n = q.shape[0]
        room = store.scratch[which].shape[0] if store.scratch is not None else n  # (no buffer: one of its own)
        self.group = min(n, room)  # experts per take
        self.at = at if at + n <= room else 0  # where in the working buffer a set that fits whole starts

    def __len__(self) -> int:
        return self.shape[0]

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def data_ptr(self) -> int:
        return self.q.data_ptr()

    def holds(self, lo: int, hi: int) -> bool:
        """Whether the working buffer holds experts [lo, hi) already (no dequantization on the next `take`)."""
        return self.store._held(self.which, self.key, lo, hi) is not None

    def take(self, lo: int, hi: int) -> torch.Tensor:
        """Experts [lo, hi) in `dtype`, [hi - lo, out, in]: a view of the working buffer, dequantized if need be."""
        if not 0 <= lo < hi <= self.shape[0] or hi - lo > self.group:
            raise ValueError(f"streaming: experts [{lo}, {hi}) of {self.shape[0]}, in groups of {self.group}")
        return self.store._dequantize(self, lo, hi)


Weight = torch.Tensor | GroupedWeight  # what the GEMMs take: a tensor [G, out, in], or FP8 experts by groups


class ExpertStore:
    """Host store + two device slots + resident experts for every streamed layer of a model."""

    def __init__(
        self,
        device: torch.device,
        capacity: int,
        *,
        quantize: str | None = None,
        dequant_bytes: int = DEQUANT_BYTES,
    ):
        if quantize not in (None, "int8"):
            raise ValueError(f"streaming: quantize must be None or 'int8', got {quantize!r}")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.capacity = capacity
        self.quantize = quantize
        self.dequant_bytes = dequant_bytes  # FP8: bytes of the bf16 working buffer (whole experts, at least one)
        self.group = 0  # FP8: experts the working buffer holds (min(capacity, planner.dequant_group))
        self.layers: list[_Layer] = []
        self.slots: list[_Slot] = []
        self.fp8 = False  # the layers' experts are FP8 (set by the first add_layer)
        self.block = DEFAULT_BLOCK  # their quantization block
        self.compute_dtype: torch.dtype | None = None  # the dtype of the weights the expert GEMMs take
        # int8: dequantized w13, w2 [C, ...]; FP8: the working buffer, w13, w2 [group, ...]
        self.scratch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.scratch_tag = None  # int8: the slot tag whose experts scratch[:n] holds
        self._ranges: tuple[list, list] = ([], [])  # FP8, per buffer: (key, lo, hi, at) of the ranges it holds
        self.staging: torch.Tensor | None = None  # device bytes the tiles of a group of experts land in (CUDA)
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

    def add_layer(
        self,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        *,
        scales: tuple[torch.Tensor, torch.Tensor] | None = None,
        block: tuple[int, int] = DEFAULT_BLOCK,
    ) -> int:
        """Registers one layer's host weights ([E, 2I, H], [E, H, I]); returns its index.

        FP8 weights (float8_e4m3fn) come with their fp32 block scales (`scales`: gate_up's, down's, shapes as
        kt_core.loading.fp8.expert_scale_shapes) and `block`; every layer of a store has the first one's format.
        """
        fp8 = gate_up.dtype == FP8
        if fp8 and (scales is None or down.dtype != FP8):
            raise ValueError("streaming: FP8 expert weights need both gate_up and down as FP8, with their block scales")
        if fp8 and self.quantize is not None:
            raise ValueError(
                f"streaming: quantize={self.quantize!r} re-quantizes bf16 / fp32 experts; FP8 experts already stream "
                "as FP8 (1 byte a weight plus block scales), leave quantize unset"
            )
        if self.layers and (fp8 != self.fp8 or (fp8 and tuple(block) != self.block)):
            raise ValueError("streaming: every streamed layer must store its experts in the same format")
        layer = _Layer(gate_up, down, scales=tuple(scales) if fp8 else None)
        if not self.layers:
            self.fp8, self.block = fp8, tuple(block) if fp8 else DEFAULT_BLOCK
            self.compute_dtype = FP8_WORKING_DTYPE if fp8 else gate_up.dtype
        if self.quantize == "int8":
            q13, s13 = quantize_rows(gate_up)
            q2, s2 = quantize_rows(down)
            layer.q = (q13, q2, s13, s2)  # the order of a slot's buffers
        for t in layer.streamed:
            self.pin(t)
        self.layers.append(layer)
        if not self.slots and self.capacity:
            self._make_slots(layer)
        return len(self.layers) - 1

    def pin(self, t: torch.Tensor) -> None:
        """Page-locks a host tensor in place (once); after the first refusal, stops trying."""
        if self.cuda and self.pin_ok and not t.is_meta and not t.is_pinned():
            registered = pin_in_place(t)
            self.pin_ok = registered is not False
            if registered:
                self.pinned.append(t)

    def _make_slots(self, lw: _Layer) -> None:
        C = self.capacity
        for _ in range(2):
            bufs = tuple(torch.empty((C, *t.shape[1:]), dtype=t.dtype, device=self.device) for t in lw.streamed)
            self.slots.append(_Slot(bufs))
        if lw.q is not None or lw.scales is not None:
            n = C
            if lw.scales is not None:  # FP8: no buffer where the GEMMs multiply from e4m3 (dequant_bytes 0)
                n = self.group = min(C, dequant_group(lw.down.shape[1], lw.down.shape[2], self.dequant_bytes))
            if n:
                self.scratch = tuple(
                    torch.empty((n, *t.shape[1:]), dtype=self.compute_dtype, device=self.device)
                    for t in (lw.gate_up, lw.down)
                )

    def set_resident(self, layer: int, experts: list[int]) -> None:
        """Keeps these experts of `layer` on the device (exact copies of the host weights, as stored)."""
        lw = self.layers[layer]
        lw.resident = sorted(experts)
        self._forget(lambda key: key[:2] == ("res", layer))
        if not experts:
            lw.res = lw.res_ids = None
            return
        idx = torch.tensor(lw.resident)
        lw.res = tuple(self._host_experts(lw, w, idx) for w in range(len(lw.stored)))
        lw.res_ids = idx.to(self.device)  # made here, between steps: a list -> device tensor waits for the device

    def _host_experts(self, lw: _Layer, which: int, idx: torch.Tensor) -> torch.Tensor:
        """Experts `idx` of the layer's stored tensor `which` on the device, as stored (from its tiles if any)."""
        t = lw.stored[which]
        if lw.tiles is None or which > 1:
            return _raw(t)[idx].to(self.device).view(t.dtype)
        out = torch.empty((len(idx), *t.shape[1:]), dtype=t.dtype, device=self.device)
        return untile_(out, lw.tiles[which][idx].to(self.device), interleaved=which == 0)

    def stream_from_tiles(self, layer: int, tiles: tuple[torch.Tensor, torch.Tensor], owner: object) -> None:
        """From now on `layer`'s experts stream from `tiles` (kt_core.streaming.tiles.tiles_of: the packed CPU
        operator's copy, kept alive by `owner`); the store lets go of the layer's weights (the caller frees them)."""
        lw = self.layers[layer]
        if self.quantize is not None:
            raise ValueError(f"streaming: quantize={self.quantize!r} streams int8 copies; the tiles are the weights")
        if self.cuda:
            torch.cuda.synchronize(self.device)  # no copy may still read the weights
        for name in ("gate_up", "down"):
            w = getattr(lw, name)
            if any(p is w for p in self.pinned):
                unpin(w)
                self.pinned[:] = [p for p in self.pinned if p is not w]
            setattr(lw, name, torch.empty(w.shape, dtype=w.dtype, device="meta"))
        lw.tiles, lw.tiles_owner = tiles, owner
        for t in tiles:
            self.pin(t)

    def resident_bytes(self, layer: int = 0) -> int:
        """Device bytes one resident expert takes (the weights as stored on the host, FP8 block scales included)."""
        return _per_expert_bytes(self.layers[layer].stored)

    def expert_bytes(self, layer: int = 0) -> int:
        """Bytes one expert moves over PCIe (as streamed: int8 or FP8 weights with their scales)."""
        return _per_expert_bytes(self.layers[layer].streamed)

    def resident_weights(self, layer: int) -> tuple[Weight, Weight]:
        """The residents of `layer` as the GEMMs take them: w13 [R, 2I, H], w2 [R, H, I] in `compute_dtype`.

        FP8 residents come as GroupedWeights over their e4m3 bytes on the device: taken after the experts the
        layer's slot holds (`acquire` first) when both fit the working buffer, else from its start.
        """
        lw = self.layers[layer]
        if not self.fp8:
            return lw.res[0], lw.res[1]
        held = self._slot_of(layer)
        at = len(held.tag[1]) if held is not None else 0
        key = ("res", layer, tuple(lw.resident))
        q13, q2, s13, s2 = lw.res
        return self._grouped(q13, s13, q2, s2, key, at)

    def _grouped(self, q13, s13, q2, s2, key: tuple, at: int) -> tuple[GroupedWeight, GroupedWeight]:
        return GroupedWeight(self, 0, q13, s13, key, at), GroupedWeight(self, 1, q2, s2, key, at)

    def _held(self, which: int, key: tuple, lo: int, hi: int) -> tuple | None:
        return next((r for r in self._ranges[which] if r[:3] == (key, lo, hi)), None)

    def _forget(self, stale) -> None:
        """Drops the working buffer's memory of the weights whose key `stale(key)` names."""
        for ranges in self._ranges:
            ranges[:] = [r for r in ranges if not stale(r[0])]

    def _dequantize(self, w: GroupedWeight, lo: int, hi: int) -> torch.Tensor:
        """Experts [lo, hi) of `w` in the working buffer (on the compute stream, right before the GEMMs reading it)."""
        q, s = w.q[lo:hi], w.scale[lo:hi]
        if self.scratch is None:  # no working buffer (the GEMMs multiply from e4m3, or residents without slots)
            out = torch.empty(q.shape, dtype=self.compute_dtype, device=self.device)
            return _dequantize_into(out, q, s, w.which, self.block)
        held = self._held(w.which, w.key, lo, hi)
        if held is not None:
            return self.scratch[w.which][held[3] : held[3] + hi - lo]
        a, b = w.at, w.at + hi - lo
        ranges = self._ranges[w.which]
        ranges[:] = [r for r in ranges if r[3] + r[2] - r[1] <= a or r[3] >= b]  # what it overwrites
        ranges.append((w.key, lo, hi, a))
        return _dequantize_into(self.scratch[w.which][a:b], q, s, w.which, self.block)

    # ---- streaming -------------------------------------------------------------------------------

    def holds(self, layer: int) -> tuple[int, ...] | None:
        slot = self._slot_of(layer)
        return slot.tag[1] if slot is not None else None

    def invalidate(self, layer: int) -> None:
        for slot in self.slots:
            if slot.tag is not None and slot.tag[0] == layer:
                slot.tag = None
        if self.scratch_tag is not None and self.scratch_tag[0] == layer:
            self.scratch_tag = None
        self._forget(lambda key: key[0] == "slot" and key[1][0] == layer)

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
        srcs = lw.streamed
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
        runs = _runs([(j, e) for j, e in enumerate(content) if e not in resident])
        tiles = self.layers[slot.tag[0]].tiles
        for which, (dst, src) in enumerate(zip(slot.bufs, srcs, strict=True)):
            for j, e, n in runs:
                if tiles is not None and which < 2:
                    self._untile(dst[j : j + n], tiles[which][e : e + n], interleaved=which == 0)
                else:
                    dst[j : j + n].copy_(src[e : e + n], non_blocking=True)
        if resident and self.quantize is None:  # as stored: bf16 / fp32 weights, or FP8 bytes and scales
            self._fill_residents(slot.tag[0], slot.bufs)

    def _untile(self, dst: torch.Tensor, tiles: torch.Tensor, *, interleaved: bool) -> None:
        """Host tiles [G, bytes] -> dst [G, out, in] on the device: through the staging buffer a group at a time (on
        the current stream, which orders each group's copy after the previous group's untiling)."""
        if not self.cuda:
            untile_(dst, tiles, interleaved=interleaved)
            return
        per = tiles.shape[1]
        if self.staging is None or self.staging.numel() < per:
            self.staging = torch.empty(stage_bytes(per, self.capacity), dtype=torch.uint8, device=self.device)
        group = self.staging.numel() // per
        for a in range(0, dst.shape[0], group):
            b = min(dst.shape[0], a + group)
            buf = self.staging[: (b - a) * per].view(b - a, per)
            buf.copy_(tiles[a:b], non_blocking=True)
            untile_(dst[a:b], buf, interleaved=interleaved)

    def _fill_residents(self, layer: int, dst: tuple[torch.Tensor, ...]) -> None:
        """Device copies of `layer`'s residents into a whole-layer weight set (positions = expert ids)."""
        lw = self.layers[layer]
        for d, r in zip(dst, lw.res, strict=True):  # int8: into the dequantized pair, from the bf16 residents
            _raw(d).index_copy_(0, lw.res_ids, _raw(r))

    def acquire(self, layer: int) -> tuple[list[int], Weight | None, Weight | None]:
        """The streamed experts of `layer` present in a slot, and their weights [G, 2I, H], [G, H, I].

        Queues nothing on the device: `ready(layer)` makes the compute stream wait for the copy (and fills the int8
        dequantized pair) right before the GPU work, so a host split's wait for its routing never lasts until the
        copy is done. Call `release(layer)` after the last kernel that reads them has been queued. FP8 weights come
        as GroupedWeights (dequantized a group at a time when the GEMMs take them; the residents of a whole-layer
        slot were copied in as FP8).
        """
        slot = self._slot_of(layer)
        if slot is None:
            return [], None, None
        experts = list(slot.tag[1])
        n = len(experts)
        self._clock += 1
        slot.used = self._clock
        if self.fp8:  # with or without a working buffer
            q13, q2, s13, s2 = slot.bufs
            return experts, *self._grouped(q13[:n], s13[:n], q2[:n], s2[:n], ("slot", slot.tag), 0)
        if self.scratch is None:
            return experts, slot.bufs[0][:n], slot.bufs[1][:n]
        return experts, self.scratch[0][:n], self.scratch[1][:n]  # int8: filled by ready()

    def ready(self, layer: int) -> None:
        """Makes the compute stream wait for `layer`'s slot copy; int8 slots are dequantized there, once per load."""
        slot = self._slot_of(layer)
        if slot is None:
            return
        if self.cuda and slot.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        if self.scratch is None or self.fp8 or self.scratch_tag == slot.tag:
            return
        n = len(slot.tag[1])
        q13, q2, s13, s2 = slot.bufs  # int8: dequantize on the compute stream, fp32 scales per row
        torch.mul(q13[:n], s13[:n, :, None], out=self.scratch[0][:n])
        torch.mul(q2[:n], s2[:n, :, None], out=self.scratch[1][:n])
        if set(self.layers[layer].resident) & set(slot.tag[1]):  # a whole layer: the residents' exact weights
            self._fill_residents(layer, self.scratch)
        self.scratch_tag = slot.tag

    def _slot_of(self, layer: int) -> _Slot | None:
        return next((s for s in self.slots if s.tag is not None and s.tag[0] == layer), None)

    def release(self, layer: int) -> None:
        slot = self._slot_of(layer)  # one at most: `load` never copies a layer a slot holds
        if self.cuda and slot is not None:
            slot.free = torch.cuda.Event()
            slot.free.record(torch.cuda.current_stream(self.device))

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
        """Device bytes held: slots, the int8 scratch or the FP8 working buffer, the tiles' staging, residents."""
        ts = [b for s in self.slots for b in s.bufs] + list(self.scratch or ())
        ts += [self.staging] if self.staging is not None else []
        ts += [t for lw in self.layers for t in lw.res or ()]
        return sum(t.numel() * t.element_size() for t in ts)

    def close(self) -> None:
        """Unregisters pinned host memory and frees device buffers."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._finalizer()  # unregisters once
        self.pinned.clear()
        self.slots.clear()
        self.scratch = self.scratch_tag = self.staging = None
        self._forget(lambda key: True)
        for lw in self.layers:
            lw.res = None


def _dequantize_into(out: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, which: int, block) -> torch.Tensor:
    """out = q x its block scales, rounded once to out's dtype (kt_core.loading.fp8.dequantize_experts_fp8_, one of
    its two weights): gate_up's scales are gate's block rows, then up's."""
    out.copy_(q)  # e4m3 -> bf16 is exact
    if which == 0:
        I, half = q.shape[1] // 2, scale.shape[1] // 2
        scale_blocks_(out[:, :I], scale[:, :half], block)
        scale_blocks_(out[:, I:], scale[:, half:], block)
    else:
        scale_blocks_(out, scale, block)
    return out

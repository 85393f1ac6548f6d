"""The frozen expert weights of a node's ranks in one file in host memory, written once and mapped by every rank.

With several ranks on a node (torchrun), every rank would otherwise read the checkpoint's experts into its own host
memory: N copies of by far the largest part of the model. Instead local rank 0 reads them into a file under
/dev/shm (tmpfs: host memory, no disk), written under a temporary name and renamed when complete; the other local
ranks wait for that name, map the same file (`torch.from_file(..., shared=True)`) and read nothing from the
checkpoint. Host memory holds one copy, whatever the number of ranks.

The file is named by the checkpoint (path, config.json's modification time), the expert dtype and the run
(torchrun's rendezvous id, master address and port, restart count), so that two runs never share one by mistake;
a file older than the waiting process is a leftover and is not taken. Removal: when torch.distributed is
initialized while loading, every rank maps the file, a barrier passes and local rank 0 removes the name at once
(the mappings keep the pages until the last rank exits); otherwise local rank 0 removes it when it exits.

Layout: per layer (sorted by name) its weights sorted by name, each starting on a page (4096 bytes): down_proj
[E, H, I] then gate_up_proj [E, 2I, H]; FP8 stores (float8_e4m3fn, `load_model(..., expert_dtype="fp8")`) hold
their fp32 block scales there too: down_proj, down_proj_scale_inv [E, ceil(H / b0), ceil(I / b1)], gate_up_proj,
gate_up_proj_scale_inv [E, 2 ceil(I / b0), ceil(H / b1)]. Every rank computes the layout from the same shapes and
dtypes (named in the file's key), so each finds a tensor at the offset local rank 0 wrote it at; `slots` records it.
Legend: E = experts, I = expert intermediate, H = hidden, (b0, b1) = the FP8 quantization block.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from kt_core.distributed.ranks import LocalRanks, local_ranks, rendezvous_id

__all__ = ["DEFAULT_FOLDER", "WAIT_S", "SharedExperts", "SharedExpertsError"]

logger = logging.getLogger(__name__)

DEFAULT_FOLDER = Path("/dev/shm")
_ALIGN = 4096
_POLL_S = 0.2
WAIT_S = 6 * 3600  # how long a rank waits for local rank 0's file (reading a DeepSeek-V3 takes well under an hour)

Shapes = Mapping[str, Mapping[str, tuple[tuple[int, ...], torch.dtype]]]  # layer -> {weight name: (shape, dtype)}


class SharedExpertsError(RuntimeError):
    """The node's shared expert file cannot be written or found; the message names the file and the setting."""


@dataclass(frozen=True)
class _Slot:
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


def _layout(shapes: Shapes) -> tuple[dict[str, dict[str, _Slot]], int]:
    slots: dict[str, dict[str, _Slot]] = {}
    offset = 0
    # Sorted: every rank must find a layer at the same offset, whatever order its own load visits them in.
    for layer, weights in sorted(shapes.items()):
        slots[layer] = {}
        for name, (shape, dtype) in sorted(weights.items()):
            slot = _Slot(offset, tuple(shape), dtype)
            slots[layer][name] = slot
            offset += -(-slot.nbytes // _ALIGN) * _ALIGN
    return slots, max(offset, _ALIGN)


def _process_start() -> float:
    """This process's start time (seconds since the epoch), from /proc; now where /proc cannot tell."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def _barrier() -> bool:
    """A barrier over the job's ranks when torch.distributed is initialized; False (nothing done) otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.barrier()
    return True


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class SharedExperts:
    """One file holding the frozen expert weights of every CPU-experts layer, mapped by each rank of the node.

    Use `SharedExperts.open(...)` (None when this node runs one rank), write into `tensors(layer)` when `writer`,
    then `publish()` once every layer is written (every rank calls it).

    Args:
        folder: where the file lives; host memory (tmpfs) keeps it off the disk.
        key: what names this run's file (checkpoint and dtype; the rendezvous is added).
        shapes: {layer: {"gate_up_proj": ([E, 2I, H], dtype), "down_proj": ([E, H, I], dtype)}}; FP8 layers add
            "gate_up_proj_scale_inv" and "down_proj_scale_inv" (their shapes, torch.float32).
        ranks: this process among its node's ranks.
    """

    def __init__(self, folder: str | os.PathLike, key: str, shapes: Shapes, ranks: LocalRanks):
        self.folder = Path(folder)
        self.ranks = ranks
        self.slots, self.nbytes = _layout(shapes)
        digest = hashlib.sha256(f"{key}|{rendezvous_id()}".encode()).hexdigest()[:20]
        self.path = self.folder / f"kt-experts-{os.getuid()}-{digest}.bin"
        self._tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        self._buffer: torch.Tensor | None = None
        self._published = False

    @classmethod
    def open(cls, folder, key: str, shapes: Shapes, ranks: LocalRanks | None = None) -> SharedExperts | None:
        """The node's shared file, created (local rank 0) or waited for and mapped (the others); None with one
        rank per node or nothing to share."""
        ranks = ranks or local_ranks()
        if not ranks.shared or not shapes:
            return None
        shared = cls(folder, key, shapes, ranks)
        if shared.writer:
            shared._create()
        else:
            shared._attach()
        return shared

    @property
    def writer(self) -> bool:
        """True on local rank 0, which reads the checkpoint's experts into the file."""
        return self.ranks.is_leader

    def __contains__(self, layer: str) -> bool:
        return layer in self.slots

    def tensors(self, layer: str) -> dict[str, torch.Tensor]:
        """{weight name: tensor viewing the file} of one layer."""
        assert self._buffer is not None
        out = {}
        for name, slot in self.slots[layer].items():
            raw = self._buffer[slot.offset : slot.offset + slot.nbytes]
            out[name] = raw.view(slot.dtype).view(slot.shape)
        return out

    def publish(self) -> None:
        """Writer: the complete file takes its name. Every rank: with torch.distributed up, a barrier after which
        the name is removed (the mappings stay); without it, local rank 0 removes the name when it exits."""
        if self.writer:
            os.replace(self._tmp, self.path)
            logger.info(
                "expert weights of this node's %d ranks in one shared file: %s (%.2f GiB)",
                self.ranks.size,
                self.path,
                self.nbytes / 2**30,
            )
        self._published = True
        if _barrier() and self.writer:
            _remove(self.path)

    # ---- local rank 0 -----------------------------------------------------------------------------------------

    def _create(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        free = self._free_bytes()
        if free is not None and free < self.nbytes:
            raise SharedExpertsError(
                f"load_model(shared_experts): {self.folder} has {free / 2**30:.2f} GiB free, the experts need "
                f"{self.nbytes / 2**30:.2f} GiB. Enlarge it (e.g. `mount -o remount,size=<size> /dev/shm`), give a "
                "folder in host memory with room (shared_experts='/path'), or shared_experts=False for one private "
                "copy per rank."
            )
        atexit.register(_remove, self._tmp)
        atexit.register(_remove, self.path)
        with open(self._tmp, "wb") as f:
            f.truncate(self.nbytes)
        self._buffer = torch.from_file(str(self._tmp), shared=True, size=self.nbytes, dtype=torch.uint8)

    def _free_bytes(self) -> int | None:
        try:
            stats = os.statvfs(self.folder)
        except OSError:
            return None
        return stats.f_bavail * stats.f_frsize

    # ---- the other local ranks --------------------------------------------------------------------------------

    def _attach(self) -> None:
        started = _process_start()
        deadline = time.monotonic() + WAIT_S
        while not self._ready(started):
            if time.monotonic() > deadline:
                raise SharedExpertsError(
                    f"local rank {self.ranks.rank}: local rank 0 did not write the node's expert file {self.path} "
                    f"within {WAIT_S:.0f} s (did it fail? its log says why)"
                )
            time.sleep(_POLL_S)
        self._buffer = torch.from_file(str(self.path), shared=True, size=self.nbytes, dtype=torch.uint8)

    def _ready(self, started: float) -> bool:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return False
        return stat.st_size == self.nbytes and stat.st_mtime >= started - 1.0

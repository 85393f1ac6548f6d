"""`--kt-experts-record-routing FILE`: how often each routed expert is chosen, per layer, while the server serves.

    python -m sglang.launch_server ... --kt-experts --kt-experts-record-routing routing.json   # serve traffic
    python -m sglang.launch_server ... --kt-experts --kt-experts-gpu-experts 16 \\
        --kt-experts-gpu-expert-ids routing.json    # the 16 most routed experts of each layer stay on the GPU

The counts accumulate on the device inside each layer's call (an index-add of fixed shape: CUDA graphs capture
it and replay it), and a thread writes them every `interval_s` seconds and at exit, as
{"counts": {"layer": [routed slots per expert]}} (a temp name, then renamed: a reader never sees half a file).
Only tensor-parallel rank 0 records (every rank routes the same).

Legend: T = tokens, K = experts per token, E = experts of the layer.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

import torch

__all__ = ["RoutingRecorder", "routing_recorder"]

logger = logging.getLogger(__name__)

_RECORDERS: dict[str, RoutingRecorder] = {}


class RoutingRecorder:
    """Per-layer routing counts of one process, written to `path`.

    Args:
        path: the JSON file to (re)write.
        interval_s: seconds between writes (0: only at exit and on `write()`).
    """

    def __init__(self, path: str | Path, interval_s: float = 30.0):
        self.path = Path(path)
        self._counts: dict[int, torch.Tensor] = {}  # layer -> [E + 1] int64; the last bucket takes skipped slots
        self._lock = threading.Lock()
        self._stop = threading.Event()
        atexit.register(self.write)
        if interval_s > 0:
            threading.Thread(target=self._write_every, args=(interval_s,), daemon=True, name="kt-routing").start()

    def counter(self, layer: int, num_experts: int, device: torch.device | str) -> torch.Tensor:
        """The layer's count tensor [E + 1], made now (before any CUDA graph capture) on `device`."""
        with self._lock:
            if layer not in self._counts:
                self._counts[layer] = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
            return self._counts[layer]

    @staticmethod
    def record(counter: torch.Tensor, ids: torch.Tensor) -> None:
        """Adds one to the count of each routed slot of ids [T, K] (-1 slots go to the last bucket)."""
        flat = ids.reshape(-1).long().to(counter.device)
        flat = torch.where(flat >= 0, flat, counter.numel() - 1)
        counter.index_add_(0, flat, torch.ones_like(flat))

    def snapshot(self) -> dict[str, list[int]]:
        """{layer: [count per expert]} as it stands (the device counts copied to the host)."""
        with self._lock:
            counts = dict(self._counts)
        return {str(layer): c[:-1].tolist() for layer, c in sorted(counts.items())}

    def write(self) -> None:
        """Writes the counts to `path` (temp file in the same folder, then renamed)."""
        data = {"counts": self.snapshot()}
        if not data["counts"]:
            return
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _write_every(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.write()
            except Exception as exc:  # a full disk must not stop the server
                logger.warning("--kt-experts-record-routing %s: could not write the counts: %s", self.path, exc)


def routing_recorder(path: str) -> RoutingRecorder:
    """The process's recorder for `path` (one per file, shared by the layers)."""
    if path not in _RECORDERS:
        _RECORDERS[path] = RoutingRecorder(path)
    return _RECORDERS[path]

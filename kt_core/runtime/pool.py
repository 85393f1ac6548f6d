"""The process-wide CPU thread pool shared by every experts layer.

One pool per process: layers run one after another, so sharing it keeps `cpu_infer` threads, not
`cpu_infer` per layer. The pool counts the calling thread: `cpu_infer=16` runs 15 workers plus the caller.
"""

from __future__ import annotations

import os
import threading

__all__ = ["default_cpu_infer", "get_thread_pool"]

_lock = threading.Lock()
_pool = None


def default_cpu_infer() -> int:
    """KT_CPU_INFER if set, else the CPUs this process may use."""
    env = os.environ.get("KT_CPU_INFER")
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"KT_CPU_INFER must be a positive integer, got {env!r}") from None
        if value < 1:
            raise ValueError(f"KT_CPU_INFER must be a positive integer, got {env!r}")
        return value
    return len(os.sched_getaffinity(0))


def get_thread_pool(cpu_infer: int | None = None):
    """Returns the shared pool, (re)built when `cpu_infer` asks for a different size.

    Args:
        cpu_infer: threads, the caller included; None keeps the current pool (or the default size).
    """
    from kt_core import _C

    global _pool
    with _lock:
        if cpu_infer is not None and cpu_infer < 1:
            raise ValueError(f"cpu_infer must be >= 1, got {cpu_infer}")
        if _pool is None or (cpu_infer is not None and _pool.num_threads != cpu_infer):
            _pool = _C.ThreadPool(cpu_infer or default_cpu_infer())
        return _pool

"""The process-wide CPU thread pool shared by every experts layer.

One pool per process: layers run one after another, so sharing it keeps `cpu_infer` threads, not
`cpu_infer` per layer. The pool counts the calling thread: `cpu_infer=16` runs 15 workers plus the caller.
Sizes are checked by kt_core.settings: a positive integer; more than the CPUs this process may use warns
(where the setting enters), more than CPU_INFER_CAP_FACTOR times them runs one thread per CPU.
With several ranks on the node (torchrun), each rank first takes its share of the node's CPUs
(kt_core.distributed.cpus): the default size is then that share, and the ranks' workers never share a core.
"""

from __future__ import annotations

import threading

from kt_core.config import CPU_INFER_ENV, current
from kt_core.distributed.cpus import claim_cpu_share
from kt_core.settings import CPU_INFER_CAP_FACTOR, positive_int, usable_cpus

__all__ = ["CPU_INFER_ENV", "current_threads", "default_cpu_infer", "get_thread_pool"]

_lock = threading.Lock()
_pool = None


def default_cpu_infer() -> int:
    """The config's cpu_infer (KT_CPU_INFER or configure(cpu_infer=...)) if set, else the CPUs this process may use
    (with several ranks on the node: this rank's share of them, at least one)."""
    claim_cpu_share()
    return current().cpu_infer or usable_cpus()


def get_thread_pool(cpu_infer: int | None = None):
    """Returns the shared pool, (re)built when `cpu_infer` asks for a different size.

    Args:
        cpu_infer: threads, the caller included; None keeps the current pool (or the default size).
    """
    from kt_core import _C

    global _pool
    claim_cpu_share()  # before the pool pins its workers, and before sizes are checked (once per process)
    with _lock:
        if cpu_infer is not None:
            cpu_infer = _capped(positive_int("cpu_infer", cpu_infer, what="CPU threads of the experts operator"))
        if _pool is None or (cpu_infer is not None and _pool.num_threads != cpu_infer):
            _pool = _C.ThreadPool(cpu_infer or default_cpu_infer())
        return _pool


def current_threads() -> int | None:
    """Threads of the shared pool, or None before the first experts call built it."""
    return _pool.num_threads if _pool is not None else None


def _capped(threads: int) -> int:
    # The entry points warn about oversubscription under the user's key; a value that reaches the pool
    # directly (KTExperts(cpu_infer=...)) is still held to one thread per CPU past the cap.
    cpus = usable_cpus()
    return cpus if threads > CPU_INFER_CAP_FACTOR * cpus else threads

"""Each rank's share of the node's CPUs for its experts thread pool.

The experts' pool pins its workers to the last CPUs of the process (kt_core/runtime/pool.py): ranks that all see
the whole node would pin theirs to the same cores. So, with several ranks on the node and a launcher that did not
bind them (each rank's CPUs equal the launcher's), each rank narrows itself to a contiguous slice of them, rank r
of n taking the r-th of n equal parts (at least one CPU); the pool's default size (`cpu_infer`) then is that
share. A launcher that binds its workers itself (`torchrun --numa-binding`, numactl, taskset per rank) keeps its
binding and the pool divides nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading

from kt_core.distributed.ranks import LocalRanks, local_ranks

__all__ = ["claim_cpu_share", "cpu_share"]

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_claimed = False


def cpu_share(cpus: list[int], ranks: LocalRanks) -> list[int]:
    """Rank r of n: the r-th of n contiguous, near-equal slices of `cpus` (one CPU at least)."""
    cpus = sorted(cpus)
    if len(cpus) < ranks.size:
        return [cpus[ranks.rank % len(cpus)]]
    start, end = ranks.rank * len(cpus) // ranks.size, (ranks.rank + 1) * len(cpus) // ranks.size
    return cpus[start:end]


def _launcher_cpus() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(os.getppid()))
    except (AttributeError, OSError):
        return None


def _bind(cpus: list[int]) -> None:
    """Every thread of this process, and the ones it starts later, on `cpus`."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), cpus)
    os.sched_setaffinity(0, cpus)


def claim_cpu_share(ranks: LocalRanks | None = None) -> list[int] | None:
    """Once per process, before the experts pool is built: this rank's CPUs when it shares the node with others.

    Returns:
        The CPUs this rank now runs on, or None when nothing changed (one rank per node, a launcher's binding,
        no affinity interface, or a second call).
    """
    global _claimed
    with _lock:
        if _claimed:
            return None
        _claimed = True
        ranks = ranks or local_ranks()
        if not ranks.shared or not hasattr(os, "sched_getaffinity"):
            return None
        mine = os.sched_getaffinity(0)
        launcher = _launcher_cpus()
        if launcher is not None and launcher != mine:
            logger.info(
                "local rank %d of %d: the launcher bound this rank to %d CPUs; the experts pool uses them as they are",
                ranks.rank,
                ranks.size,
                len(mine),
            )
            return None
        share = cpu_share(list(mine), ranks)
        _bind(share)
        logger.info(
            "local rank %d of %d on this node: the CPU experts run on CPUs %s (%d of the node's %d; cpu_infer "
            "defaults to %d)",
            ranks.rank,
            ranks.size,
            _ranges(share),
            len(share),
            len(mine),
            len(share),
        )
        return share


def _ranges(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    parts, start = [], None
    for i, c in enumerate(cpus):
        if start is None:
            start = c
        if i + 1 == len(cpus) or cpus[i + 1] != c + 1:
            parts.append(f"{start}-{c}" if c != start else f"{c}")
            start = None
    return ",".join(parts)

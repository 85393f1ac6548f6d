"""This process's place among the ranks of its node, as the launchers describe it.

torchrun (and `accelerate launch`, and LLaMA-Factory under FORCE_TORCHRUN=1, which both run torchrun) give every
worker LOCAL_RANK and LOCAL_WORLD_SIZE; a process started without them is the only rank of its node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["LocalRanks", "local_ranks", "rendezvous_id"]

_RUN_VARIABLES = ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")


@dataclass(frozen=True)
class LocalRanks:
    """rank: this process's rank on its node (0 = the node's leader); size: the job's processes on this node."""

    rank: int = 0
    size: int = 1

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def shared(self) -> bool:
        """True when several ranks of the job share this node (and so its host memory and CPUs)."""
        return self.size > 1


def _env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ValueError(f"{name}: got {raw!r}, expected an integer >= {minimum} (set by torchrun for each worker)")
    return value


def local_ranks() -> LocalRanks:
    """LOCAL_RANK / LOCAL_WORLD_SIZE from the launcher's environment; (0, 1) without them.

    Raises:
        ValueError: a variable that is not an integer, or LOCAL_RANK outside [0, LOCAL_WORLD_SIZE).
    """
    size = _env_int("LOCAL_WORLD_SIZE", 1, 1)
    rank = _env_int("LOCAL_RANK", 0, 0)
    if rank >= size:
        raise ValueError(f"LOCAL_RANK: got {rank}, expected an integer in [0, LOCAL_WORLD_SIZE={size})")
    return LocalRanks(rank=rank, size=size)


def rendezvous_id() -> str:
    """What tells this run from another on the same node: the rendezvous id, address, port and restart count
    torchrun gives its workers (one value for every rank of a run)."""
    return "|".join(f"{name}={os.environ.get(name, '')}" for name in _RUN_VARIABLES)

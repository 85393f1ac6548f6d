"""The split of one call's routed slots between the CPU operator and GPU weight sets.

Each slot (token, k) of `top_k_index` [T, K] goes to the first GPU weight set holding its expert, else to
the CPU. The CPU operator reads the ids with every GPU slot set to -1 (it skips them; `KTExperts.rows_of`
maps the rest to its host rows); each GPU part gets its slots sorted by expert, ready for grouped GEMMs.

Legend: T = tokens, K = experts per token, E = experts of the layer, S = slots of one GPU part,
G = experts of that part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["GpuPart", "split_slots"]


@dataclass
class GpuPart:
    """The slots of one GPU weight set (a streaming slot, the resident experts, ...)."""

    experts: list[int]  # [G] expert ids, in the order of the weights
    w13: torch.Tensor  # [G, 2I, H] device
    w2: torch.Tensor  # [G, H, I] device
    counts: list[int]  # [G] slots per expert
    tok: torch.Tensor  # [S] token of each slot (device)
    flat: torch.Tensor  # [S] index into the flattened [T*K] slots (device)


def split_slots(
    ids_host: torch.Tensor, weight_sets: list[tuple[list[int], torch.Tensor, torch.Tensor]], num_experts: int, device
) -> tuple[torch.Tensor, list[GpuPart]]:
    """CPU ids [T, K] (GPU slots set to -1) and the GPU parts of `weight_sets` [(experts, w13, w2), ...]."""
    K = ids_host.shape[1]
    cpu_ids = ids_host.clone()  # [T, K]; slots taken by a part become -1
    parts = []
    for experts, w13, w2 in weight_sets:
        if not experts:
            continue
        pos = torch.full((num_experts + 1,), -1, dtype=torch.int64)  # pos[-1] = pos[E]: id -1 stays -1
        pos[torch.tensor(experts)] = torch.arange(len(experts))
        local = pos[cpu_ids.view(-1)]  # [T*K] row in this set
        sel = (local >= 0).nonzero().squeeze(1)  # [S]
        if sel.numel() == 0:
            continue
        flat = sel[torch.argsort(local[sel], stable=True)]  # [S] sorted by expert
        counts = torch.bincount(local[flat], minlength=len(experts)).tolist()
        cpu_ids.view(-1)[flat] = -1
        parts.append(GpuPart(list(experts), w13, w2, counts, _upload(flat // K, device), _upload(flat, device)))
    return cpu_ids, parts


def _upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)

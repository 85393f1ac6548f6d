"""The frozen routed experts kept out of DistributedDataParallel, through DDP's own params-to-ignore hook.

DDP broadcasts every parameter from rank 0 when it wraps the model and books every parameter in its reducer;
the experts' base weights are frozen, identical on every rank, and (kt_core.distributed.shared_store) one
mapping shared by the node's ranks: DDP must neither send them nor write into them. Their LoRA factors stay
DDP's: ordinary parameters whose gradients it averages like any other.
"""

from __future__ import annotations

from torch import nn

__all__ = ["FROZEN_EXPERT_WEIGHTS", "ignore_frozen_experts"]

FROZEN_EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def ignore_frozen_experts(model: nn.Module) -> list[str]:
    """Adds the frozen weights of every KTExperts in `model` to the names DDP ignores when it wraps `model`.

    Call it on the module DDP will wrap (the outermost one: the PEFT model the Trainer gets); harmless without DDP.

    Returns:
        The names DDP ignores on `model` from now on (sorted).
    """
    from torch.nn.parallel import DistributedDataParallel

    from kt_core.experts import KTExperts

    names = {
        f"{name}.{weight}"
        for name, module in model.named_modules()
        if isinstance(module, KTExperts)
        for weight in FROZEN_EXPERT_WEIGHTS
    }
    names |= set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(names))
    return sorted(names)

"""What the multi-process CPU tests share: a free TCP port for torchrun's rendezvous, and accelerate's FSDP state on
the CPU.

accelerate (1.11) turns FSDP on for GPU-type runs only: on the CPU (gloo) an Accelerator given an FSDP plugin, from
the Trainer's `fsdp` arguments or from `accelerate launch`'s FSDP variables, runs DDP. `fsdp_on_the_cpu` gives a
CPU process the state a GPU run gets; everything after it (fully_shard with the plugin's ignored_modules, no_sync()
by set_requires_gradient_sync, FSDP2 clipping and saving) is accelerate's own. Call it in every rank before the
Accelerator is built.
"""

from __future__ import annotations

import socket

__all__ = ["cpu_map_location", "free_port", "fsdp_on_the_cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp_on_the_cpu() -> None:
    """Gives a CPU run the accelerator state a GPU run gets from an FSDP plugin (accelerate 1.11 sets
    DistributedType.FSDP and keeps the plugin only for GPU-type runs; everything after that is accelerate's own)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__
    if getattr(init, "_kt_fsdp_on_the_cpu", False):
        return

    def fsdp_init(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    fsdp_init._kt_fsdp_on_the_cpu = True
    AcceleratorState.__init__ = fsdp_init


def cpu_map_location() -> None:
    """Lets torch.load take accelerate's device of a multi-CPU rank as map_location.

    accelerate gives each rank of a multi-process CPU run the device cpu:LOCAL_RANK, and the Trainer, resuming on
    several ranks, loads optimizer.pt with map_location=args.device; torch restores storages to "cpu" only ("don't
    know how to restore data location ... cpu:0"). On GPUs the same call maps to cuda:LOCAL_RANK and needs nothing.
    """
    import torch

    load = torch.load
    if getattr(load, "_kt_cpu_map_location", False):
        return

    def cpu_load(*args, map_location=None, **kwargs):
        if isinstance(map_location, torch.device | str) and torch.device(map_location).type == "cpu":
            map_location = "cpu"
        return load(*args, map_location=map_location, **kwargs)

    cpu_load._kt_cpu_map_location = True
    torch.load = cpu_load

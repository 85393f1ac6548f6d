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

__all__ = ["free_port", "fsdp_on_the_cpu"]


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

"""What the multi-process CPU tests share: their launch (one process, or torchrun with N ranks on a free port), the
PEFT model they train, and accelerate's FSDP state on the CPU.

accelerate (1.11) turns FSDP on for GPU-type runs only: on the CPU (gloo) an Accelerator given an FSDP plugin, from
the Trainer's `fsdp` arguments or from `accelerate launch`'s FSDP variables, runs DDP. `fsdp_on_the_cpu` gives a
CPU process the state a GPU run gets; everything after it (fully_shard with the plugin's ignored_modules, no_sync()
by set_requires_gradient_sync, FSDP2 clipping and saving) is accelerate's own. Call it in every rank before the
Accelerator is built.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

__all__ = ["cpu_map_location", "free_port", "fsdp_on_the_cpu", "launch", "peft_model_with_expert_lora"]

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_VARIABLES = ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, args: list[str], *, ranks: int, env: dict | None = None, timeout: float = 600,
           torchrun: bool | None = None):  # fmt: skip
    """Runs `script args` as one process (ranks 1) or under `python -m torch.distributed.run` with `ranks` processes
    (`torchrun=True`: under torchrun with one rank too),
    with the repository first on PYTHONPATH, one OpenMP thread per process and no torchrun variables inherited;
    fails the test with the output's end when it fails. Returns the CompletedProcess."""
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    for name in TORCHRUN_VARIABLES:
        environ.pop(name, None)
    launcher = [sys.executable]
    if ranks > 1 if torchrun is None else torchrun:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port", str(free_port())]
    done = subprocess.run([*launcher, script, *map(str, args)], env=environ, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    return done


def peft_model_with_expert_lora(checkpoint: str, **load_kwargs):
    """kt_core.load_model(checkpoint) in training mode with PEFT LoRA (r 4) on attention and on the routed experts,
    randomized (tests.tiny_models.randomize_lora) so that every factor starts away from zero."""
    import peft

    import kt_core
    from tests.tiny_models import randomize_lora

    model = kt_core.load_model(checkpoint, device="cpu", progress=False, **load_kwargs).train()
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    return randomize_lora(peft.get_peft_model(model, config))


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


def run_rank(train, *args) -> None:
    """A rank's script body: `train(*args)`, then the process group destroyed, as torch asks, and the process ended
    without the interpreter's teardown. Now and then a rank aborted in that teardown ("terminate called without an
    active exception", a C++ thread's std::terminate) after its work and its files were done, with or without the
    group destroyed first; the cause is not found (README, "Several GPUs", Known). The tests judge what the ranks
    wrote, so they skip the teardown rather than fail on it."""
    import torch.distributed as dist

    train(*args)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

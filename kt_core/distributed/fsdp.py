"""The routed experts kept out of FSDP2's sharding; their LoRA gradients averaged by ExpertLoraAverager.

FSDP2 (`torch.distributed.fsdp.fully_shard`) turns every parameter of the modules it wraps into a DTensor sharded
over the ranks, moves it to the mesh's device, and reduce-scatters its gradient. The experts' tensors must be none
of that:
- the frozen base weights live once per node in host memory (kt_core.distributed.shared_store), read by the CPU
  operator from that mapping; sharding them would copy them to every GPU in pieces the operator cannot read;
- the expert LoRA factors are fp32 host tensors the CPU operator reads and writes whole.
So every parameter of every `KTExperts` goes to FSDP2's own `ignored_params` (not sharded, not moved, gradients not
reduced), and `ExpertLoraAverager` (kt_core.distributed.ddp) does for the factors what FSDP2 does for its
parameters: it broadcasts them from rank 0 at the first FSDP2 forward and averages their gradients (one flat gloo
all_reduce) once per optimizer step, on the backward where FSDP2 reduces (FSDP2's `set_requires_gradient_sync`,
which accelerate's `no_sync()` sets for every micro-batch of a gradient accumulation but the last), before the
Trainer clips.

Hook-up:
- accelerate (and the Trainer, `TrainingArguments(fsdp="full_shard", fsdp_config={"fsdp_version": 2})`): accelerate
  passes `fully_shard(..., ignored_params=<the parameters of FullyShardedDataParallelPlugin.ignored_modules>)` to
  every module it shards; `prepare_fsdp2` adds the experts modules to that list (KTCallback calls it when the
  Trainer's accelerator runs FSDP). Without the Trainer, call `prepare_fsdp2(model)` before
  `accelerator.prepare(model, optimizer)`.
- `fully_shard` by hand: pass `ignored_params=fsdp_ignored_params(model)` to every `fully_shard` call whose module
  holds experts (the root included), and call `kt_core.distributed.prepare_data_parallel(model)` (kt_prepare and the
  PEFT take-over do) on the module given to the outermost `fully_shard`.

What is refused, at run time, with the setting named: FSDP1 (`fsdp_version` 1, FullyShardedDataParallel),
FSDP2 `cpu_offload` (CPUOffloadPolicy: the experts are in host memory already, and FSDP2's offloaded optimizer step
is untested beside the host-resident factors), `cpu_ram_efficient_loading` (accelerate moves the whole model to the
meta device and reloads it from rank 0's state dict: the experts' host store would be dropped), experts that FSDP2
shards after all (a `fully_shard` without the ignored parameters), and an FSDP2 mesh smaller than the world (tensor
or pipeline parallel beside FSDP2: the factors are averaged over every rank).
"""

from __future__ import annotations

import functools
import logging
import re
import weakref
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn

from kt_core.distributed.ddp import EngineSync, ExpertLoraAverager, prepare_data_parallel
from kt_core.settings import SettingError

__all__ = [
    "accelerate_fsdp_plugin",
    "check_fsdp_plugin",
    "clip_with_host_gradients",
    "fsdp2_sync",
    "fsdp_ignored_params",
    "prepare_fsdp2",
]

logger = logging.getLogger(__name__)

# The models whose FSDP2 setup was checked at their first FSDP2 forward -> their FSDP2 parameter groups.
_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _experts_modules(model: nn.Module) -> list[nn.Module]:
    from kt_core.experts import KTExperts

    return [m for m in model.modules() if isinstance(m, KTExperts)]


def fsdp_ignored_params(model: nn.Module) -> set[nn.Parameter]:
    """Every parameter of every KTExperts in `model`: the frozen base weights (and FP8 scales) and the expert LoRA
    factors; pass it to `fully_shard(..., ignored_params=...)`."""
    return {p for m in _experts_modules(model) for p in m.parameters()}


# ---- accelerate / the Trainer ------------------------------------------------------------------------------------


def accelerate_fsdp_plugin():
    """accelerate's FullyShardedDataParallelPlugin when this process's accelerator runs FSDP, else None.

    accelerate (1.11) turns FSDP on for GPU-type runs only: on the CPU (`use_cpu`, gloo) an Accelerator given an
    FSDP plugin runs DDP, and this returns None.
    """
    import sys

    if "accelerate" not in sys.modules:  # nothing built an Accelerator in this process
        return None
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    state = AcceleratorState._shared_state  # read, not built: AcceleratorState() would initialize it
    if state.get("distributed_type") != DistributedType.FSDP:
        return None
    return state.get("fsdp_plugin")


def check_fsdp_plugin(plugin) -> None:
    """Refuses accelerate FSDP settings the experts cannot run under, naming the setting (module docstring)."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    version = getattr(plugin, "fsdp_version", 1)
    if version != 2:
        raise SettingError(
            f"FSDP fsdp_version: got {version!r}, expected 2. The routed experts (host memory) and their LoRA run "
            "under FSDP2 only: FSDP1 flattens the experts' weights into its sharded flat parameters. Set "
            'TrainingArguments(fsdp_config={"fsdp_version": 2}), or fsdp_version: 2 in the accelerate config '
            "(FSDP_VERSION=2)."
        )
    offload = getattr(plugin, "cpu_offload", None)
    if isinstance(offload, CPUOffloadPolicy) or offload is True:
        raise SettingError(
            "FSDP cpu_offload: got True, expected False. The routed experts and their LoRA factors are in host "
            "memory already and stay out of FSDP2; offloading the other parameters beside them is not supported. "
            "Leave 'offload' out of TrainingArguments(fsdp=...) and fsdp_offload_params false in the accelerate "
            "config (FSDP_OFFLOAD_PARAMS=false)."
        )
    if getattr(plugin, "cpu_ram_efficient_loading", False):
        raise SettingError(
            "FSDP cpu_ram_efficient_loading: got True, expected False. It moves the whole model to the meta device "
            "and reloads it from rank 0's state dict, which would drop the routed experts' host-memory store (the "
            "experts are read once per node already: kt_core.load_model's shared store). Set "
            'fsdp_config={"cpu_ram_efficient_loading": false} (FSDP_CPU_RAM_EFFICIENT_LOADING=false).'
        )


def _user_ignored_modules(plugin, model: nn.Module) -> list[nn.Module]:
    """The plugin's own ignored_modules as modules. A regex (accelerate's FSDP_IGNORED_MODULES) is resolved as
    accelerate does (names fully matched, the modules moved to the accelerator's device), since the list that
    replaces it is used as it is."""
    ignored = plugin.ignored_modules
    if ignored is None:
        return []
    if not isinstance(ignored, str):
        return list(ignored)
    from accelerate.state import AcceleratorState

    pattern, device = re.compile(ignored), AcceleratorState().device
    matched = [m for name, m in model.named_modules() if pattern.fullmatch(name)]
    for m in matched:
        m.to(device)  # KTExperts stay in host memory (KTExperts._apply)
    return matched


def prepare_fsdp2(model: nn.Module, plugin=None) -> ExpertLoraAverager | None:
    """Keeps the experts of `model` out of accelerate's FSDP2 sharding and prepares their LoRA's averaging.

    Checks the plugin's settings (check_fsdp_plugin), adds every KTExperts module to `plugin.ignored_modules` (whose
    parameters accelerate passes as `fully_shard(..., ignored_params=...)`), and makes the ExpertLoraAverager
    (`prepare_data_parallel`). Call it on the model given to `accelerator.prepare`, before that call (KTCallback
    does, at the end of Trainer.__init__). Idempotent.

    Args:
        plugin: accelerate's FullyShardedDataParallelPlugin; None: the one of this process's accelerator.

    Returns:
        The averager (None when `model` has no expert LoRA, or when no FSDP plugin is given or running).
    """
    plugin = plugin if plugin is not None else accelerate_fsdp_plugin()
    if plugin is None:
        return None
    check_fsdp_plugin(plugin)
    _clip_host_gradients_apart()
    experts = _experts_modules(model)
    if experts:
        modules = _user_ignored_modules(plugin, model)
        known = {id(m) for m in modules}
        plugin.ignored_modules = modules + [m for m in experts if id(m) not in known]
        logger.info("FSDP2 leaves the %d routed-experts modules unsharded (ignored_params)", len(experts))
    return prepare_data_parallel(model)


def _clip_host_gradients_apart() -> None:
    """Makes accelerate's FSDP2 gradient clipping take the expert-LoRA factors' host gradients (idempotent).

    Newer accelerate releases (1.16; 1.11 clips through torch.nn.utils.clip_grad_norm_, which needs nothing)
    clip under FSDP2 with `Accelerator._clip_grad_norm_dtensor_aware`: one norm per device mesh, stacked. The
    factors' gradients are plain host tensors beside FSDP2's DTensor gradients on the GPU, so their norm is a host
    tensor stacked with a GPU one, and the Trainer's first clipped step stops ("Expected all tensors to be on the
    same device"). `clip_with_host_gradients` wraps that method. transformers 5.17's Trainer clips mixed DTensor
    and plain gradients itself (`Trainer._mixed_mesh_grad_norm`) and stops at the host gradients' in-place
    scaling: `clip_mixed_mesh_on_each_device` wraps that one.
    """
    from accelerate import Accelerator
    from transformers import Trainer

    clip = getattr(Accelerator, "_clip_grad_norm_dtensor_aware", None)
    if clip is not None and not getattr(clip, "kt_host_gradients", False):
        Accelerator._clip_grad_norm_dtensor_aware = clip_with_host_gradients(clip)
    mixed = getattr(Trainer, "_mixed_mesh_grad_norm", None)
    if mixed is not None and not getattr(mixed, "kt_host_gradients", False):
        Trainer._mixed_mesh_grad_norm = clip_mixed_mesh_on_each_device(mixed)


def clip_mixed_mesh_on_each_device(norm):
    """`norm(self, model, max_norm)` (transformers >= 5.17's Trainer clipping when DTensor and plain gradients
    mix) with the clipping done on each gradient's own device: it counts the plain gradients once (the expert-LoRA
    factors' host gradients are averaged over the ranks, so that is right) but multiplies them in place by a GPU
    scalar, which host tensors refuse. `norm` gives the total (max_norm inf: nothing clipped), then each
    gradient is scaled by transformers' factor, moved to its device."""
    from torch.distributed.tensor import DTensor

    @functools.wraps(norm)
    def clipped(self, model, max_norm):
        total = norm(self, model, float("inf"))
        if max_norm != float("inf"):
            clip = (max_norm / (total + 1e-6)).clamp(max=1.0)
            for p in model.parameters():
                if p.grad is not None:
                    grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                    grad.mul_(clip.to(grad.device))
        return total

    clipped.kt_host_gradients = True
    return clipped


def clip_with_host_gradients(clip):
    """`clip(self, parameters, max_norm, norm_type=2, ...)` (accelerate's per-mesh clipping) with the
    plain host-tensor gradients taken apart: `clip` gives the norm of the others (max_norm inf: nothing clipped),
    the host gradients' norm joins it on its device, and every gradient is clipped by the total, group by group
    (host gradients; each mesh's DTensor gradients). Returns the total norm, as `clip` does. Without DTensor
    gradients, or with norm_type 0, `clip` runs as it is."""
    from torch.distributed.tensor import DTensor
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    @functools.wraps(clip)
    def clipped(self, parameters, max_norm, norm_type=2, *args, **kwargs):
        parameters = [p for p in parameters if p.grad is not None]
        host = [p for p in parameters if not isinstance(p.grad, DTensor) and p.grad.device.type == "cpu"]
        if not host or norm_type == 0 or not any(isinstance(p.grad, DTensor) for p in parameters):
            return clip(self, parameters, max_norm, norm_type, *args, **kwargs)
        on_host = {id(p) for p in host}
        rest = [p for p in parameters if id(p) not in on_host]
        theirs = clip(self, rest, float("inf"), norm_type, *args, **kwargs)
        ours = get_total_norm([p.grad for p in host], norm_type).to(theirs.device)
        total = torch.linalg.vector_norm(torch.stack([theirs, ours]), norm_type)
        if max_norm != float("inf"):
            groups = defaultdict(list)
            for p in rest:
                groups[getattr(p.grad, "device_mesh", None)].append(p)
            for group in [host, *groups.values()]:
                clip_grads_with_norm_(group, max_norm, total)
        return total

    clipped.kt_host_gradients = True
    return clipped


# ---- at each forward: read by ExpertLoraAverager -----------------------------------------------------------------


def _fsdp_modules(module: nn.Module) -> list[nn.Module]:
    """`module` when FSDP2 wraps it, else the FSDP2 modules inside it (outermost first); refuses FSDP1."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if isinstance(module, FSDPModule):
        return [module]
    found = []
    for m in module.modules():
        if isinstance(m, FullyShardedDataParallel):
            raise SettingError(
                "FSDP fsdp_version: got 1 (FullyShardedDataParallel inside the model), expected 2. The routed "
                "experts and their LoRA run under FSDP2 only (torch.distributed.fsdp.fully_shard with "
                "ignored_params=kt_core.distributed.fsdp_ignored_params(model); the Trainer: "
                'fsdp_config={"fsdp_version": 2}).'
            )
        if isinstance(m, FSDPModule):
            found.append(m)
    return found


def _check_fsdp2(module: nn.Module, groups: list) -> None:
    """What FSDP2 did to the experts of `module`, checked once at its first FSDP2 forward."""
    from torch.distributed.fsdp import CPUOffloadPolicy
    from torch.distributed.tensor import DTensor

    from kt_core.experts import KTExperts

    sharded = [
        f"{name}.{pname}"
        for name, m in module.named_modules()
        if isinstance(m, KTExperts)
        for pname, p in m.named_parameters()
        if isinstance(p, DTensor)
    ]
    if sharded:
        listed = ", ".join(sharded[:4]) + (", ..." if len(sharded) > 4 else "")
        raise SettingError(
            f"FSDP2 ignored_params: FSDP2 shards {len(sharded)} tensors of the routed experts ({listed}), which must "
            "stay whole in host memory. Pass ignored_params=kt_core.distributed.fsdp_ignored_params(model) to every "
            "fully_shard call whose module holds experts (accelerate / the Trainer: "
            "kt_core.distributed.prepare_fsdp2(model) before accelerator.prepare, which KTCallback does)."
        )
    if any(isinstance(g.offload_policy, CPUOffloadPolicy) for g in groups):
        raise SettingError(
            "FSDP cpu_offload: got CPUOffloadPolicy, expected none. The routed experts and their LoRA factors are in "
            "host memory already and stay out of FSDP2; offloading the other parameters beside them is not "
            "supported (fully_shard(..., offload_policy=OffloadPolicy()), or leave the Trainer's 'offload' out)."
        )
    if not groups:
        raise NotImplementedError(
            "expert LoRA under FSDP2: FSDP2 manages no parameter of the model, so nothing tells when a step "
            "reduces its gradients; shard at least one non-expert parameter"
        )


def fsdp2_sync(module: nn.Module) -> EngineSync | None:
    """FSDP2's decision for the forward of `module` now running (None when FSDP2 does not run it).

    The flag is FSDP2's own: `reduce_grads` of the outermost parameter group, which `set_requires_gradient_sync`
    sets on every group (accelerate's no_sync() calls it). The data-parallel ranks are the size of that group's
    mesh (both dimensions under HSDP).
    """
    groups = _checked.get(module)
    if groups is None:
        if not _fsdp_modules(module):
            return None
        groups = _param_groups(module)
        _check_fsdp2(module, groups)
        _checked[module] = groups
        logger.info("expert LoRA under FSDP2: the experts are unsharded, %d FSDP2 parameter groups", len(groups))
    first = groups[0]
    ranks = first.mesh_info.mesh.size() if dist.is_initialized() else 1
    return EngineSync("FSDP2", bool(first.reduce_grads), ranks, window=_replicated_gradients)


def _replicated_gradients():
    """DTensor's implicit replication, from a syncing forward to the next forward (the averager holds it).

    After the averaging, the factors' gradients are the same on every rank: replicated, in DTensor's terms, but
    plain host tensors beside FSDP2's sharded DTensor gradients. torch.nn.utils.clip_grad_norm_ (accelerate's and
    the Trainer's clipping under FSDP2) refuses such a mix ("got mixed torch.Tensor and DTensor"); with implicit
    replication it takes each plain gradient as replicated: its norm counted once, not once per rank, which is
    what they are. Held over the step's last micro-batch only: the micro-batches before it (no gradient sync)
    leave the factors' gradients local, and no DTensor operation mixes them in then.
    """
    from torch.distributed.tensor.experimental import implicit_replication

    return implicit_replication()


def _param_groups(module: nn.Module) -> list:
    """The FSDP2 parameter groups of `module` and its submodules, outermost first."""
    from torch.distributed.fsdp import FSDPModule

    groups, seen = [], set()
    for m in module.modules():
        if isinstance(m, FSDPModule):
            state = m._get_fsdp_state()
            own = getattr(state, "_fsdp_param_groups", None)
            if own is None:  # torch <= 2.11: one group per module (None when it holds no parameter of its own)
                own = [g for g in [state._fsdp_param_group] if g is not None]
            for g in own:
                if id(g) not in seen:
                    seen.add(id(g))
                    groups.append(g)
    return groups

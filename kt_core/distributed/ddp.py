"""The routed experts kept out of DistributedDataParallel; their LoRA gradients averaged over gloo by us.

DDP broadcasts every parameter from rank 0 when it wraps the model and books every parameter in its reducer. Two
kinds of the experts' tensors cannot be DDP's:
- the frozen base weights: identical on every rank and (kt_core.distributed.shared_store) one mapping shared by
  the node's ranks; DDP must neither send them nor write into them;
- the expert LoRA factors: trainable fp32 parameters in HOST memory while, on a GPU machine, the rest of the model
  is on cuda:LOCAL_RANK. DDP with device_ids refuses a module whose parameters sit on two device types, and NCCL
  cannot reduce host tensors.
So both go to DDP's ignore list (its own `_set_params_and_buffers_to_ignore_for_model`), and `ExpertLoraAverager`
does for the factors what DDP does for its parameters, over a gloo process group of its own (made once per
process with `torch.distributed.new_group(backend="gloo")`): it broadcasts them from rank 0 at the first DDP
forward, and averages their gradients once per optimizer step. The same code runs on the CPU path (gloo DDP,
every parameter on the CPU): DDP never books the factors there either.

When the averaging happens, and why this way:
- The decision is DDP's: at each forward, DDP reads its `require_backward_grad_sync` (False inside `no_sync()`,
  which the Trainer / accelerate enter for every micro-batch of a gradient accumulation but the last) and syncs
  the coming backward or not. A forward pre-hook on the model reads the same flag from the DDP instance running
  it (`DistributedDataParallel._active_ddp_module`, set by DDP around its module's forward; a forward outside DDP
  syncs nothing, as DDP's parameters would not be).
- The moment is when the last factor's gradient is complete in a syncing backward: a post-accumulate-grad hook on
  every factor (`Tensor.register_post_accumulate_grad_hook`) counts the factors whose `.grad` holds this step's
  sum; the last one flattens all the gradients into one buffer, runs ONE all_reduce, divides by the world size
  and copies back. This is DDP's own rule (it finalizes once every booked parameter is marked ready), it runs
  inside `loss.backward()`, so before the Trainer clips or steps, and it holds under gradient checkpointing:
  reentrant checkpointing recomputes each layer in a nested backward, where a callback queued on the autograd
  engine would fire at the end of that nested pass (once per layer), and a multi-grad hook would see only that
  pass's tensors; a leaf's gradient, though, is accumulated exactly once per backward whichever pass computes it.
- Like DDP without find_unused_parameters, every factor must receive a gradient in a syncing backward: a step
  where one did not is refused at the next forward, naming it, instead of stepping on gradients that differ
  between ranks.

FSDP2 (kt_core.distributed.fsdp) keeps the same tensors out of its sharding (`ignored_params`) and the same averager
averages the factors: there the decision is FSDP2's own gradient-sync flag (`set_requires_gradient_sync`, which
accelerate's no_sync() sets), read from the FSDP2 module the hooked model is (`_engine_sync`).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "FROZEN_EXPERT_WEIGHTS",
    "EngineSync",
    "ExpertLoraAverager",
    "ignore_frozen_experts",
    "prepare_data_parallel",
]

logger = logging.getLogger(__name__)

# The experts' frozen tensors DDP must not own: the weights and, for FP8 stores, their block scales.
FROZEN_EXPERT_WEIGHTS = ("gate_up_proj", "down_proj", "gate_up_proj_scale_inv", "down_proj_scale_inv")

_gloo_group = None  # this process's gloo group for the expert LoRA factors, made at the first DDP / FSDP2 forward


def _expert_lora_factors(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    from kt_core.experts import KTExperts

    return [
        (f"{name}.lora.{pname}", p)
        for name, module in model.named_modules()
        if isinstance(module, KTExperts) and module.lora is not None
        for pname, p in module.lora.named_parameters()
    ]


def ignore_frozen_experts(model: nn.Module, *, expert_lora: bool = True) -> list[str]:
    """Adds the frozen weights of every KTExperts in `model`, and (expert_lora) their LoRA factors, to the names
    DDP ignores when it wraps `model`.

    Call it on the module DDP will wrap (the outermost one: the PEFT model the Trainer gets); harmless without DDP.
    The factors it ignores need `ExpertLoraAverager` (`prepare_data_parallel` does both).

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
        if getattr(module, weight, None) is not None
    }
    if expert_lora:
        names |= {name for name, _ in _expert_lora_factors(model)}
    names |= set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(names))
    return sorted(names)


class _State(enum.Enum):
    LOCAL = "local"  # gradients accumulate on this rank only (no DDP, or DDP inside no_sync())
    ARMED = "armed"  # a syncing DDP / FSDP2 forward ran: the coming backward averages the factors
    DONE = "done"  # this step's factors are averaged; another gradient before the next forward is an error


class ExpertLoraAverager:
    """Averages the expert LoRA gradients over the ranks once per optimizer step, as DDP would (module docstring).

    Built by `prepare_data_parallel`; kept on the model as `model.kt_lora_averager`.

    Attributes:
        reductions: the all_reduce calls made so far (one per optimizer step under DDP).
        broadcasts: the broadcasts of the factors from rank 0 (one, at the first DDP / FSDP2 forward).
    """

    def __init__(self, model: nn.Module, factors: list[tuple[str, nn.Parameter]]):
        self.names = [name for name, _ in factors]
        self.factors = [p for _, p in factors]
        self.reductions = 0
        self.broadcasts = 0
        self._state = _State.LOCAL
        self._ready: set[int] = set()
        self._trainable: set[int] = set()
        self._group = None
        self._engine = "DDP"  # the data-parallel engine of the last syncing forward (for the messages)
        self._window = None  # EngineSync.window, held from a syncing forward to the next forward
        self._hooked: set[int] = set()
        self._handles = [model.register_forward_pre_hook(self._on_forward)]
        self._hook_trainable()

    def _hook_trainable(self) -> None:
        """The gradient hook on every factor that trains (a frozen one takes no hook; one unfrozen later gets it
        at the next DDP / FSDP2 forward)."""
        for p in self.factors:
            if p.requires_grad and id(p) not in self._hooked:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
                self._hooked.add(id(p))

    def remove(self) -> None:
        """Takes the hooks off (the factors then accumulate local gradients only)."""
        self._leave_window()
        for handle in self._handles:
            handle.remove()
        self._handles, self._hooked = [], set()

    # ---- hooks ----------------------------------------------------------------------------------------------------

    def _on_forward(self, module, args) -> None:
        self._leave_window()
        if not torch.is_grad_enabled():
            return
        engine = _engine_sync(module)
        if engine is None:
            if self._state is not _State.ARMED:
                self._state = _State.LOCAL
            return
        self._engine = engine.name
        if self._state is _State.ARMED:
            lacking = self._trainable - self._ready
            missing = [n for n, p in zip(self.names, self.factors, strict=True) if id(p) in lacking]
            listed = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
            raise RuntimeError(
                f"expert LoRA under {engine.name}: the previous step's backward gave no gradient to {len(missing)} of "
                f"{len(self._trainable)} expert LoRA factors ({listed}), "
                "so their gradients were not averaged over the ranks. Like DDP without find_unused_parameters, "
                "every trainable factor must take part in every step's loss (freeze the factors of experts that do "
                "not: requires_grad_(False))."
            )
        if self._group is None:
            self._group = _gloo_group_for(engine)
            self._broadcast()
        self._hook_trainable()
        if engine.syncs:
            self._trainable = {id(p) for p in self.factors if p.requires_grad}
            self._ready = set()
            self._state = _State.ARMED if self._trainable else _State.LOCAL
            if self._state is _State.ARMED and engine.window is not None:
                self._window = engine.window()
                self._window.__enter__()
        else:
            self._state = _State.LOCAL

    def _on_grad(self, param: torch.Tensor) -> None:
        if self._state is _State.LOCAL:
            return
        if self._state is _State.DONE:
            raise RuntimeError(
                f"expert LoRA under {self._engine}: a factor received a gradient after this step's averaging (a "
                f"second backward through one {self._engine} forward, or a factor used twice in a backward); "
                "DDP allows neither, and the factors are averaged as DDP's parameters"
            )
        self._ready.add(id(param))
        if len(self._ready) == len(self._trainable):
            self._average()
            self._state = _State.DONE

    def _leave_window(self) -> None:
        if self._window is not None:
            window, self._window = self._window, None
            window.__exit__(None, None, None)

    # ---- collectives ----------------------------------------------------------------------------------------------

    def _flat(self, tensors: list[torch.Tensor]) -> dict[torch.dtype, tuple[torch.Tensor, list[torch.Tensor]]]:
        """One flat buffer per dtype (the factors are fp32: one buffer) holding copies of `tensors`."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        return {dtype: (torch.cat([t.reshape(-1) for t in ts]), ts) for dtype, ts in by_dtype.items()}

    @staticmethod
    def _scatter(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    @torch.no_grad()
    def _broadcast(self) -> None:
        """The factors of rank 0 on every rank, as DDP does for its parameters when it wraps the model."""
        for flat, tensors in self._flat([p.detach() for p in self.factors]).values():
            dist.broadcast(flat, src=dist.get_global_rank(self._group, 0), group=self._group)
            self._scatter(flat, tensors)
        self.broadcasts += 1

    @torch.no_grad()
    def _average(self) -> None:
        grads = [p.grad for p in self.factors if id(p) in self._trainable]
        size = dist.get_world_size(self._group)
        for flat, tensors in self._flat(grads).values():
            dist.all_reduce(flat, group=self._group)
            flat.div_(size)
            self._scatter(flat, tensors)
            self.reductions += 1


@dataclass(frozen=True)
class EngineSync:
    """What a data-parallel engine decided for the forward now running.

    name: the engine, for messages ("DDP", "FSDP2"); syncs: its coming backward reduces gradients (False inside
    DDP's no_sync(), or after FSDP2's set_requires_gradient_sync(False)); ranks: the ranks it averages over;
    window: a context the averager holds from a syncing forward to the model's next forward: around the backward
    that averages the factors, the gradient clipping and the optimizer step (entered outside the backward, since the
    autograd engine restores the thread's state after it).
    """

    name: str
    syncs: bool
    ranks: int
    window: Callable[[], AbstractContextManager] | None = None


def _engine_sync(module: nn.Module) -> EngineSync | None:
    """The engine running `module`'s forward now: DDP (around it), FSDP2 (applied to it), or None."""
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel._active_ddp_module
    if ddp is not None:
        return EngineSync("DDP", ddp.require_backward_grad_sync, ddp.process_group.size())
    from kt_core.distributed.fsdp import fsdp2_sync

    return fsdp2_sync(module)


def _gloo_group_for(engine: EngineSync) -> object:
    """The process's gloo group for the factors (made once); the engine's group must span every rank."""
    global _gloo_group
    world = dist.get_world_size()
    if engine.ranks != world:
        raise NotImplementedError(
            f"expert LoRA under {engine.name}: {engine.name} averages over a group of {engine.ranks} of the {world} "
            f"ranks; the expert LoRA factors are averaged over every rank ({engine.name} over the whole world only)"
        )
    if _gloo_group is None:
        _gloo_group = dist.new_group(backend="gloo")
        logger.info("expert LoRA gradients averaged over a gloo group of %d ranks (outside %s)", world, engine.name)
    return _gloo_group


def prepare_data_parallel(model: nn.Module) -> ExpertLoraAverager | None:
    """Makes `model` DDP-ready: DDP ignores the frozen expert weights and the expert LoRA factors, and an
    `ExpertLoraAverager` broadcasts and averages the factors instead. Harmless without DDP (nothing is reduced).

    Call it on the module DDP will wrap (the outermost one: the PEFT model the Trainer gets). Idempotent.

    Returns:
        The averager (also `model.kt_lora_averager`), or None when `model` has no expert LoRA.
    """
    ignore_frozen_experts(model)
    averager = getattr(model, "kt_lora_averager", None)
    if averager is not None:
        return averager
    factors = _expert_lora_factors(model)
    if not factors:
        return None
    model.kt_lora_averager = ExpertLoraAverager(model, factors)
    return model.kt_lora_averager

"""The routed experts kept out of DeepSpeed (ZeRO-2 and ZeRO-3); their LoRA averaged and stepped by us.

DeepSpeed takes every parameter the engine's module lists:
- the engine broadcasts each one from rank 0 when it is built (`DeepSpeedEngine._broadcast_model`);
- ZeRO-3 converts each one into a partitioned parameter (`DeepSpeedZeRoOffload._convert_to_zero_parameters`, which
  runs `zero.Init(module=...)` over `module.parameters()`: there is no per-parameter exclusion, and
  `set_z3_leaf_modules` only changes where the gathers happen), and its forward hooks gather the parameters of
  every module they run;
- ZeRO-1/2 flatten every parameter of the optimizer's groups into one buffer per group on the accelerator and point
  each parameter's `.data` into it (`_update_model_bit16_weights`); ZeRO-3 does the same with its fp32 partitions.
None of that may happen to the experts: their frozen weights live once per node in host memory
(kt_core.distributed.shared_store) and are read by the CPU operator from there, and the expert LoRA factors are fp32
host tensors the CPU operator reads and writes whole (on a GPU machine the flat buffers are on the GPU; a factor
whose storage is a slice of a flat buffer is no longer the host tensor the layer was given).

So, before the Trainer builds its optimizer and DeepSpeed its engine (`prepare_deepspeed`, which KTCallback calls
at the end of `Trainer.__init__`), every parameter of every `KTExperts` (the frozen weights, FP8 scales, and the
LoRA factors) leaves its module's parameter registry and stays an attribute of the module (the same tensor objects:
the operator's pointers, `requires_grad` and gradients are unchanged). DeepSpeed, and the optimizer the Trainer
gives it, never see them; the expert LoRA still saves and loads under PEFT's keys (the experts' state-dict hooks
read the factors from the module, kt_core.peft.attach), and `named_parameters()` no longer lists them.

`DeepSpeedExpertLora` does for the factors what ZeRO does for its parameters:
- at train start (after the engine is built and a checkpoint loaded) it broadcasts them from rank 0 over a gloo
  group of its own, and builds an optimizer of the same class and hyperparameters as the one ZeRO wraps (the
  Trainer's), over the factors only;
- at each optimizer step: ZeRO first takes the gradient norm of its parameters; our factors join it (the factors'
  gradients averaged over the ranks by one flat all_reduce, their norm combined with ZeRO's: ZeRO-1/2's
  `scaled_global_norm`, ZeRO-3's `_get_norm_groups`), so ZeRO clips its gradients by the norm of all the trainable
  parameters and the Trainer logs that norm, as it does without DeepSpeed. Then a step pre-hook on the optimizer
  ZeRO wraps (`torch.optim.Optimizer.register_step_pre_hook`; ZeRO calls its `step()` once per parameter group, and
  only at the gradient-accumulation boundary) clips the factors' gradients by the same coefficient, steps our
  optimizer at the learning rate the scheduler set, and clears the gradients (DeepSpeed's zero_grad clears only its
  own parameters). The gradients reach us already divided by the accumulation steps, as DeepSpeed's engine scales
  the loss before the backward.
- checkpoints: `state_dict()` / `load_state_dict()` hold the factors and our optimizer's state; KTCallback writes
  them as `kt_expert_lora.pt` in every checkpoint folder and reads them back when the Trainer resumes. The adapter
  the Trainer saves holds them under PEFT's keys, ZeRO-3's gathered save included (`_save_with_expert_lora`).

Refused, naming the setting: gradient clipping without ZeRO (stage 0: the engine clips its module's parameters,
which no longer list the factors), fp16 (DeepSpeed's loss scaling would reach the factors' gradients scaled, and
its overflow skips would not skip our step), and an optimizer other than a torch.optim one (the factors' optimizer
is built as the same class).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from kt_core.settings import SettingError

__all__ = [
    "EXPERT_LORA_CHECKPOINT",
    "DeepSpeedExpertLora",
    "check_deepspeed_config",
    "check_deepspeed_version",
    "deepspeed_running",
    "hide_experts_from_deepspeed",
    "prepare_deepspeed",
]

logger = logging.getLogger(__name__)

EXPERT_LORA_CHECKPOINT = "kt_expert_lora.pt"


TESTED_RANGE = ("0.19.8", "0.20")  # [low, high): the ZeRO optimizers' norm methods joined below are version-bound


def check_deepspeed_version() -> str:
    """The installed DeepSpeed's version; raises when it is outside TESTED_RANGE (pyproject's `deepspeed` extra)."""
    import importlib.metadata

    from packaging.version import Version

    version = importlib.metadata.version("deepspeed")
    low, high = TESTED_RANGE
    if not Version(low) <= Version(version) < Version(high):
        raise SettingError(
            f"DeepSpeed {version}: kt-plugins keeps the experts out of DeepSpeed through ZeRO internals tested with "
            f">={low},<{high}. Install a tested release (pip install 'kt-plugins[deepspeed]')."
        )
    return version


def deepspeed_running() -> bool:
    """Whether this process's accelerator (the Trainer's) runs DeepSpeed."""
    import sys

    if "accelerate" not in sys.modules:
        return False
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    return AcceleratorState._shared_state.get("distributed_type") == DistributedType.DEEPSPEED


def check_deepspeed_config(config: dict) -> None:
    """Refuses DeepSpeed settings the experts cannot run under, naming the setting (module docstring)."""
    stage = (config.get("zero_optimization", {}) or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3, "auto"):
        raise SettingError(f"DeepSpeed zero_optimization.stage: got {stage!r}, expected 0, 1, 2 or 3")
    clipping = config.get("gradient_clipping", 0.0)
    if stage == 0 and clipping not in (None, "auto") and float(clipping) > 0:
        raise SettingError(
            f"DeepSpeed gradient_clipping: got {clipping!r} with zero_optimization.stage 0, expected 0. Without "
            "ZeRO the engine clips its module's parameters, which leave out the expert LoRA factors (kept out of "
            "DeepSpeed). Use ZeRO stage 1, 2 or 3, or set TrainingArguments(max_grad_norm=0)."
        )
    fp16 = config.get("fp16", {}) or {}
    if fp16.get("enabled") not in (None, False, "auto"):
        raise SettingError(
            "DeepSpeed fp16.enabled: got True, expected False. DeepSpeed's loss scaling would reach the expert LoRA "
            "factors (kept out of DeepSpeed) scaled, and its overflow skips would not skip their step. Use bf16 "
            "(TrainingArguments(bf16=True)) or fp32."
        )


def _experts_modules(model: nn.Module) -> list[nn.Module]:
    from kt_core.experts import KTExperts

    return [m for m in model.modules() if isinstance(m, KTExperts)]


def _hide(module: nn.Module) -> int:
    """Moves `module`'s own parameters out of its registry into plain attributes (same tensor objects)."""
    names = list(module._parameters)
    for name in names:
        param = module._parameters.pop(name)
        object.__setattr__(module, name, param)
    return len(names)


def hide_experts_from_deepspeed(model: nn.Module) -> int:
    """Every parameter of every KTExperts in `model` (and of its ExpertLoRA) leaves the parameter registry.

    Returns:
        How many tensors were hidden now (0 when already done).
    """
    hidden = 0
    for experts in _experts_modules(model):
        hidden += _hide(experts)
        if experts.lora is not None:
            hidden += _hide(experts.lora)
    return hidden


def _factors(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    from kt_core.experts import KTExperts

    out = []
    for name, experts in model.named_modules():
        lora = getattr(experts, "lora", None)
        if isinstance(experts, KTExperts) and lora is not None:
            out += [(f"{name}.lora.{n}", getattr(lora, n)) for n in ("gate_up_A", "gate_up_B", "down_A", "down_B")]
    return out


class DeepSpeedExpertLora:
    """The expert LoRA factors beside a DeepSpeed engine: averaged over the ranks, stepped when ZeRO steps.

    Built by `prepare_deepspeed` (kept on the model as `model.kt_deepspeed`); `attach` hooks it to the optimizer
    ZeRO wraps once the engine is built.

    Attributes:
        names, factors: the factors (trainable or not), in module order.
        optimizer: our optimizer over the trainable factors (after `attach`).
        reductions: all_reduce calls so far (one per optimizer step); broadcasts: broadcasts from rank 0.
    """

    def __init__(self, factors: list[tuple[str, nn.Parameter]]):
        self.names = [n for n, _ in factors]
        self.factors = [p for _, p in factors]
        self.optimizer: torch.optim.Optimizer | None = None
        self.reductions = 0
        self.broadcasts = 0
        self._group = None
        self._inner = None
        self._handles: list = []
        self._pending = False  # gradients arrived since our last step
        self._averaged = False  # ... and were averaged over the ranks
        self._zero = None  # DeepSpeed's ZeRO optimizer
        self._clip = 0.0  # its gradient_clipping
        self._patched: list[tuple[object, str]] = []  # (ZeRO optimizer, method name) joined by our norm
        self._pending_state: dict | None = None
        for p in self.factors:
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.factors if p.requires_grad]

    def _on_grad(self, param: torch.Tensor) -> None:
        self._pending = True

    # ---- hook-up -------------------------------------------------------------------------------------------------

    def attach(self, zero_optimizer) -> torch.optim.Optimizer:
        """Builds our optimizer beside `zero_optimizer` (DeepSpeed's, or accelerate's wrapper of it) and hooks it.

        The optimizer ZeRO wraps must be a torch.optim one (the Trainer's); ours is the same class with the
        hyperparameters of its first group (the Trainer's weight-decay group, where the factors would have been).
        """
        zero = getattr(zero_optimizer, "optimizer", zero_optimizer)  # accelerate's wrapper -> DeepSpeed's
        inner = getattr(zero, "optimizer", zero)  # DeepSpeed's ZeRO optimizer -> the one it steps
        if not isinstance(inner, torch.optim.Optimizer):
            raise SettingError(f"DeepSpeed optimizer: got {type(inner).__name__}, expected a torch.optim optimizer")
        cls = type(inner)
        if not cls.__module__.startswith("torch.optim"):
            raise SettingError(
                f"DeepSpeed optimizer: got {cls.__module__}.{cls.__name__}, expected a torch.optim optimizer. The "
                "expert LoRA factors, kept out of DeepSpeed, are stepped by an optimizer of the same class: leave "
                "'optimizer' out of the DeepSpeed config (the Trainer then builds a torch one, `optim`)."
            )
        if self._inner is inner:
            return self.optimizer
        group = {k: v for k, v in inner.param_groups[0].items() if k != "params"}
        self.optimizer = cls([{"params": self.trainable, **group}])
        self._inner = inner
        self._handles.append(inner.register_step_pre_hook(self._on_step))
        self._join_the_norm(zero)
        if self._pending_state is not None:
            self._load(self._pending_state)
            self._pending_state = None
        self._group = self._gloo_group()
        self._broadcast()
        return self.optimizer

    def _gloo_group(self):
        if not dist.is_available() or not dist.is_initialized():
            return None
        from kt_core.distributed.ddp import EngineSync, _gloo_group_for

        world = dist.get_world_size()
        return _gloo_group_for(EngineSync("DeepSpeed", True, world))

    def _join_the_norm(self, zero) -> None:
        """Our factors' gradients join the norm ZeRO takes of its own before it clips them (module docstring)."""
        from deepspeed.runtime.utils import combine_grad_norm_groups

        self._zero = zero
        self._clip = float(getattr(zero, "clip_grad", 0.0) or 0.0)
        if "_get_norm_groups" in dir(zero):  # ZeRO-3: one norm per parameter group, combined by its step()
            name, per_group = "_get_norm_groups", zero._get_norm_groups

            def joined():
                groups = per_group()
                return [*groups, self._norm(like=groups[0] if groups else None)]

        elif "scaled_global_norm" in dir(zero):  # ZeRO-1/2: the combined norm
            name, combined = "scaled_global_norm", zero.scaled_global_norm

            def joined(norm_type=2):
                theirs = combined(norm_type)
                return combine_grad_norm_groups([theirs, self._norm(like=theirs)], norm_type)

        elif self._clip > 0:
            raise SettingError(
                f"DeepSpeed gradient_clipping: got {self._clip} with {type(zero).__name__}, expected 0. The expert "
                "LoRA factors (kept out of DeepSpeed) join the gradient norm of ZeRO stages 1-3 only. Use ZeRO, or "
                "set TrainingArguments(max_grad_norm=0)."
            )
        else:
            return
        setattr(zero, name, joined)  # an instance attribute over the class's method; `remove` deletes it
        self._patched.append((zero, name))

    def _norm(self, like) -> torch.Tensor:
        """The L2 norm of the factors' gradients, averaged over the ranks (now, once per step), on `like`'s device."""
        self._average_once()
        norms = [torch.linalg.vector_norm(p.grad.float()) for p in self.trainable]
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        return norm.to(like.device) if torch.is_tensor(like) else norm

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for zero, name in self._patched:
            vars(zero).pop(name, None)
        self._patched = []

    # ---- at each ZeRO step ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def _on_step(self, inner, args, kwargs) -> None:
        """ZeRO steps the optimizer it wraps: the first call of this step averages and steps the factors."""
        if not self._pending:
            return  # a later parameter group of the same ZeRO step
        self._average_once()
        self._pending = self._averaged = False
        trainable = self.trainable
        if self._clip > 0:  # ZeRO's coefficient, from the norm of its gradients and ours (`_join_the_norm`)
            total = float(self._zero._global_grad_norm)
            coefficient = max(1.0, (total + 1e-6) / self._clip)
            for p in trainable:
                p.grad.div_(coefficient)
        lr = inner.param_groups[0]["lr"]  # the scheduler's rate (ZeRO steps one group at a time)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        for p in trainable:
            p.grad = None

    def _average_once(self) -> None:
        """The factors' gradients (zeros where none arrived), averaged over the ranks once per step."""
        if self._averaged:
            return
        trainable = self.trainable
        for p in trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self._average([p.grad for p in trainable])
        self._averaged = True

    def _average(self, grads: list[torch.Tensor]) -> None:
        if self._group is None or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self._group)
        flat.div_(dist.get_world_size(self._group))
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        self.reductions += 1

    @torch.no_grad()
    def _broadcast(self) -> None:
        """The factors of rank 0 on every rank (DeepSpeed broadcasts its own parameters when the engine is built)."""
        if self._group is None or not self.factors:
            return
        flat = torch.cat([p.detach().reshape(-1) for p in self.factors])
        dist.broadcast(flat, src=dist.get_global_rank(self._group, 0), group=self._group)
        offset = 0
        for p in self.factors:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        self.broadcasts += 1

    # ---- checkpoints ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "factors": {n: p.detach().clone() for n, p in zip(self.names, self.factors, strict=True)},
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """The factors now; our optimizer's state now, or when it is built (`attach`)."""
        missing = sorted(set(self.names) - set(state["factors"]))
        if missing:
            raise ValueError(
                f"{EXPERT_LORA_CHECKPOINT}: no value for {len(missing)} expert LoRA factors ({missing[0]})"
            )
        with torch.no_grad():
            for n, p in zip(self.names, self.factors, strict=True):
                p.copy_(state["factors"][n])
        if self.optimizer is None:
            self._pending_state = state
        else:
            self._load(state)

    def _load(self, state: dict) -> None:
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / EXPERT_LORA_CHECKPOINT
        torch.save(self.state_dict(), path)
        return path

    def load(self, folder: str | Path) -> None:
        path = Path(folder) / EXPERT_LORA_CHECKPOINT
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: a DeepSpeed checkpoint of a model with expert LoRA holds the factors and their optimizer "
                f"state in {EXPERT_LORA_CHECKPOINT} (written by KTCallback); this checkpoint has none"
            )
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def prepare_deepspeed(model: nn.Module, config: dict | None = None) -> DeepSpeedExpertLora | None:
    """Keeps the experts of `model` out of DeepSpeed and prepares their LoRA's averaging and optimizer.

    Call it on the model given to the Trainer / `deepspeed.initialize`, before the optimizer is built and the
    engine created (KTCallback does, at the end of Trainer.__init__); then `model.kt_deepspeed.attach(optimizer)`
    once the engine is built (KTCallback does at train start). Idempotent.

    Args:
        config: the DeepSpeed config (checked: check_deepspeed_config); None checks nothing.

    Returns:
        The factors' manager (also `model.kt_deepspeed`), or None when `model` has no expert LoRA.
    """
    if config is not None:
        check_deepspeed_config(config)
        check_deepspeed_version()
    existing = getattr(model, "kt_deepspeed", None)
    if existing is not None:
        return existing
    factors = _factors(model)
    experts = _experts_modules(model)
    hidden = hide_experts_from_deepspeed(model)
    averager = getattr(model, "kt_lora_averager", None)
    if averager is not None:  # DDP / FSDP2's: DeepSpeed runs no forward through either
        averager.remove()
    if experts:
        logger.info(
            "DeepSpeed leaves the %d routed-experts modules alone: %d tensors kept out of its parameters, "
            "%d expert LoRA factors averaged and stepped beside it",
            len(experts),
            hidden,
            len(factors),
        )
    if not factors:
        return None
    model.kt_deepspeed = DeepSpeedExpertLora(factors)
    if hasattr(model, "save_pretrained"):
        _save_with_expert_lora(model)
    return model.kt_deepspeed


def _save_with_expert_lora(model: nn.Module) -> None:
    """`model.save_pretrained(state_dict=...)` adds the experts' LoRA where the given state dict lacks it.

    ZeRO-3's gathered state dict (`stage3_gather_16bit_weights_on_model_save`, which the Trainer's `save_model`
    hands to `save_pretrained`) is built from each module's registered parameters, not from `state_dict()`, so it
    has nothing of the experts (hidden from DeepSpeed) and the adapter would be saved without their LoRA. Their
    entries are what `model.state_dict()` holds for them (PEFT's keys, kt_core.peft.attach's state-dict hooks);
    an entry the given state dict has is kept (ZeRO-1/2 give `state_dict()` itself).
    """
    from kt_core.experts import KTExperts

    save = model.save_pretrained

    def save_pretrained(*args, state_dict: dict | None = None, **kwargs):
        if state_dict:  # empty: the Trainer's placeholder when ZeRO-3 does not gather (it removes the file)
            ours = {}
            for name, experts in model.named_modules():
                if isinstance(experts, KTExperts) and experts.lora is not None:
                    ours.update(experts.state_dict(prefix=f"{name}."))
            state_dict = {**ours, **state_dict}
        return save(*args, state_dict=state_dict, **kwargs)

    model.save_pretrained = save_pretrained

"""`take_over_peft_model`: move a PEFT model's routed experts, with their LoRA, onto the CPU operator.

The user's model is a stock `get_peft_model(model, LoraConfig(target_modules=[...],
target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))`. PEFT wraps each experts
module in `lora.ParamWrapper`s; here each wrapped experts module becomes a `KTExperts` holding the same
weights in host memory and the same LoRA factors (converted to our layout), while every other PEFT layer
(attention LoRA, ...) stays PEFT's. The new module saves and loads its LoRA under PEFT's keys, so
`model.save_pretrained` writes an adapter that stock PEFT loads onto the plain transformers model.

PEFT only knows its own layers, so four of its paths are routed to the KTExperts as well:
- `merge_and_unload()` / `unload()`: the expert LoRA is merged into (or dropped from) the KTExperts
  weights first, then PEFT merges the rest as usual and returns a plain transformers model;
- `disable_adapter_layers()` / `enable_adapter_layers()` (what `with model.disable_adapter():` calls, as
  reference-model passes of DPO-style trainers do): the expert LoRA is switched off and on with PEFT's;
- saving (PEFT >= 0.19 picks the adapter's state-dict entries by visiting its tuner layers): the expert
  LoRA entries, already under PEFT's keys, are added to what PEFT selected;
- `_mark_only_adapters_as_trainable` (run again by PEFT when adapters are added or loaded): the targeted
  expert-LoRA factors stay trainable.
Loading needs nothing: PEFT passes entries it has no layer for through, and the KTExperts' load hook
reads them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from kt_core.experts import KTExperts
from kt_core.loading.convert import convert_model
from kt_core.peft_format import (
    EXPERT_PARAMETERS,
    PEFT_LORA_KEY,
    install_peft_state_dict_hooks,
    is_peft_param_wrapper,
    load_expert_lora_,
    merge_expert_lora_,
    take_over_peft_experts,
    unload_expert_lora_,
)
from kt_core.placement import PlacementRule

__all__ = ["expert_lora_parameters", "is_prepared", "take_over_peft_model"]

logger = logging.getLogger(__name__)


def is_prepared(model: nn.Module) -> bool:
    """Returns whether `take_over_peft_model` already ran on `model`."""
    return bool(getattr(model, "kt_prepared", False))


def _active_adapter(model: nn.Module) -> str:
    adapter = getattr(model, "active_adapter", "default")
    if isinstance(adapter, (list, tuple)):
        if len(adapter) != 1:
            raise ValueError(f"expected one active PEFT adapter on the model, got {list(adapter)}")
        adapter = adapter[0]
    return adapter


def take_over_peft_model(
    model: nn.Module,
    *,
    rules: str | Path | Sequence[PlacementRule] | None = None,
    kernel: str = "auto",
    cpu_infer: int | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Replaces the routed experts of a (PEFT-wrapped) transformers MoE model by `KTExperts`, in place.

    Call it before building the Trainer when the model does not fit on the GPU: the Trainer moves the
    model to its device in `__init__`, and `KTExperts` stays in host memory whatever `.to()` asks.

    Args:
        model: a `PeftModel` (or a plain transformers model) of a registered MoE family.
        rules: placement rules (None: the family's defaults, every experts module on the CPU operator).
        kernel: CPU kernel of the experts ("auto": the best this CPU runs).
        cpu_infer: CPU threads of the experts operator.
        device: where the non-expert tensors go; None leaves them where they are.

    Returns:
        `model`, converted.
    """
    if is_prepared(model):
        return model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    adapter = _active_adapter(model)

    # Unwrap PEFT's expert wrappers so that the placement rules see transformers' own experts classes.
    wrappers: dict[str, nn.Module] = {}
    taken = {}
    outermost = [
        (name, module)
        for name, module in base.named_modules()
        if is_peft_param_wrapper(module) and not is_peft_param_wrapper(base.get_submodule(name.rpartition(".")[0]))
    ]
    for name, module in outermost:
        parent_name, _, attr = name.rpartition(".")
        experts, peft_lora = take_over_peft_experts(module, adapter)
        wrappers[name], taken[name] = module, peft_lora
        setattr(base.get_submodule(parent_name), attr, experts)

    # Building the new modules draws fresh LoRA inits that are then overwritten: keep the global RNG
    # untouched, so that data order and dropout match a run without the conversion.
    with torch.random.fork_rng(devices=[]):
        convert_model(base, rules=rules, kernel=kernel, cpu_infer=cpu_infer, device=device)
        for name, peft_lora in taken.items():
            module = base.get_submodule(name)
            if isinstance(module, KTExperts):
                load_expert_lora_(module, peft_lora)
                install_peft_state_dict_hooks(module, peft_lora.chain, adapter, swapped=peft_lora.swapped)
            else:  # a rule kept these experts on the GPU: PEFT keeps computing their LoRA
                parent_name, _, attr = name.rpartition(".")
                setattr(base.get_submodule(parent_name), attr, wrappers[name])
    logger.info("%d experts modules with PEFT LoRA now run on the CPU operator", len(taken))
    _route_peft_merge(model)
    _route_peft_enable(model)
    _route_peft_trainable(model)
    _route_peft_state_dict(model)
    model.kt_prepared = True
    return model


def _peft_experts(model: nn.Module) -> list[KTExperts]:
    return [m for m in model.modules() if isinstance(m, KTExperts) and getattr(m, "kt_peft_chain", None)]


def _route_peft_merge(model: nn.Module) -> None:
    """Makes PEFT's `merge_and_unload` / `unload` handle the expert LoRA held by KTExperts.

    PeftModel forwards both calls to its tuner (`model.base_model`, a LoraModel); the tuner's bound
    methods are wrapped on this instance only.
    """
    tuner = getattr(model, "base_model", None)
    if tuner is None or tuner is model or not hasattr(tuner, "merge_and_unload"):
        return
    peft_merge, peft_unload = tuner.merge_and_unload, tuner.unload

    def merge_and_unload(*args, **kwargs):
        names = kwargs.get("adapter_names")
        for experts in _peft_experts(tuner):
            if names is None or experts.kt_peft_adapter in names:
                merge_expert_lora_(experts)
            else:
                unload_expert_lora_(experts)
        return peft_merge(*args, **kwargs)

    def unload(*args, **kwargs):
        for experts in _peft_experts(tuner):
            unload_expert_lora_(experts)
        return peft_unload(*args, **kwargs)

    merge_and_unload.__doc__ = peft_merge.__doc__
    unload.__doc__ = peft_unload.__doc__
    tuner.merge_and_unload = merge_and_unload
    tuner.unload = unload


def _route_peft_enable(model: nn.Module) -> None:
    """Makes the tuner's `disable_adapter_layers` / `enable_adapter_layers` switch the KTExperts' LoRA too."""
    tuner = getattr(model, "base_model", None)
    if tuner is None or tuner is model or not hasattr(tuner, "disable_adapter_layers"):
        return
    peft_disable, peft_enable = tuner.disable_adapter_layers, tuner.enable_adapter_layers

    def disable_adapter_layers(*args, **kwargs):
        result = peft_disable(*args, **kwargs)
        for experts in _peft_experts(tuner):
            experts.lora_enabled = False
        return result

    def enable_adapter_layers(*args, **kwargs):
        result = peft_enable(*args, **kwargs)
        for experts in _peft_experts(tuner):
            experts.lora_enabled = True
        return result

    disable_adapter_layers.__doc__ = peft_disable.__doc__
    enable_adapter_layers.__doc__ = peft_enable.__doc__
    tuner.disable_adapter_layers = disable_adapter_layers
    tuner.enable_adapter_layers = enable_adapter_layers


def _route_peft_trainable(model: nn.Module) -> None:
    """Keeps the targeted expert-LoRA factors trainable when PEFT re-marks its adapters as the only trainables."""
    tuner = getattr(model, "base_model", None)
    mark = getattr(tuner, "_mark_only_adapters_as_trainable", None) if tuner is not model else None
    if mark is None:
        return

    def mark_only_adapters_as_trainable(*args, **kwargs):
        result = mark(*args, **kwargs)
        for experts in _peft_experts(tuner):
            for param_name in experts.kt_peft_chain:
                for factor in EXPERT_PARAMETERS[param_name]:
                    getattr(experts.lora, factor).requires_grad_(True)
        return result

    tuner._mark_only_adapters_as_trainable = mark_only_adapters_as_trainable


def _route_peft_state_dict(model: nn.Module) -> None:
    """Adds the KTExperts' expert-LoRA entries to the adapter state dict that PEFT selects for saving.

    PEFT >= 0.19 selects the entries of an adapter structurally (`<Tuner>._get_adapter_state_dict`, a
    classmethod, visiting the tuner layers), so entries of a module that is not a PEFT layer are dropped.
    The classmethod of the model's tuner class is wrapped once per process; for models without KTExperts
    it returns what PEFT returns. Older PEFT selects entries by key name and needs nothing.
    """
    tuner = getattr(model, "base_model", None)
    if tuner is None or tuner is model:
        return
    cls = type(tuner)
    original = cls.__dict__.get("_get_adapter_state_dict")
    if not isinstance(original, classmethod) or getattr(original.__func__, "kt_routed", False):
        return
    select = original.__func__

    def _get_adapter_state_dict(klass, model, config, adapter_name, state_dict, unwanted_adapter_names):
        selected = select(klass, model, config, adapter_name, state_dict, unwanted_adapter_names)
        for name, module in model.named_modules():
            if not isinstance(module, KTExperts) or getattr(module, "kt_peft_adapter", None) != adapter_name:
                continue
            prefix = name.removeprefix("_fsdp_wrapped_module.") + "."
            for key, value in state_dict.items():
                if key.startswith(prefix) and PEFT_LORA_KEY.match(key[len(prefix) :]):
                    selected.setdefault(key, value)
        return selected

    _get_adapter_state_dict.kt_routed = True
    _get_adapter_state_dict.__doc__ = select.__doc__
    cls._get_adapter_state_dict = classmethod(_get_adapter_state_dict)


def expert_lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Returns the trainable expert-LoRA factors of every KTExperts in `model`."""
    return [
        p
        for m in model.modules()
        if isinstance(m, KTExperts) and m.lora is not None
        for p in m.lora.parameters()
        if p.requires_grad
    ]

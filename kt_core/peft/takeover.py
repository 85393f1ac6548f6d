"""`take_over_peft_model`: move a PEFT model's routed experts, with their LoRA, onto the CPU operator.

The user's model is a stock `get_peft_model(model, LoraConfig(target_modules=[...],
target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))`. PEFT wraps each experts
module in `lora.ParamWrapper`s; here each wrapped experts module that the placement puts on the CPU
operator becomes a `KTExperts` holding the same weights in host memory and the same LoRA factors (converted
to our layout), while every other PEFT layer (attention LoRA, experts the placement leaves to transformers)
stays PEFT's. The new module saves and loads its LoRA under PEFT's keys, so `model.save_pretrained` writes an
adapter that stock PEFT loads onto the plain transformers model; PEFT's merge, unload, adapter switch and
trainable marking reach it through patches.py.

Which experts go to the CPU operator is decided once:
- a model kt_core built or converted (`load_model`, `convert_model`: it carries `kt_placement`) keeps that
  placement; the experts it put on the CPU operator are KTExperts already and only take their LoRA over;
- any other model (plain transformers, wrapped by PEFT) is placed here, with `rules` (None: the family's
  defaults), on transformers' own experts classes once PEFT's wrappers are off.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from kt_core.distributed import prepare_data_parallel
from kt_core.experts import KTExperts
from kt_core.loading.convert import convert_model
from kt_core.peft.attach import install_peft_state_dict_hooks, load_expert_lora_
from kt_core.peft.patches import (
    keep_expert_lora_trainable,
    route_adapter_state_dict,
    route_adapter_switch,
    route_merge_and_unload,
)
from kt_core.peft.wrappers import is_peft_param_wrapper, take_over_peft_experts
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
    """Puts the routed experts of a (PEFT-wrapped) transformers MoE model, with their LoRA, on `KTExperts`, in place.

    Call it before building the Trainer when the model does not fit on the GPU: the Trainer moves the
    model to its device in `__init__`, and `KTExperts` stays in host memory whatever `.to()` asks.

    Args:
        model: a `PeftModel` (or a plain transformers model) of a registered MoE family.
        rules: placement rules of a model not placed yet (None: the family's defaults, every experts module
            on the CPU operator).
        kernel: CPU kernel of the experts built here ("auto": the best this CPU runs).
        cpu_infer: CPU threads of the experts operator built here.
        device: where the non-expert tensors of a model not placed yet go; None leaves them where they are.

    Returns:
        `model`, converted.

    Raises:
        ValueError: `rules` or `device` given for a model kt_core placed already: they cannot take effect
            there (give them to `load_model` / `convert_model`).
    """
    if is_prepared(model):
        return model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    placed = getattr(base, "kt_placement", None) is not None  # set by load_model / convert_model
    if placed and (rules is not None or device is not None):
        given = " and ".join(name for name, value in (("rules", rules), ("device", device)) if value is not None)
        raise ValueError(
            f"take_over_peft_model: {given} given, but kt_core placed this model already (load_model / "
            f"convert_model) and its placement stands; pass {given} there instead"
        )
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
    on_cpu = 0
    with torch.random.fork_rng(devices=[]):
        if not placed:
            convert_model(base, rules=rules, kernel=kernel, cpu_infer=cpu_infer, device=device)
        for name, peft_lora in taken.items():
            module = base.get_submodule(name)
            if isinstance(module, KTExperts):
                load_expert_lora_(module, peft_lora)
                install_peft_state_dict_hooks(module, peft_lora.chain, adapter, swapped=peft_lora.swapped)
                on_cpu += 1
            else:  # the placement left these experts to transformers: PEFT keeps computing their LoRA
                parent_name, _, attr = name.rpartition(".")
                setattr(base.get_submodule(parent_name), attr, wrappers[name])
    logger.info(
        "%d experts modules with PEFT LoRA now run on the CPU operator, %d stay transformers' (placement %s)",
        on_cpu,
        len(taken) - on_cpu,
        "kept from load_model / convert_model" if placed else "planned now",
    )
    route_merge_and_unload(model)
    route_adapter_switch(model)
    keep_expert_lora_trainable(model)
    route_adapter_state_dict(model)
    prepare_data_parallel(model)  # DDP (torchrun) ignores the experts; their LoRA gradients are averaged over gloo
    model.kt_prepared = True
    return model


def expert_lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Returns the trainable expert-LoRA factors of every KTExperts in `model`."""
    return [
        p
        for m in model.modules()
        if isinstance(m, KTExperts) and m.lora is not None
        for p in m.lora.parameters()
        if p.requires_grad
    ]

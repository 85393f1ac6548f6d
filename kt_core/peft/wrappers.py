"""PEFT's `lora.ParamWrapper`s around one experts module: recognized, unwrapped, their LoRA converted.

Targeting both parameters of one experts module nests two wrappers (see keys.py); `take_over_peft_experts`
walks them from the outermost one and records the nesting it finds as `chain`:
    ...mlp.experts              ParamWrapper(down_proj)       chain[0]
    ...mlp.experts.base_layer   ParamWrapper(gate_up_proj)    chain[1]
    ...mlp.experts.base_layer.base_layer                      the transformers experts module

kt_core does not import peft: wrappers are recognized by their attributes.

Legend: E = experts, H = hidden, I = expert intermediate, r = rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kt_core.peft.layout import EXPERT_PARAMETERS, expert_factors_from_peft, peft_layout_swapped

__all__ = ["PeftExpertLoRA", "is_peft_param_wrapper", "take_over_peft_experts"]


def is_peft_param_wrapper(module: nn.Module) -> bool:
    """Returns whether `module` is PEFT's LoRA wrapper of a parameter (`lora.ParamWrapper`)."""
    return (
        isinstance(getattr(module, "parameter_name", None), str)
        and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
        and isinstance(getattr(module, "base_layer", None), nn.Module)
    )


@dataclass
class PeftExpertLoRA:
    """The LoRA that PEFT put on one experts module, in our layout.

    Attributes:
        chain: the wrapped parameter names, outermost wrapper first (the state-dict nesting).
        factors: {"gate_up_A": [E, r, H], ...} for the targeted parameters only.
        rank: r.
        scaling: the LoRA scaling (alpha / r, or alpha / sqrt(r) with rsLoRA).
        swapped: PEFT's factor layout is the in/out-swapped one of PEFT >= 0.19.
    """

    chain: list[str]
    factors: dict[str, torch.Tensor]
    rank: int
    scaling: float
    swapped: bool = False


def take_over_peft_experts(wrapper: nn.Module, adapter_name: str = "default") -> tuple[nn.Module, PeftExpertLoRA]:
    """Unwraps PEFT's ParamWrappers around an experts module and converts their LoRA.

    Args:
        wrapper: the outermost ParamWrapper (what sits at `...mlp.experts` after `get_peft_model`).
        adapter_name: the adapter to take.

    Returns:
        (the transformers experts module, its LoRA in our layout).
    """
    chain: list[str] = []
    factors: dict[str, torch.Tensor] = {}
    ranks, scalings, layouts = set(), set(), set()
    module = wrapper
    while is_peft_param_wrapper(module):
        name = module.parameter_name
        if name not in EXPERT_PARAMETERS:
            raise ValueError(
                f"PEFT expert LoRA: target parameter {name!r} of {type(module.get_base_layer()).__name__} is not "
                f"one of {sorted(EXPERT_PARAMETERS)}"
            )
        if adapter_name not in module.lora_A:
            raise ValueError(f"PEFT expert LoRA: no adapter {adapter_name!r} on {name} (has {list(module.lora_A)})")
        if getattr(module, "merged_adapters", None):
            raise ValueError(f"PEFT expert LoRA: adapter merged into {name}; unmerge it first")
        chain.append(name)
        r = module.r[adapter_name]
        ranks.add(r)
        scalings.add(module.scaling[adapter_name])
        swapped = peft_layout_swapped(module)
        layouts.add(swapped)
        a_name, b_name = EXPERT_PARAMETERS[name]
        factors[a_name], factors[b_name] = expert_factors_from_peft(
            module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight, module.num_experts, swapped=swapped
        )
        module = module.base_layer
    if not chain:
        raise TypeError(f"PEFT expert LoRA: {type(wrapper).__name__} is not a PEFT ParamWrapper")
    if len(ranks) > 1 or len(scalings) > 1:
        raise ValueError(
            "PEFT expert LoRA: gate_up_proj and down_proj of one experts module must share rank and alpha "
            f"(got ranks {sorted(ranks)}, scalings {sorted(scalings)}); drop them from rank_pattern / alpha_pattern"
        )
    if len(layouts) > 1:
        raise ValueError("PEFT expert LoRA: the wrappers of one experts module use different factor layouts")
    lora = PeftExpertLoRA(chain=chain, factors=factors, rank=ranks.pop(), scaling=scalings.pop(), swapped=layouts.pop())
    return module, lora

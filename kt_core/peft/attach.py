"""PEFT's expert LoRA on a KTExperts: attached, saved and loaded under PEFT's keys, merged, dropped.

A KTExperts that took over PEFT's LoRA remembers where it came from (`kt_peft_chain`: the wrapped parameters,
outermost first; `kt_peft_adapter`; `kt_peft_swapped`: the factor layout), so that its state dict holds the
keys and tensors the ParamWrappers it replaced would hold, and PEFT's save / load / merge paths (patches.py)
find it.

Legend: E = experts, H = hidden, I = expert intermediate, r = rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch
from torch import nn

from kt_core.experts import KTExperts
from kt_core.lora import ExpertLoRA
from kt_core.peft.keys import lora_key, parse_lora_key
from kt_core.peft.layout import EXPERT_PARAMETERS, expert_factors_from_peft, expert_factors_to_peft
from kt_core.peft.wrappers import PeftExpertLoRA

__all__ = [
    "expert_lora_to_peft_state_dict",
    "install_peft_state_dict_hooks",
    "load_expert_lora_",
    "merge_expert_lora_",
    "peft_lora_experts",
    "unload_expert_lora_",
]


def load_expert_lora_(experts: KTExperts, peft_lora: PeftExpertLoRA) -> ExpertLoRA:
    """Attaches LoRA factors to `experts`; factors of untargeted parameters stay zero and frozen.

    Args:
        experts: the CPU operator module.
        peft_lora: from `take_over_peft_experts`.

    Returns:
        The new ExpertLoRA.
    """
    # ExpertLoRA scales by alpha / rank: carry PEFT's scaling (rsLoRA included) through alpha.
    lora = experts.add_lora(peft_lora.rank, peft_lora.scaling * peft_lora.rank)
    with torch.no_grad():
        for param_name, (a_name, b_name) in EXPERT_PARAMETERS.items():
            A, B = getattr(lora, a_name), getattr(lora, b_name)
            if param_name in peft_lora.chain:
                A.copy_(peft_lora.factors[a_name])
                B.copy_(peft_lora.factors[b_name])
            else:
                A.zero_()
                B.zero_()
                A.requires_grad_(False)
                B.requires_grad_(False)
    return lora


def expert_lora_to_peft_state_dict(
    lora: ExpertLoRA,
    chain: Sequence[str],
    *,
    prefix: str = "",
    adapter_name: str | None = None,
    swapped: bool = False,
) -> dict[str, torch.Tensor]:
    """Our factors as the state-dict entries PEFT has for the same LoRA.

    Args:
        lora: the factors.
        chain: targeted parameter names, outermost wrapper first (`PeftExpertLoRA.chain`; for both
            parameters PEFT 0.18.1 nests ["down_proj", "gate_up_proj"]).
        prefix: the experts module's name plus ".", e.g. "base_model.model.model.layers.1.mlp.experts.".
        adapter_name: None for the saved-adapter keys (`...lora_A.weight`), else the in-memory ones
            (`...lora_A.default.weight`).
        swapped: write the layout of PEFT >= 0.19.

    Returns:
        {key: tensor}, lora_A and lora_B per targeted parameter (see `expert_factors_to_peft`).
    """
    state = {}
    for param_name in chain:
        a_name, b_name = EXPERT_PARAMETERS[param_name]
        lora_A, lora_B = expert_factors_to_peft(getattr(lora, a_name), getattr(lora, b_name), swapped=swapped)
        depth = list(chain).index(param_name)  # the outermost wrapper has no `base_layer.`
        state[prefix + lora_key(depth, "A", adapter_name)] = lora_A
        state[prefix + lora_key(depth, "B", adapter_name)] = lora_B
    return state


def install_peft_state_dict_hooks(
    experts: KTExperts, chain: Sequence[str], adapter_name: str = "default", *, swapped: bool = False
) -> None:
    """Makes `experts` save and load its LoRA under PEFT's keys, as the ParamWrappers it replaced did.

    `state_dict()` then holds `...experts.[base_layer.]lora_{A,B}.<adapter>.weight` instead of
    `...experts.lora.*`, so PEFT's `get_peft_model_state_dict` / `save_pretrained` write a stock adapter,
    and `load_state_dict` (PEFT's `load_adapter`, a Trainer resume) reads one back into our factors.

    Args:
        experts: a KTExperts with LoRA attached.
        chain: targeted parameter names, outermost wrapper first.
        adapter_name: the adapter the keys carry.
        swapped: PEFT's factor layout is the in/out-swapped one of PEFT >= 0.19.
    """
    chain = list(chain)
    experts.kt_peft_chain = chain
    experts.kt_peft_adapter = adapter_name
    experts.kt_peft_swapped = swapped

    def save_hook(module, state_dict, prefix, local_metadata):
        if module.lora is None:
            return
        for name in ("gate_up_A", "gate_up_B", "down_A", "down_B"):
            state_dict.pop(f"{prefix}lora.{name}", None)
        state_dict.update(
            expert_lora_to_peft_state_dict(
                module.lora, chain, prefix=prefix, adapter_name=adapter_name, swapped=swapped
            )
        )

    def load_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if module.lora is None:
            return
        found: dict[tuple[str, str], torch.Tensor] = {}
        for key in [k for k in state_dict if k.startswith(prefix)]:
            parsed = parse_lora_key(key[len(prefix) :])
            if parsed is None or parsed.module or (parsed.adapter or adapter_name) != adapter_name:
                continue
            if parsed.depth >= len(chain):
                continue
            found[(chain[parsed.depth], parsed.which)] = state_dict.pop(key)
        for param_name in chain:
            a_name, b_name = EXPERT_PARAMETERS[param_name]
            if (param_name, "A") in found and (param_name, "B") in found:
                A, B = expert_factors_from_peft(
                    found[(param_name, "A")], found[(param_name, "B")], module.num_experts, swapped=swapped
                )
                state_dict[f"{prefix}lora.{a_name}"] = A
                state_dict[f"{prefix}lora.{b_name}"] = B
        for param_name, (a_name, b_name) in EXPERT_PARAMETERS.items():
            if param_name not in chain:  # untargeted factors are not saved: keep the zeros
                for name in (a_name, b_name):
                    state_dict.setdefault(f"{prefix}lora.{name}", getattr(module.lora, name).detach().clone())

    experts.register_state_dict_post_hook(save_hook)
    experts.register_load_state_dict_pre_hook(load_hook)
    # torch.distributed.checkpoint (accelerate's FSDP2 get_state_dict, the Trainer's save under FSDP2) resolves every
    # state-dict key as an attribute path from the root; the PEFT keys above name no attribute of KTExperts, so its
    # `_fqn_modifiers` hook sends the walk through a tree of the same names.
    experts.kt_peft_keys = _peft_key_tree(len(chain), adapter_name)
    experts._fqn_modifiers = _peft_fqn_modifiers


def _peft_key_tree(depth: int, adapter_name: str) -> SimpleNamespace:
    """`[base_layer.]*lora_{A,B}.<adapter>.weight` as attributes, `depth` wrappers deep."""
    tree = None
    for _ in range(depth):
        node = SimpleNamespace(
            **{which: SimpleNamespace(**{adapter_name: SimpleNamespace(weight=None)}) for which in ("lora_A", "lora_B")}
        )
        if tree is not None:
            node.base_layer = tree
        tree = node
    return tree


def _peft_fqn_modifiers() -> dict[str, str]:
    return {"lora_A": "kt_peft_keys", "lora_B": "kt_peft_keys", "base_layer": "kt_peft_keys"}


def _drop_lora(experts: KTExperts) -> None:
    experts.lora = None
    for attr in ("kt_peft_chain", "kt_peft_adapter", "kt_peft_swapped"):
        experts.__dict__.pop(attr, None)


def merge_expert_lora_(experts: KTExperts) -> None:
    """Folds the expert LoRA of `experts` into its base weights and removes the LoRA, in place.

    Each projection W [E, out, in] becomes W + scaling * B @ A, summed in fp32 and stored in W's dtype,
    as PEFT's `merge_and_unload` does for a ParamWrapper. The weights are replaced by new tensors, so the
    CPU operator re-reads (and re-packs) them on its next call. The state dict then holds plain
    transformers keys (`gate_up_proj`, `down_proj`) and no LoRA.

    Args:
        experts: a KTExperts, with or without LoRA (without: nothing to do).
    """
    lora = experts.lora
    if lora is None:
        return
    experts.restore_host_weights()  # released once packed: written back from the packed copy first
    with torch.no_grad():
        for param_name, (a_name, b_name) in EXPERT_PARAMETERS.items():
            A, B = getattr(lora, a_name), getattr(lora, b_name)
            if not A.requires_grad and not bool(B.abs().amax() > 0):  # untargeted: zero factors
                continue
            W = getattr(experts, param_name)
            merged = W.float() + lora.scaling * torch.bmm(B, A)  # [E, out, in]
            setattr(experts, param_name, nn.Parameter(merged.to(W.dtype).contiguous(), requires_grad=False))
    _drop_lora(experts)


def unload_expert_lora_(experts: KTExperts) -> None:
    """Removes the expert LoRA of `experts` without merging it (the base weights are left as they are)."""
    _drop_lora(experts)


def peft_lora_experts(model: nn.Module) -> list[KTExperts]:
    """The KTExperts in `model` that hold LoRA taken over from PEFT."""
    return [m for m in model.modules() if isinstance(m, KTExperts) and getattr(m, "kt_peft_chain", None)]

"""Expert LoRA in PEFT's own format: LoRA on fused expert parameters (`LoraConfig(target_parameters=...)`).

PEFT's `lora.ParamWrapper` wraps a 3-D parameter P [E, d1, d2] with nn.Linear factors whose layout
depends on the PEFT release:

PEFT <= 0.18 (d1 taken as in_features):
    lora_A.weight [r*E, d1]  (viewed [E, r, d1])      lora_B.weight [d2, r*E]  (viewed [d2, r, E])
    delta[e] = scaling * lora_A[e].T @ lora_B[:, :, e].T        # [d1, d2]
PEFT >= 0.19 (in/out swapped for `gate_up_proj` / `down_proj`, marked by `_did_swap_in_out_features`):
    lora_A.weight [r*E, d2]  (viewed [E, r, d2])      lora_B.weight [d1, r*E]  (viewed [d1, r, E])
    delta[e] = scaling * lora_B[:, :, e] @ lora_A[e]            # [d1, d2]

Ours (`kt_core.lora.ExpertLoRA`) holds, for W [E, out, in] used as y = W[e] @ x,
    A [E, r, in] (applied first), B [E, out, r]: delta[e] = scaling * B[e] @ A[e]
Transformers' experts use P = W (gate_up_proj [E, 2I, H], down_proj [E, H, I]), so d1 = out, d2 = in and
    <= 0.18: B[e] = lora_A[e].T,  A[e] = lora_B[:, :, e].T
    >= 0.19: B[e] = lora_B[:, :, e],  A[e] = lora_A[e]
The layout is read off each wrapper (`swapped`) and kept with the converted module, so an adapter is saved
in the layout of the PEFT that created it.

Targeting both parameters of one experts module nests two wrappers; the one created first is the inner
one, so its state-dict keys carry one more `base_layer.`. PEFT wraps gate_up_proj first whatever the order
of `target_parameters`, and `take_over_peft_experts` records the nesting it finds:
    ...mlp.experts.base_layer.lora_A.<adapter>.weight   (first target, e.g. gate_up_proj)
    ...mlp.experts.lora_A.<adapter>.weight              (second target, e.g. down_proj)

kt_core does not import peft: wrappers are recognized by their attributes.

Legend: E = experts, H = hidden, I = expert intermediate, r = rank.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kt_core.experts import KTExperts
from kt_core.lora import ExpertLoRA

__all__ = [
    "EXPERT_PARAMETERS",
    "PEFT_LORA_KEY",
    "PeftExpertLoRA",
    "expert_factors_from_peft",
    "expert_factors_to_peft",
    "expert_lora_to_peft_state_dict",
    "ignore_peft_layer_warning",
    "install_peft_state_dict_hooks",
    "is_peft_param_wrapper",
    "load_expert_lora_",
    "merge_expert_lora_",
    "peft_layer_warning_filtered",
    "peft_layout_swapped",
    "peft_scaling",
    "take_over_peft_experts",
    "unload_expert_lora_",
]

# Fused parameter of a transformers experts module -> the ExpertLoRA factors that carry its update.
EXPERT_PARAMETERS = {"gate_up_proj": ("gate_up_A", "gate_up_B"), "down_proj": ("down_A", "down_B")}


def _peft_layer_warning() -> str:
    # PEFT's LoraLayer reads in/out features of the wrapped module through `_get_in_out_features`, which
    # knows only linear-like layers and warns "Unsupported layer type ... proceed at your own risk" for any
    # other (peft/tuners/tuners_utils.py). A ParamWrapper around KTExperts takes its features from the
    # targeted parameter's shape instead, and kt_core then takes its LoRA over: the warning does not apply.
    return re.escape(f"Unsupported layer type '{KTExperts}' encountered")


@contextlib.contextmanager
def peft_layer_warning_filtered() -> Iterator[None]:
    """Within the block, PEFT's "Unsupported layer type" warning is not shown for KTExperts (only for it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_peft_layer_warning(), category=UserWarning)
        yield


def ignore_peft_layer_warning() -> None:
    """Process-wide: PEFT's "Unsupported layer type" warning is not shown for KTExperts (only for it).

    Installed by kt_core.load_model / convert_model, after which the user's own `get_peft_model` wraps the
    KTExperts parameters; every other layer type keeps PEFT's warning.
    """
    warnings.filterwarnings("ignore", message=_peft_layer_warning(), category=UserWarning)


def peft_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """Returns PEFT's LoRA scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def expert_factors_from_peft(
    lora_A: torch.Tensor, lora_B: torch.Tensor, num_experts: int, *, swapped: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Converts PEFT's ParamWrapper weights of one fused parameter into our factors.

    Args:
        lora_A: PEFT `lora_A.weight`: [r*E, d1] (d1 = our out), or [r*E, d2] when `swapped`.
        lora_B: PEFT `lora_B.weight`: [d2, r*E] (d2 = our in), or [d1, r*E] when `swapped`.
        num_experts: E.
        swapped: the layout of PEFT >= 0.19 (`ParamWrapper._did_swap_in_out_features`).

    Returns:
        (A [E, r, d2], B [E, d1, r]), contiguous fp32 copies on the CPU.
    """
    E = num_experts
    rE = lora_A.shape[0]
    if lora_A.dim() != 2 or lora_B.dim() != 2 or rE % E or lora_B.shape[1] != rE:
        raise ValueError(
            f"PEFT expert LoRA: expected lora_A [r*E, d] and lora_B [d', r*E] with E = {E}, "
            f"got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}"
        )
    r = rE // E
    cpu32 = {"device": "cpu", "dtype": torch.float32}
    if swapped:
        d2, d1 = lora_A.shape[1], lora_B.shape[0]
        A = lora_A.detach().reshape(E, r, d2).to(**cpu32).contiguous()  # [E, r, d2]
        B = lora_B.detach().reshape(d1, r, E).permute(2, 0, 1).to(**cpu32).contiguous()  # [E, d1, r]
    else:
        d1, d2 = lora_A.shape[1], lora_B.shape[0]
        A = lora_B.detach().reshape(d2, r, E).permute(2, 1, 0).to(**cpu32).contiguous()  # [E, r, d2]
        B = lora_A.detach().reshape(E, r, d1).transpose(1, 2).to(**cpu32).contiguous()  # [E, d1, r]
    return A, B


def expert_factors_to_peft(
    A: torch.Tensor, B: torch.Tensor, *, swapped: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Converts our factors of one fused parameter into PEFT's ParamWrapper weights.

    Args:
        A: [E, r, in].
        B: [E, out, r].
        swapped: the layout of PEFT >= 0.19 (`ParamWrapper._did_swap_in_out_features`).

    Returns:
        (lora_A.weight, lora_B.weight), new contiguous tensors: [r*E, out] and [in, r*E], or
        [r*E, in] and [out, r*E] when `swapped`.
    """
    E, r, d_in = A.shape
    d_out = B.shape[1]
    if swapped:
        lora_A = A.detach().reshape(E * r, d_in).clone()  # [r*E, in]
        lora_B = B.detach().permute(1, 2, 0).reshape(d_out, r * E).clone()  # [out, r*E]
    else:
        lora_A = B.detach().transpose(1, 2).reshape(E * r, d_out).clone()  # [r*E, out]
        lora_B = A.detach().permute(2, 1, 0).reshape(d_in, r * E).clone()  # [in, r*E]
    return lora_A, lora_B


def peft_layout_swapped(wrapper: nn.Module) -> bool:
    """Returns whether a ParamWrapper uses the in/out-swapped factor layout of PEFT >= 0.19."""
    return bool(getattr(wrapper, "_did_swap_in_out_features", False))


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


def _peft_key(chain: Sequence[str], param_name: str, which: str, adapter_name: str | None) -> str:
    depth = list(chain).index(param_name)  # the outermost wrapper has no `base_layer.`
    adapter = f".{adapter_name}" if adapter_name else ""
    return f"{'base_layer.' * depth}lora_{which}{adapter}.weight"


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
        state[prefix + _peft_key(chain, param_name, "A", adapter_name)] = lora_A
        state[prefix + _peft_key(chain, param_name, "B", adapter_name)] = lora_B
    return state


# A PEFT LoRA key below an experts module: [base_layer.]*lora_{A,B}[.<adapter>].weight
PEFT_LORA_KEY = re.compile(r"^((?:base_layer\.)*)lora_([AB])\.(?:([^.]+)\.)?weight$")


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
            match = PEFT_LORA_KEY.match(key[len(prefix) :])
            if match is None or (match.group(3) or adapter_name) != adapter_name:
                continue
            depth = len(match.group(1)) // len("base_layer.")
            if depth >= len(chain):
                continue
            found[(chain[depth], match.group(2))] = state_dict.pop(key)
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

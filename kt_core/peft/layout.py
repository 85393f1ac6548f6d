"""PEFT's expert LoRA layout <-> ours: LoRA on fused expert parameters (`LoraConfig(target_parameters=...)`).

PEFT's `lora.ParamWrapper` wraps a 3-D parameter P [E, d1, d2] with nn.Linear factors whose layout
depends on the PEFT release:

PEFT 0.18 (d1 taken as in_features):
    lora_A.weight [r*E, d1]  (viewed [E, r, d1])      lora_B.weight [d2, r*E]  (viewed [d2, r, E])
    delta[e] = scaling * lora_A[e].T @ lora_B[:, :, e].T        # [d1, d2]
PEFT >= 0.19 (in/out swapped for `gate_up_proj` / `down_proj`, marked by `_did_swap_in_out_features`):
    lora_A.weight [r*E, d2]  (viewed [E, r, d2])      lora_B.weight [d1, r*E]  (viewed [d1, r, E])
    delta[e] = scaling * lora_B[:, :, e] @ lora_A[e]            # [d1, d2]

Ours (`kt_core.ExpertLoRA`) holds, for W [E, out, in] used as y = W[e] @ x,
    A [E, r, in] (applied first), B [E, out, r]: delta[e] = scaling * B[e] @ A[e]
Transformers' experts use P = W (gate_up_proj [E, 2I, H], down_proj [E, H, I]), so d1 = out, d2 = in and
    0.18:  B[e] = lora_A[e].T,  A[e] = lora_B[:, :, e].T
    >= 0.19: B[e] = lora_B[:, :, e],  A[e] = lora_A[e]
The layout is read off each wrapper (`swapped`) and kept with the converted module, so an adapter is saved
in the layout of the PEFT that created it. An adapter folder tells its layout by the PEFT release that saved
it, `peft_version` in adapter_config.json (`peft_version_layout_swapped`): shapes cannot, as the two layouts
give both tensors the same shapes when H == 2*I (gate_up_proj) or H == I (down_proj).

Which release writes which layout (PEFT's tuners/lora/layer.py, `ParamWrapper.update_layer`; config.py for
`peft_version`): 0.17.x - 0.18.1 never swap, and 0.17.x records no `peft_version`; from 0.19.0 on (checked up to
0.21.2) every 3-D parameter is swapped unless its experts module is `is_transposed`, which KTExperts refuses.

Legend: E = experts, H = hidden, I = expert intermediate, r = rank.
"""

from __future__ import annotations

import math

import torch
from packaging.version import InvalidVersion, Version
from torch import nn

__all__ = [
    "EXPERT_PARAMETERS",
    "SWAPPED_SINCE",
    "expert_factors_from_peft",
    "expert_factors_to_peft",
    "peft_layout_swapped",
    "peft_scaling",
    "peft_version_layout_swapped",
]

# Fused parameter of a transformers experts module -> the ExpertLoRA factors that carry its update.
EXPERT_PARAMETERS = {"gate_up_proj": ("gate_up_A", "gate_up_B"), "down_proj": ("down_A", "down_B")}

# The first PEFT release that saves expert LoRA in the in/out-swapped layout.
SWAPPED_SINCE = "0.19.0"


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


def peft_version_layout_swapped(peft_version: str) -> bool | None:
    """Returns whether PEFT `peft_version` saves expert LoRA in the swapped layout, or None when it cannot tell.

    Args:
        peft_version: as PEFT records it in adapter_config.json: "0.18.1"; a development build adds "@<commit>".

    Returns:
        True from 0.19.0 on; False before it; None for a string that is no version, and for a development or
        pre-release build after 0.18.0 and before 0.19.0 (the swap landed on PEFT's main branch in between).
    """
    try:
        version = Version(peft_version.partition("@")[0])
    except InvalidVersion:
        return None
    if version >= Version(SWAPPED_SINCE):
        return True
    if version.is_prerelease and version > Version("0.18.0"):
        return None  # built from PEFT's main branch between the releases: before or after the swap
    return False

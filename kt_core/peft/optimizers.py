"""Optimizers whose update of a parameter depends on its shape see a different expert LoRA than PEFT's.

The expert-LoRA factors live in the operator's layout, one matrix per expert ([E, r, H], [E, 2I, r], ...),
while PEFT holds them as one 2-D matrix per projection ([r*E, H], [2I, r*E], ...). Element-wise optimizers
(AdamW in every implementation, SGD, Adagrad, bitsandbytes' 8-bit AdamW) update every element the same way
in both layouts, so the loss curve is stock PEFT's. Optimizers that factor or orthogonalise a parameter by its
shape (Adafactor's row / column moments, GaLore and APOLLO projections, Muon) compute other updates: through
the stock Trainer, Adafactor moved the 8-step curve of the tiny test model by 0.5% relative.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["SHAPE_DEPENDENT_OPTIMIZERS", "warn_if_shape_dependent"]

logger = logging.getLogger("kt_core.peft")

# Optimizer class names (transformers, torch, galore-torch, apollo-torch, bitsandbytes' paged variants share
# the AdamW update and are not listed).
SHAPE_DEPENDENT_OPTIMIZERS = ("Adafactor", "GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreAdafactor", "APOLLOAdamW", "Muon")


def warn_if_shape_dependent(optimizer: torch.optim.Optimizer | None, expert_lora: list[torch.Tensor]) -> bool:
    """Warns (once per call) when `optimizer` updates expert-LoRA factors by their shape; returns whether it did."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the user's optimizer
    name = type(inner).__name__
    if not expert_lora or name not in SHAPE_DEPENDENT_OPTIMIZERS:
        return False
    held = {id(p) for group in getattr(inner, "param_groups", ()) for p in group["params"]}
    if not any(id(p) in held for p in expert_lora):
        return False
    logger.warning(
        "%s updates a parameter according to its shape, and kt-plugins holds the expert-LoRA factors one "
        "matrix per expert, not as PEFT's one matrix per projection: the expert-LoRA updates, and so the loss "
        "curve, differ from stock PEFT's. An element-wise optimizer (adamw_torch_fused, the default; adamw_torch; "
        "sgd; adagrad) gives PEFT's curve.",
        name,
    )
    return True

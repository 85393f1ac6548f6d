"""`convert_model`: swap the routed experts of an already-loaded transformers model for the CPU operator.

For models loaded by other means (`AutoModelForCausalLM.from_pretrained`, a Trainer's model): the
experts modules the rules place on an expert backend are rebuilt around the same weights in host
memory (zero-copy when they already are CPU-contiguous), and their device copies are released.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from kt_core.architectures import get_architecture
from kt_core.loading.loader import _expect_peft, apply_devices, plan_placement, resolve_devices
from kt_core.placement import PlacementRule

__all__ = ["convert_model"]

logger = logging.getLogger(__name__)


def _first_device(model: nn.Module) -> str:
    for p in model.parameters():
        if p.device.type != "meta":
            return str(p.device)
    return "cpu"


def convert_model(
    model: nn.Module,
    *,
    rules: str | Path | Sequence[PlacementRule] | None = None,
    kernel: str = "auto",
    cpu_infer: int | None = None,
    device: str | torch.device | Sequence[str] | None = None,
) -> nn.Module:
    """Replaces the experts modules of `model` in place and returns it.

    Args:
        model: a transformers MoE causal LM of a registered family.
        rules: placement rules (None: the family's defaults, experts on the CPU operator).
        kernel: CPU kernel of the experts.
        cpu_infer: CPU threads of the experts operator.
        device: where the non-expert tensors go afterwards; None leaves them where they are. A list
            splits the decoder layers over those devices.
    """
    arch = get_architecture(model.config)
    devices = resolve_devices(device) if device is not None else [_first_device(model)]
    plan = plan_placement(model, rules, arch, devices, kernel=kernel, cpu_infer=cpu_infer)
    for name, placement in plan.experts.items():
        experts = model.get_submodule(name)
        if isinstance(experts, placement.cls):
            continue
        options = dict(placement.options)
        if experts.gate_up_proj.dtype not in (torch.bfloat16, torch.float32):
            options.setdefault("dtype", torch.bfloat16)
        store = placement.cls.from_module(experts, **options)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, store)
    logger.info("converted %d experts modules of %s", len(plan.experts), type(model).__name__)
    if device is not None:
        backend_types = tuple({p.cls for p in plan.experts.values()})
        model.kt_device_hooks = apply_devices(model, plan, skip=backend_types)
    model.kt_placement = plan
    _expect_peft()
    return model

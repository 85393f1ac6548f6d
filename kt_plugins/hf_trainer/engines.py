"""The data-parallel engines' part of a Trainer callback, shared by KTCallback and LLaMA-Factory's training callback.

Both Trainers are the stock Hugging Face one; what the routed experts need from each engine happens at three of its
events:

- end of `Trainer.__init__` (`prepare_engines`): the experts leave FSDP2's sharding (its ignored params) or
  DeepSpeed's parameters (kt_core.distributed.prepare_fsdp2 / prepare_deepspeed), before the optimizer and the
  engine are built; nothing without either engine (DDP's part is its own: kt_core.distributed.ddp);
- train start (`attach_deepspeed`): under DeepSpeed the expert-LoRA factors get their own optimizer, stepped when
  ZeRO steps, and on a resume their values and optimizer state come from the checkpoint's `kt_expert_lora.pt`;
- each checkpoint (`save_engine_state`): rank 0 writes that file beside the Trainer's.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from kt_core.distributed import deepspeed_running, prepare_deepspeed, prepare_fsdp2
from kt_core.peft import warn_if_shape_dependent

__all__ = ["attach_deepspeed", "prepare_engines", "save_engine_state"]

logger = logging.getLogger(__name__)


def prepare_engines(model: nn.Module, args) -> None:
    """At the end of Trainer.__init__: the experts out of FSDP2's sharding or out of DeepSpeed, whichever runs."""
    prepare_fsdp2(model)  # nothing unless the Trainer's accelerator runs FSDP
    if deepspeed_running():
        ds_config = getattr(args, "hf_deepspeed_config", None)
        prepare_deepspeed(model, ds_config.config if ds_config is not None else None)


def attach_deepspeed(args, state, model: nn.Module, optimizer, *, caller: str) -> bool:
    """At train start: the factors' own optimizer beside DeepSpeed's, and their resume.

    Under DeepSpeed the Trainer's optimizer holds flat ZeRO partitions of the other parameters and none of the
    expert-LoRA factors (kept out of DeepSpeed, kt_core.distributed.deepspeed).

    Args:
        caller: the callback's name, for the errors.

    Returns:
        False when the model runs no DeepSpeed with expert LoRA (nothing done).
    """
    beside = getattr(model, "kt_deepspeed", None) if model is not None else None
    if beside is None or optimizer is None:
        return False
    ours = beside.attach(optimizer)
    held = {id(p) for group in ours.param_groups for p in group["params"]}
    inner = getattr(getattr(optimizer, "optimizer", optimizer), "optimizer", optimizer)
    in_deepspeed = {id(p) for group in inner.param_groups for p in group["params"]}
    trainable = beside.trainable
    if any(id(p) not in held or id(p) in in_deepspeed for p in trainable):
        raise ValueError(
            f"{caller}: under DeepSpeed the expert-LoRA factors must be out of DeepSpeed's optimizer and in their "
            "own; call kt_core.distributed.prepare_deepspeed(model) before the optimizer and the engine are built "
            "(the callback does at the end of Trainer.__init__)."
        )
    warn_if_shape_dependent(ours, trainable)
    if state.global_step > 0:  # the Trainer resumed from a checkpoint
        folder = args.resume_from_checkpoint
        if not isinstance(folder, str):
            folder = str(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        beside.load(folder)
        logger.info("expert LoRA and its optimizer state resumed from %s", folder)
    logger.info(
        "DeepSpeed: %d expert-LoRA factors stepped by their own %s, averaged over the ranks",
        len(trainable),
        type(ours).__name__,
    )
    return True


def save_engine_state(args, state, model: nn.Module) -> None:
    """At each checkpoint: the expert LoRA and its optimizer state kept beside DeepSpeed, written by rank 0."""
    beside = getattr(model, "kt_deepspeed", None) if model is not None else None
    if beside is not None and state.is_world_process_zero:
        beside.save(Path(args.output_dir) / f"checkpoint-{state.global_step}")

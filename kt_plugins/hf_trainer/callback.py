"""KTCallback: the Hugging Face Trainer with routed experts (and their LoRA) on the CPU.

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[KTCallback()])

`on_init_end` runs at the end of `Trainer.__init__`, before `train()` builds the optimizer, so the
optimizer sees the host-side expert-LoRA factors instead of the PEFT wrappers they replace. The Trainer
has already moved the model to its device by then: for a model larger than the GPU, call `kt_prepare`
on it before building the Trainer (the callback then finds it prepared).

Logged with every `logs` entry: `kt_tokens_per_s` (input tokens per second of training-step wall time)
and `kt_cpu_expert_share` (fraction of that time spent inside the experts operator: one forward and one
backward per layer and step, gradient checkpointing's recomputation not counted; kt_core.runtime.expert_time).

The arguments are checked when the callback is built (kt_core.settings); the errors name them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from kt_core import ExpertTimer, KTExperts, resolve_kernel
from kt_core import settings as checks
from kt_core.peft import warn_if_shape_dependent
from kt_core.placement import PlacementRule, resolve_rule_file
from kt_plugins.hf_trainer.convert import expert_lora_parameters, kt_prepare

__all__ = ["KTCallback"]

logger = logging.getLogger(__name__)


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's non-expert weights (the experts are in host memory whatever happens)."""
    for module in model.modules():
        if not isinstance(module, KTExperts):
            for p in module.parameters(recurse=False):
                return p.device
    return torch.device("cpu")


def _check_resume(args) -> None:
    """A broken checkpoint fails (or warns about) here, by name, not inside torch.load / safetensors.

    `TrainingArguments.resume_from_checkpoint`, when set, must be complete; otherwise the newest
    `checkpoint-N` of the output folder, which `train(resume_from_checkpoint=True)` would pick, is checked
    and a warning names the complete one to resume from.
    """
    from kt_core.loading import CheckpointError, check_training_checkpoint, last_good_checkpoint

    if isinstance(args.resume_from_checkpoint, str):
        check_training_checkpoint(args.resume_from_checkpoint)
        return
    output_dir = Path(args.output_dir) if args.output_dir else None
    if output_dir is None or not output_dir.is_dir():
        return
    steps = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    if not steps:
        return
    newest = max(steps, key=lambda p: int(p.name.split("-")[-1]))
    if last_good_checkpoint(output_dir) == newest:
        return
    try:
        check_training_checkpoint(newest)
    except CheckpointError as exc:
        logger.warning("KTCallback: %s. train(resume_from_checkpoint=True) would pick it.", exc)


class KTCallback(TrainerCallback):
    """Runs the routed experts of the Trainer's model, with their LoRA, on the CPU operator.

    Args:
        rules: placement rules (None: the family's defaults).
        kernel: CPU kernel of the experts ("auto": the best this CPU runs).
        cpu_infer: CPU threads of the experts operator.
        device: where the non-expert tensors go when the callback converts the model; None leaves them
            where the Trainer put them.
        log_speed: add `kt_tokens_per_s` and `kt_cpu_expert_share` to the Trainer's logs.
        expert_gpu_memory: GPU memory for expert weights only (streaming slots and resident experts). When
            set ("10GiB"), each MoE layer is split between CPU compute and GPU compute on PCIe-streamed
            weights (`kt_core.enable_streaming`); the logs then carry the CPU / PCIe / GPU time split. Needs
            a CUDA GPU, and the model on it. The rest of the model, activations and the loss come on top.
        gpu_memory_limit: the most GPU memory the whole run may hold, everything counted ("24GiB"). With
            `expert_gpu_memory`, the resident experts are sized from the first step's measured peak so the
            total stays under it (a warning names what to lower when the first step alone exceeds it).
        stream_quantize: None, or "int8" to halve the streamed bytes (see `kt_core.enable_streaming`).
        stream_keep_bytes: GPU bytes of a checkpointed layer's expert intermediates kept between its
            recomputation and its backward when streaming ("1GiB"; see `kt_core.enable_streaming`).
        loss: the causal-LM loss of training steps without [tokens x vocab] logits
            (`kt_core.loss.enable_efficient_loss`): "auto" (Liger-Kernel on CUDA when installed, our chunked
            loss otherwise), "liger", "cce", "chunked", or "off" (transformers' loss).
        gpu_memory_budget: the former name of `expert_gpu_memory` (accepted with a warning).
    """

    def __init__(
        self,
        *,
        rules: str | Path | Sequence[PlacementRule] | None = None,
        kernel: str = "auto",
        cpu_infer: int | None = None,
        device: str | torch.device | None = None,
        log_speed: bool = True,
        expert_gpu_memory: int | str | None = None,
        stream_quantize: str | None = None,
        stream_keep_bytes: int | str = "1GiB",
        loss: str | bool = "auto",
        gpu_memory_limit: int | str | None = None,
        gpu_memory_budget: int | str | None = None,
    ):
        from kt_core import normalize_loss_mode

        self.loss_mode = normalize_loss_mode(loss, key="KTCallback(loss)")
        self.efficient_loss = None  # kt_core.loss.EfficientLoss once attached
        cpu_infer = checks.cpu_threads("KTCallback(cpu_infer)", cpu_infer)
        log_speed = checks.boolean("KTCallback(log_speed)", log_speed)
        if not isinstance(kernel, str):
            raise checks.SettingError(f"KTCallback(kernel): got {kernel!r}, expected 'auto' or a kernel name")
        resolve_kernel(kernel)  # a kernel this CPU cannot run fails here, listing the ones it can
        if isinstance(rules, (str, Path)):
            resolve_rule_file(rules)  # a missing rule file fails here, listing the paths tried
        expert_gpu_memory = checks.renamed(
            "KTCallback(gpu_memory_budget)", gpu_memory_budget, "KTCallback(expert_gpu_memory)", expert_gpu_memory
        )
        checks.optional_size(gpu_memory_limit, "KTCallback(gpu_memory_limit)")
        if expert_gpu_memory is not None:
            checks.parse_size(expert_gpu_memory, "KTCallback(expert_gpu_memory)")
            checks.parse_size(stream_keep_bytes, "KTCallback(stream_keep_bytes)")
            checks.choice("KTCallback(stream_quantize)", stream_quantize, (None, "int8"))
            checks.require_cuda(
                "KTCallback(expert_gpu_memory)", expert_gpu_memory, "expert streaming computes on a CUDA GPU"
            )
        self.options = {"rules": rules, "kernel": kernel, "cpu_infer": cpu_infer, "device": device}
        self.log_speed = log_speed
        self.streaming_options = (
            {
                "expert_gpu_memory": expert_gpu_memory,
                "gpu_memory_limit": gpu_memory_limit,
                "quantize": stream_quantize,
                "keep_bytes": stream_keep_bytes,
            }
            if expert_gpu_memory is not None
            else None
        )
        self._streaming = None
        self._timer: ExpertTimer | None = None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("KTCallback: the Trainer passed no model to on_init_end")
        _check_resume(args)
        kt_prepare(model, **self.options)
        if self.streaming_options is not None and self._streaming is None:
            from kt_core import enable_streaming

            device = torch.device(self.options["device"] or _model_device(model))  # where the model computes
            if device.type != "cuda":
                raise checks.SettingError(
                    f"KTCallback(expert_gpu_memory): got {self.streaming_options['expert_gpu_memory']!r}, but the "
                    f"model computes on {device}: expert streaming computes on a CUDA GPU. Put the model on the "
                    "GPU (device='cuda', or the Trainer's default) or leave expert_gpu_memory out."
                )
            self._streaming = enable_streaming(model, device=device, **self.streaming_options)
        if self.loss_mode != "off" and self.efficient_loss is None:
            from kt_core import enable_efficient_loss

            self.efficient_loss = enable_efficient_loss(model, self.loss_mode)
        if self.log_speed and self._timer is None:
            self._timer = ExpertTimer(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if optimizer is not None and model is not None:
            in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
            factors = expert_lora_parameters(model)
            warn_if_shape_dependent(optimizer, factors)
            missing = [p for p in factors if id(p) not in in_optimizer]
            if missing:
                raise ValueError(
                    f"KTCallback: the optimizer does not hold {len(missing)} expert-LoRA factors; it was built "
                    "before the experts moved to the CPU operator. Call kt_prepare(model) before creating it."
                )
        if self._timer is not None:
            self._timer.start_steps()

    def on_step_end(self, args, state, control, **kwargs):
        if self._streaming is not None:
            self._streaming.end_step()
        if self._timer is not None:
            self._timer.end_step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        speed = self._timer.report() if self._timer is not None and logs is not None else None
        if speed is None:
            return
        report = self._streaming.last_report if self._streaming is not None else None
        if report:
            speed.update(
                kt_stream_cpu_ms=round(report["cpu_s"] * 1e3, 1),
                kt_stream_pcie_ms=round(report["pcie_s"] * 1e3, 1),
                kt_stream_gpu_ms=round(report["gpu_s"] * 1e3, 1),
                kt_stream_cpu_slot_share=round(report["cpu_slot_share"], 4),
            )
        # Callbacks after this one (the progress printer) see `logs`; the Trainer has already copied it
        # into the history, so update that entry too.
        logs.update(speed)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(speed)

    def on_train_end(self, args, state, control, **kwargs):
        if self._timer is not None:
            self._timer.stop_steps()

"""KTCallback: the Hugging Face Trainer with routed experts (and their LoRA) on the CPU.

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[KTCallback()])

`on_init_end` runs at the end of `Trainer.__init__`, before `train()` builds the optimizer, so the
optimizer sees the host-side expert-LoRA factors instead of the PEFT wrappers they replace. The Trainer
has already moved the model to its device by then: for a model larger than the GPU, call `kt_prepare`
on it before building the Trainer (the callback then finds it prepared).

Logged with every `logs` entry: `kt_tokens_per_s` (input tokens per second of training-step wall time)
and `kt_cpu_expert_share` (fraction of that time the CPU experts operator computed: one forward and one
backward per layer and step, gradient checkpointing's recomputation not counted; with streaming, the CPU
operator's own seconds, beside the per-step CPU / PCIe / GPU split; kt_core.speed_logs).

The arguments are checked when the callback is built (kt_core.settings); the errors name them.

GPU memory: before the experts stream (end of `Trainer.__init__`), the callback plans what the GPU will hold for
the whole run (kt_core.streaming.memory_plan: weights, LoRA state, streaming slots and residents, activations,
the loss) for `per_device_train_batch_size` sequences of `max_seq_length` tokens, logs the table, and refuses a
plan over `gpu_memory_limit` (or CUDA's free memory) with a MemoryPlanError naming what to change.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from kt_core import ExpertTimer, KTExperts, pack_experts, resolve_kernel, speed_logs, training_releases_weights
from kt_core import settings as checks
from kt_core.peft import warn_if_shape_dependent
from kt_core.placement import PlacementRule, resolve_rule_file
from kt_plugins.hf_trainer.convert import expert_lora_parameters, kt_prepare
from kt_plugins.hf_trainer.engines import attach_deepspeed, prepare_engines, save_engine_state

__all__ = ["KTCallback"]

logger = logging.getLogger(__name__)


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's non-expert weights (the experts are in host memory whatever happens)."""
    for module in model.modules():
        if not isinstance(module, KTExperts):
            for p in module.parameters(recurse=False):
                return p.device
    return torch.device("cpu")


def _on_device(t: torch.Tensor, device: torch.device) -> bool:
    return t.device == device


def _device_tensors(model: nn.Module, on_device) -> list[torch.Tensor]:
    """Parameters and buffers of `model` on the planned GPU, outside the routed experts (host memory)."""
    seen, out = set(), []
    for module in model.modules():
        if isinstance(module, KTExperts):
            continue
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if id(t) not in seen and on_device(t):
                seen.add(id(t))
                out.append(t)
    return out


def _compute_dtype(args, model: nn.Module) -> torch.dtype:
    """The activations' dtype: the Trainer's autocast (bf16 / fp16), else the weights'."""
    if getattr(args, "bf16", False):
        return torch.bfloat16
    if getattr(args, "fp16", False):
        return torch.float16
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


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
        expert_gpu_memory: GPU memory for the EXPERT WEIGHTS ONLY: the two streaming slots plus the resident
            experts ("10GiB"). Setting it turns streaming on: each MoE layer is split between CPU compute and
            GPU compute on PCIe-streamed weights (`kt_core.enable_streaming`); the logs then carry the CPU /
            PCIe / GPU time split. Needs a CUDA GPU, and the model on it. It is not a cap on the run: the
            non-expert weights, the LoRA state, the activations and the loss come on top of it.
        gpu_memory_limit: the most GPU memory the WHOLE RUN may hold, everything counted ("24GiB"): the weights,
            the LoRA state, expert_gpu_memory's slots and residents, the activations and the loss. The memory
            plan checks it before streaming allocates anything and refuses a run that does not fit, naming the
            setting to change and the value; with `expert_gpu_memory` the residents are trimmed to what fits.
            None: the free memory CUDA reports (plus what this process holds there already).
        max_seq_length: the longest sequence, in tokens, of a training batch, for the memory plan (with
            per_device_train_batch_size it gives the activations and the loss workspace). None: TRL's
            `args.max_length` / `args.max_seq_length` when the TrainingArguments have one; otherwise the plan
            leaves activations and the loss out (and says so in its table).
        stream_quantize: None, or "int8" to halve the streamed bytes (see `kt_core.enable_streaming`).
        stream_keep_bytes: GPU bytes of a checkpointed layer's expert intermediates kept between its
            recomputation and its backward when streaming ("1GiB"; see `kt_core.enable_streaming`).
        stream_mode: how streaming splits each layer: "auto" (the planner's cost model), "gpu" (every expert
            streamed and computed on the GPU), "cpu" (every expert on the CPU).
        stream_dequant_bytes: FP8 experts: GPU bytes of the bf16 buffer a group of streamed experts is
            dequantized into ("512MiB"; taken from expert_gpu_memory).
        loss: the causal-LM loss of training steps without [tokens x vocab] logits
            (`kt_core.loss.enable_efficient_loss`): "auto" (Liger-Kernel on CUDA when installed, our chunked
            loss otherwise), "liger", "cce", "chunked", or "off" (transformers' loss).
        keep_host_weights: keep the experts' weights in host RAM beside a packed kernel's copy. By default a bf16
            model's layers on amx_bf16 / avx512_bf16_packed free them once packed at train start
            (`kt_core.pack_experts(release=True)`): the packed forward and backward read only their own copy, so
            host RAM holds the experts once; merging the LoRA (`merge_and_unload`) writes them back first. Kept
            anyway with several ranks (a node's shared copy), under FSDP / DeepSpeed and for layers whose kernel
            reads them.
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
        stream_mode: str = "auto",
        stream_dequant_bytes: int | str = "512MiB",
        loss: str | bool = "auto",
        gpu_memory_limit: int | str | None = None,
        max_seq_length: int | None = None,
        keep_host_weights: bool = False,
        gpu_memory_budget: int | str | None = None,
    ):
        from kt_core import normalize_loss_mode

        self.loss_mode = normalize_loss_mode(loss, key="KTCallback(loss)")
        self.efficient_loss = None  # kt_core.loss.EfficientLoss once attached
        cpu_infer = checks.cpu_threads("KTCallback(cpu_infer)", cpu_infer)
        log_speed = checks.boolean("KTCallback(log_speed)", log_speed)
        self.keep_host_weights = checks.boolean("KTCallback(keep_host_weights)", keep_host_weights)
        if not isinstance(kernel, str):
            raise checks.SettingError(f"KTCallback(kernel): got {kernel!r}, expected 'auto' or a kernel name")
        resolve_kernel(kernel)  # a kernel this CPU cannot run fails here, listing the ones it can
        if isinstance(rules, (str, Path)):
            resolve_rule_file(rules)  # a missing rule file fails here, listing the paths tried
        expert_gpu_memory = checks.renamed(
            "KTCallback(gpu_memory_budget)", gpu_memory_budget, "KTCallback(expert_gpu_memory)", expert_gpu_memory
        )
        checks.optional_size(gpu_memory_limit, "KTCallback(gpu_memory_limit)")
        if max_seq_length is not None:
            checks.positive_int("KTCallback(max_seq_length)", max_seq_length, what="tokens of the longest sequence")
        if expert_gpu_memory is not None:
            checks.parse_size(expert_gpu_memory, "KTCallback(expert_gpu_memory)")
            checks.parse_size(stream_keep_bytes, "KTCallback(stream_keep_bytes)")
            checks.parse_size(stream_dequant_bytes, "KTCallback(stream_dequant_bytes)")
            checks.choice("KTCallback(stream_mode)", stream_mode, ("auto", "gpu", "cpu"))
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
                "mode": stream_mode,
                "dequant_bytes": stream_dequant_bytes,
            }
            if expert_gpu_memory is not None
            else None
        )
        self.gpu_memory_limit = gpu_memory_limit
        self.max_seq_length = max_seq_length
        self.memory_plan = None  # kt_core.streaming.memory_plan.GpuMemoryPlan, once planned
        self._streaming = None
        self._timer: ExpertTimer | None = None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("KTCallback: the Trainer passed no model to on_init_end")
        _check_resume(args)
        kt_prepare(model, **self.options)
        prepare_engines(model, args)  # the experts out of FSDP2's sharding or out of DeepSpeed
        if self.loss_mode != "off" and self.efficient_loss is None:
            from kt_core import enable_efficient_loss

            self.efficient_loss = enable_efficient_loss(model, self.loss_mode)
        device = torch.device(self.options["device"] or _model_device(model))  # where the model computes
        if self.streaming_options is not None and device.type != "cuda":
            raise checks.SettingError(
                f"KTCallback(expert_gpu_memory): got {self.streaming_options['expert_gpu_memory']!r}, but the "
                f"model computes on {device}: expert streaming computes on a CUDA GPU. Put the model on the "
                "GPU (device='cuda', or the Trainer's default) or leave expert_gpu_memory out."
            )
        if device.type == "cuda" and self.memory_plan is None:
            self.memory_plan = self._plan_memory(args, model, device)  # refuses before streaming allocates
        if self.streaming_options is not None and self._streaming is None:
            from kt_core import enable_streaming

            plan = self.memory_plan  # where the expert-LoRA factors go, as planned (None: enable_streaming decides)
            on_gpu = plan.expert_lora_on_gpu if plan is not None else None
            self._streaming = enable_streaming(
                model, device=device, expert_lora_on_gpu=on_gpu, **self.streaming_options
            )
        if self.log_speed and self._timer is None:
            self._timer = ExpertTimer(model)

    def _plan_memory(self, args, model: nn.Module, device: torch.device):
        """The GPU memory plan of this run on `device`, logged, checked (MemoryPlanError when it does not fit)."""
        from kt_core.streaming import memory_plan as mp

        def on_device(t: torch.Tensor) -> bool:
            return _on_device(t, device)

        lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        head = getattr(lm_head, "weight", None)
        backend = self.efficient_loss.backend if self.efficient_loss is not None else "off"
        run = mp.RunShape(
            batch=args.per_device_train_batch_size,
            seq_len=self.max_seq_length or getattr(args, "max_length", None) or getattr(args, "max_seq_length", None),
            gradient_checkpointing=bool(args.gradient_checkpointing),
            dtype=_compute_dtype(args, model),
            loss_backend=backend,
            lm_head_trainable=head is not None and head.requires_grad,
            loss_on_device=head is None or on_device(head),
        )
        held = _device_tensors(model, on_device)
        s = self.streaming_options
        inputs = mp.PlanInputs(
            mp.model_dims(model, include=lambda name, linear: on_device(linear.weight)),
            run,
            weights_bytes=sum(t.numel() * t.element_size() for t in held),
            trainable_bytes=sum(t.numel() * t.element_size() for t in held if t.requires_grad),
            optimizer_states=mp.optimizer_states(args.optim),
            streaming=None
            if s is None
            else mp.StreamingSizes(
                s["expert_gpu_memory"], s["quantize"], s["keep_bytes"], s["mode"], s["dequant_bytes"]
            ),
            device=str(device),
        )
        return mp.check_and_log(mp.plan_gpu_memory(inputs, self.gpu_memory_limit), mp.TRAINER_KNOBS, logger)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        beside_deepspeed = attach_deepspeed(args, state, model, optimizer, caller="KTCallback")  # own optimizer
        if not beside_deepspeed and optimizer is not None and model is not None:
            in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
            factors = expert_lora_parameters(model)
            warn_if_shape_dependent(optimizer, factors)
            missing = [p for p in factors if id(p) not in in_optimizer]
            if missing:
                raise ValueError(
                    f"KTCallback: the optimizer does not hold {len(missing)} expert-LoRA factors; it was built "
                    "before the experts moved to the CPU operator. Call kt_prepare(model) before creating it."
                )
        if model is not None:  # packed kernels pack now, with a progress bar, not inside the first step
            release = training_releases_weights(model, self.keep_host_weights, args)
            pack_experts(model, progress=state.is_local_process_zero, release=release)
            if self._streaming is not None:  # streamed layers free theirs once their CPU operator packs
                self._streaming.release_packed_weights = release
        if self._timer is not None:
            self._timer.start_steps()

    def on_save(self, args, state, control, model=None, **kwargs):
        save_engine_state(args, state, model)

    def on_step_begin(self, args, state, control, **kwargs):
        if self._streaming is not None:
            self._streaming.set_steps_left(state.max_steps - state.global_step, args.gradient_accumulation_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if self._streaming is not None:
            self._streaming.end_step()
        if self._timer is not None:
            self._timer.end_step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        speed = speed_logs(self._timer, self._streaming) if self._timer is not None and logs is not None else None
        if speed is None:
            return
        # Callbacks after this one (the progress printer) see `logs`; the Trainer has already copied it
        # into the history, so update that entry too.
        logs.update(speed)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(speed)

    def on_train_end(self, args, state, control, **kwargs):
        if self._timer is not None:
            self._timer.stop_steps()

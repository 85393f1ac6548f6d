"""Building LLaMA-Factory's model through kt_core while LLaMA-Factory's own load_model runs.

LLaMA-Factory's loader keeps doing everything it always does (config patches, tokenizer hooks, PEFT,
value head, parameter counts); only two of its late-bound names are swapped for the duration of one
`load_model` call: the Auto class that instantiates the base model (-> kt_core.load_model) and
`init_adapter` (-> LLaMA-Factory's adapter setup, then expert LoRA on the CPU operator, then, for pt / sft
training, the causal-LM loss without [tokens x vocab] logits: `kt_loss`, kt_core.loss).
"""

from __future__ import annotations

import contextlib
import logging

import torch

from kt_plugins.llamafactory.config import MEMORY_KNOBS, KTSettings

__all__ = ["kt_model_building", "plan_gpu_memory"]

logger = logging.getLogger("llamafactory.kt_plugins")  # under LLaMA-Factory's own log handlers


def _devices(settings: KTSettings):
    if settings.kt_device and "," in settings.kt_device:
        return [d.strip() for d in settings.kt_device.split(",")]
    return settings.kt_device


class _KTAutoModel:
    """Stands in for AutoModelForCausalLM inside LLaMA-Factory's loader."""

    def __init__(self, settings: KTSettings, compute_dtype):
        self.settings = settings
        self.compute_dtype = compute_dtype

    def from_pretrained(self, pretrained_model_name_or_path, config=None, **kwargs):
        import kt_core

        if self.compute_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(
                f"use_kt: the CPU experts run in bf16 or fp32, not {self.compute_dtype}; set `bf16: true` "
                "(or neither fp16 nor bf16 for fp32) in the YAML"
            )
        s = self.settings
        rules = s.resolve_rule()
        logger.info(
            "building %s with kt_core (placement rules: %s)", pretrained_model_name_or_path, rules or "defaults"
        )
        model = kt_core.load_model(
            pretrained_model_name_or_path,
            device=_devices(s),
            rules=rules,
            kernel=s.kt_kernel,
            cpu_infer=s.cpu_infer,
            gpu_memory_limit=s.kt_gpu_memory_limit,
            host_memory_limit=s.kt_host_memory_limit,
            dtype=self.compute_dtype,
            config=config,
            shared_experts=s.kt_shared_experts,
            expert_dtype=s.kt_expert_dtype,
        )
        if "chunk_size" in s.given:  # tokens per CPU-experts call in long prefills
            for module in model.modules():
                if isinstance(module, kt_core.KTExperts):
                    module.chunk_size = s.chunk_size
        return model

    def from_config(self, config, **kwargs):
        raise ValueError("use_kt: train_from_scratch is not supported; point model_name_or_path at a checkpoint")


def _enable_streaming(model, settings: KTSettings) -> None:
    import kt_core
    from kt_core.streaming.memory_plan import last_plan

    device = settings.kt_device.split(",")[0] if settings.kt_device else None
    plan = last_plan()  # the one made when the YAML was parsed: it decided where the expert-LoRA factors go
    runtime = kt_core.enable_streaming(
        model,
        expert_gpu_memory=settings.kt_expert_gpu_memory,
        device=device,
        quantize=settings.kt_stream_quantize,
        keep_bytes=settings.kt_stream_keep_bytes,
        mode=settings.kt_stream_mode,
        dequant_bytes=settings.kt_stream_dequant_bytes,
        gpu_memory_limit=settings.kt_gpu_memory_limit,
        expert_lora_on_gpu=plan.expert_lora_on_gpu if plan is not None and plan.inputs.streaming else None,
    )
    model.kt_streaming = runtime  # kept alive with the model; per-step reports go to the kt_core.streaming log
    logger.info(
        "expert streaming on: %s of GPU memory for expert weights, %s of recomputed expert intermediates kept",
        settings.kt_expert_gpu_memory,
        settings.kt_stream_keep_bytes,
    )


def _loss_mode(settings: KTSettings, finetuning_args) -> tuple[str, str | None]:
    """The kt_loss mode this run attaches, and why not when it is "off" for a reason other than kt_loss: off."""
    from kt_core import normalize_loss_mode

    mode = normalize_loss_mode(settings.kt_loss, key="kt_loss")
    stage = getattr(finetuning_args, "stage", "sft")
    # Losses of LLaMA-Factory's own that read the training step's logits (use_asft_loss, use_dft_loss, ...)
    custom = sorted(k for k, v in vars(finetuning_args).items() if k.startswith("use_") and k.endswith("_loss") and v)
    if mode != "off" and (stage not in ("pt", "sft") or custom):
        return "off", f"stage {stage}" if stage not in ("pt", "sft") else ", ".join(custom)
    return mode, None


def _enable_efficient_loss(model, settings: KTSettings, finetuning_args) -> None:
    """`kt_loss`: the loss of pt / sft training steps from hidden states, never [tokens x vocab] logits."""
    from kt_core import enable_efficient_loss

    mode, reason = _loss_mode(settings, finetuning_args)
    if reason is not None:
        logger.info("kt_loss: %s reads the logits; transformers' loss stays", reason)
    if mode == "off":
        return
    attached = enable_efficient_loss(model, mode)
    if attached is None:
        logger.info("kt_loss: not attached (see the kt_core.loss log line); the model's own loss stays")
    else:
        logger.info(
            "causal-LM loss without [tokens x vocab] logits: %s (training steps return logits=None; kt_loss: off "
            "restores transformers' loss)",
            attached.backend,
        )


def plan_gpu_memory(settings: KTSettings, model_args, data_args, training_args, finetuning_args):
    """The GPU memory plan of a use_kt training run, made from config.json before anything is loaded.

    Reads per_device_train_batch_size x cutoff_len, gradient checkpointing (on unless
    disable_gradient_checkpointing), bf16 / fp16 / pure_bf16, the optimizer, lora_rank / lora_target /
    lora_dropout, kt_loss (or enable_liger_kernel), the placement (kt_optimize_rule, kt_device) and the streaming
    keys; logs the table and refuses a plan over kt_gpu_memory_limit (or CUDA's free memory). Plans the first GPU
    of kt_device (else this rank's GPU, as load_model picks it); returns None when the model goes to the CPU.

    Raises:
        MemoryPlanError: naming the key to change and the value that fits.
    """
    from kt_core.streaming import memory_plan as mp
    from kt_plugins.llamafactory.adapter import expert_lora_requested

    mode, _ = _loss_mode(settings, finetuning_args)
    if getattr(model_args, "enable_liger_kernel", False) and mode != "off":
        mode = "liger"  # LLaMA-Factory's own Liger patch computes it; kt_loss leaves it in place
    lora = None
    if finetuning_args.finetuning_type == "lora":
        lora = mp.LoraSizes(
            rank=finetuning_args.lora_rank,
            targets=tuple(t.strip() for t in finetuning_args.lora_target or ()),
            dropout=finetuning_args.lora_dropout,
            item=2 if finetuning_args.pure_bf16 else 4,  # LLaMA-Factory casts trainable parameters to fp32
            experts=expert_lora_requested(settings, finetuning_args),
        )
    if training_args.bf16 or finetuning_args.pure_bf16:
        dtype = torch.bfloat16
    else:
        dtype = torch.float16 if training_args.fp16 else None
    run = mp.RunShape(
        batch=training_args.per_device_train_batch_size,
        seq_len=data_args.cutoff_len,
        gradient_checkpointing=not getattr(model_args, "disable_gradient_checkpointing", False),
    )
    streaming = None
    if settings.kt_expert_gpu_memory is not None:
        streaming = mp.StreamingSizes(
            settings.kt_expert_gpu_memory,
            settings.kt_stream_quantize,
            settings.kt_stream_keep_bytes,
            settings.kt_stream_mode,
            settings.kt_stream_dequant_bytes,
        )
    inputs = mp.checkpoint_inputs(
        model_args.model_name_or_path,
        run,
        device=_devices(settings),
        rules=settings.resolve_rule(),
        dtype=dtype,
        lora=lora,
        loss_mode=mode,
        optimizer_states=mp.optimizer_states(training_args.optim),
        streaming=streaming,
        expert_dtype=settings.kt_expert_dtype,
    )
    if inputs is None:
        return None
    return mp.check_and_log(mp.plan_gpu_memory(inputs, settings.kt_gpu_memory_limit), mp.Knobs(**MEMORY_KNOBS), logger)


@contextlib.contextmanager
def kt_model_building(loader_module, settings: KTSettings, model_args, finetuning_args, is_trainable: bool):
    """Swaps the loader's Auto class and init_adapter for one load_model call."""
    import llamafactory.model.adapter as adapter_module

    from kt_plugins.llamafactory.adapter import check_adapter_matches, expert_lora_setup, take_over

    saved = {name: getattr(loader_module, name) for name in ("AutoModelForCausalLM", "init_adapter")}
    original_init_adapter = saved["init_adapter"]

    def init_adapter(config, model, model_args_, finetuning_args_, is_trainable_):
        for adapter in model_args_.adapter_name_or_path or []:
            check_adapter_matches(model, adapter)
        with expert_lora_setup(adapter_module, settings, finetuning_args_, is_trainable_):
            model = original_init_adapter(config, model, model_args_, finetuning_args_, is_trainable_)
        model = take_over(model, settings)
        if settings.kt_expert_gpu_memory is not None:
            _enable_streaming(model, settings)
        if is_trainable_:
            _enable_efficient_loss(model, settings, finetuning_args_)
        return model

    loader_module.AutoModelForCausalLM = _KTAutoModel(settings, getattr(model_args, "compute_dtype", None))
    loader_module.init_adapter = init_adapter
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(loader_module, name, value)

"""Expert LoRA inside LLaMA-Factory runs, through LLaMA-Factory's own PEFT setup.

With transformers 5 the routed experts are fused 3-D parameters, not linear layers, so `lora_target: all`
no longer reaches them in stock LLaMA-Factory. Here it does: while LLaMA-Factory builds its LoraConfig,
the experts' parameters are added as PEFT `target_parameters`, PEFT creates the expert LoRA (and counts
it as trainable), and kt_core then takes it over onto the CPU operator. The saved adapter is therefore a
stock PEFT adapter; loading one for chat / api / export, LLaMA-Factory merges it into the experts as usual.
"""

from __future__ import annotations

import contextlib
import logging

from kt_core.peft import AdapterFolder, is_peft_param_wrapper, peft_layer_warning_filtered, take_over_peft_model
from kt_plugins.llamafactory.config import KTSettings

__all__ = [
    "check_adapter_matches",
    "describe_cpu_experts",
    "expert_lora_requested",
    "expert_lora_setup",
    "take_over",
]

logger = logging.getLogger("llamafactory.kt_plugins")  # under LLaMA-Factory's own log handlers


def expert_lora_requested(settings: KTSettings, finetuning_args) -> bool:
    """`lora_target: all` means all, experts included; otherwise the experts must be named."""
    if not settings.kt_expert_lora or getattr(finetuning_args, "finetuning_type", None) != "lora":
        return False
    targets = [t.strip() for t in (finetuning_args.lora_target or [])]
    return "all" in targets or any(t == "experts" or t.endswith(".experts") for t in targets)


def expert_target_parameters(model) -> list[str]:
    """PEFT `target_parameters` naming the fused weights of every KTExperts in `model`."""
    from kt_core import KTExperts

    # e.g. "model.layers.3.mlp.experts" -> "mlp.experts" (PEFT matches parameter names by suffix)
    suffixes = {".".join(name.split(".")[-2:]) for name, m in model.named_modules() if isinstance(m, KTExperts)}
    return sorted(f"{s}.{p}" for s in suffixes for p in ("gate_up_proj", "down_proj"))


@contextlib.contextmanager
def expert_lora_setup(adapter_module, settings: KTSettings, finetuning_args, is_trainable: bool):
    """While LLaMA-Factory's init_adapter runs: add the experts to the LoraConfig it passes to PEFT."""
    original = adapter_module.get_peft_model
    wanted = is_trainable and expert_lora_requested(settings, finetuning_args)

    def get_peft_model(model, peft_config, *args, **kwargs):
        if wanted and str(getattr(peft_config, "peft_type", "")).endswith("LORA"):
            targets = expert_target_parameters(model)
            peft_config.target_parameters = sorted(set(peft_config.target_parameters or []) | set(targets))
            logger.info("expert LoRA on the CPU operator: target_parameters=%s", targets)
        return original(model, peft_config, *args, **kwargs)

    adapter_module.get_peft_model = get_peft_model
    try:
        with peft_layer_warning_filtered():
            yield
    finally:
        adapter_module.get_peft_model = original


def take_over(model, settings: KTSettings):
    """After LLaMA-Factory's init_adapter: PEFT's expert LoRA (new or resumed) moves onto KTExperts.

    kt_core.load_model placed the model already (model.py, with `kt_optimize_rule`), and that placement stands:
    the experts it put on the CPU operator take their LoRA over, the ones its rules left to transformers keep
    PEFT's. The kernel and threads are those load_model built the experts with.
    """
    if any(is_peft_param_wrapper(m) for m in model.modules()):
        take_over_peft_model(model, kernel=settings.kt_kernel, cpu_infer=settings.cpu_infer)
    logger.info("kt-plugins: %s", describe_cpu_experts(model))
    return model


def describe_cpu_experts(model) -> str:
    """What the built model runs: its KTExperts layers' kernels, chunking, threads and expert LoRA."""
    from kt_core import KTExperts, get_thread_pool

    layers = [m for m in model.modules() if isinstance(m, KTExperts)]
    if not layers:
        return "no routed-experts layer runs on the CPU operator"
    kernels = sorted({m.kernel for m in layers})
    chunks = sorted({m.chunk_size or 0 for m in layers})
    chunking = ", ".join(f"{c} tokens per call" if c else "whole batch per call" for c in chunks)
    with_lora = sum(1 for m in layers if m.lora is not None)
    threads = sorted({m.cpu_infer for m in layers if m.cpu_infer} or {get_thread_pool().num_threads})
    return (
        f"{len(layers)} routed-experts layers on the CPU operator: kernel {', '.join(kernels)}; chunking: "
        f"{chunking}; {', '.join(map(str, threads))} CPU threads; expert LoRA on {with_lora} layers"
    )


def check_adapter_matches(model, adapter_dir: str) -> None:
    """Refuses, by name, an adapter trained for another model, before PEFT fails on a shape deep inside.

    Args:
        model: the base model the adapter is about to be loaded onto.
        adapter_dir: a PEFT adapter folder (adapter_config.json + adapter_model.safetensors or .bin).

    Raises:
        ValueError: naming the adapter file, the first tensor that does not fit and why.
    """
    folder = AdapterFolder(adapter_dir)
    weights = folder.weights_file
    if weights is None:
        return  # PEFT reports missing files itself
    modules = dict(model.named_modules())
    for key, parsed, shape in folder.lora_shapes():
        module = modules.get(parsed.module)
        if module is None:
            raise ValueError(
                f"{weights}: this adapter was trained for another model: it has LoRA for `{parsed.module}`, which "
                f"{type(model).__name__} at {getattr(model.config, '_name_or_path', '?')} does not have"
            )
        in_features = getattr(module, "in_features", None)
        if parsed.which == "A" and in_features is not None and shape[-1] != in_features:
            raise ValueError(
                f"{weights}: this adapter was trained for another model: `{key}` expects {shape[-1]} "
                f"input features, `{parsed.module}` has {in_features}"
            )

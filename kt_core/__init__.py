"""kt_core: the shared runtime of kt-plugins.

Routed MoE experts live in host memory and run on the CPU (C++ kernels: AMX / AVX-512 / AVX2 / portable)
while the rest of the model stays on the GPU. Host-framework plugins (kt_plugins.*) build on this API.

Operator
    KTExperts            drop-in replacement for transformers' `*Experts` modules
    ExpertLoRA           per-expert LoRA factors in host memory
    experts_reference    plain-torch reference of the operator (tests, fallback)
    GpuShare             what a GPU side of a layer provides (streaming, SGLang's GPU experts)
    run_now              a GPU call's `submit_cpu` that runs the CPU share inline, on the caller's thread
Kernels
    available_kernels    variants this CPU runs, best first (KT_KERNEL forces one)
    resolve_kernel       "auto" or a name (KT_KERNEL first) -> the variant to run; fails listing what this CPU runs
    cpu_features         instruction-set extensions seen at run time
Models
    load_model           checkpoint dir -> model with experts on the CPU, rest on the GPU(s), memory-planned
    convert_model        swap the experts of an already-loaded transformers model
    MemoryPlan           GPU / host bytes a load needs, checked before anything is read
Placement
    load_rules           YAML placement rules (ours or KTransformers' kt_optimize_rule files)
    default_rules        built-in rules per family
Plugins
    hookimpl             marker for `kt` plugin hooks (see kt_core.hookspecs)
    register_architecture, get_architecture, list_architectures, register_expert_backend
Runtime
    RuntimeConfig        the process-wide knobs, each read from its KT_* environment variable (kt_core.config)
    configure            sets knobs of the process's RuntimeConfig; they win over the environment
    get_thread_pool      the process-wide pool of `cpu_infer` threads
    enable_streaming     split MoE layers between CPU compute and GPU compute on PCIe-streamed weights
    ExpertTimer          seconds the CPU experts operator computed per training step, and the input tokens
    speed_logs           what the training plugins log per step: tokens/s, the CPU experts' share, the stream split
    pack_experts         builds (packs) every CPU-only experts layer's operator now, with a progress bar; with
                         release=True frees the weights a packed copy makes redundant
    training_releases_weights  whether a training run frees them (a bf16 model on one process, not kept)
Loss
    enable_efficient_loss, disable_efficient_loss, EfficientLoss    the causal-LM loss without [tokens x vocab] logits
    normalize_loss_mode  a user's loss setting -> its mode ("off", "auto", a backend); errors name the key
    loss_workspace_bytes the loss's peak GPU bytes per backend, for the memory plan
Settings
    settings             the validators of every kt-plugins setting (errors name the key as the user wrote it)
PEFT (kt_core.peft)
    take_over_peft_model expert LoRA of a PEFT model onto KTExperts; PEFT's keys, layouts, adapter folders
"""

from kt_core import settings
from kt_core.architectures import (
    Architecture,
    ExpertProjections,
    UnknownArchitectureError,
    get_architecture,
    list_architectures,
    register_architecture,
)
from kt_core.config import RuntimeConfig, configure
from kt_core.experts import GpuShare, KTExperts
from kt_core.experts.share import run_now
from kt_core.hookspecs import hookimpl
from kt_core.kernels import available_kernels, cpu_features, resolve_kernel
from kt_core.loading import CheckpointError, MemoryPlan, MemoryPlanError, convert_model, load_model
from kt_core.lora import ExpertLoRA
from kt_core.loss import (
    EfficientLoss,
    disable_efficient_loss,
    enable_efficient_loss,
    loss_workspace_bytes,
    normalize_loss_mode,
)
from kt_core.placement import (
    PlacementPlan,
    PlacementRule,
    RuleError,
    RuleMatch,
    RuleReplace,
    UnmatchedRuleWarning,
    default_rules,
    load_rules,
    register_expert_backend,
    resolve_rule_file,
)
from kt_core.plugins import get_plugin_manager
from kt_core.reference import experts_reference
from kt_core.runtime.expert_time import ExpertTimer, speed_logs
from kt_core.runtime.pack_cache import pack_experts, training_releases_weights
from kt_core.runtime.pool import get_thread_pool
from kt_core.streaming import enable_streaming

__all__ = [
    "Architecture",
    "CheckpointError",
    "EfficientLoss",
    "ExpertLoRA",
    "ExpertProjections",
    "ExpertTimer",
    "GpuShare",
    "KTExperts",
    "MemoryPlan",
    "MemoryPlanError",
    "PlacementPlan",
    "PlacementRule",
    "RuleError",
    "RuleMatch",
    "RuleReplace",
    "RuntimeConfig",
    "UnknownArchitectureError",
    "UnmatchedRuleWarning",
    "available_kernels",
    "configure",
    "convert_model",
    "cpu_features",
    "default_rules",
    "disable_efficient_loss",
    "enable_efficient_loss",
    "enable_streaming",
    "experts_reference",
    "get_architecture",
    "get_plugin_manager",
    "get_thread_pool",
    "hookimpl",
    "list_architectures",
    "load_model",
    "load_rules",
    "loss_workspace_bytes",
    "normalize_loss_mode",
    "pack_experts",
    "register_architecture",
    "register_expert_backend",
    "resolve_kernel",
    "resolve_rule_file",
    "run_now",
    "settings",
    "speed_logs",
    "training_releases_weights",
]

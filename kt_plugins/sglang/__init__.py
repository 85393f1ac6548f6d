"""SGLang integration: `python -m sglang.launch_server ... --kt-experts` runs the routed experts on the CPU.

Stock SGLang >= 0.5.11 loads this package through its `sglang.srt.plugins` entry point (tested range in
the README). Nothing here imports sglang or torch until SGLang calls `register`.

register           the entry point: CLI flags, their export to the schedulers, the FusedMoE method swap
KTExpertsOptions   what --kt-experts and its options asked for (options.py)
ENV_VAR            the environment variable that carries them to SGLang's spawned processes
Modules: options (flags, environment), plugin (hooks), method (KTExpertsMethod, the FusedMoE method),
lora (expert LoRA of kt-plugins' PEFT adapters).
"""

from kt_plugins.sglang.options import ENV_VAR, KTExpertsOptions
from kt_plugins.sglang.plugin import register

__all__ = ["ENV_VAR", "KTExpertsOptions", "register"]

"""DeepSeek-V3, R1 and Kimi-K2 (which ships DeepSeek-V3's layout under model_type `kimi_k2`).

transformers 5: `model.layers.N.mlp` is `DeepseekV3MoE`, its routed experts `DeepseekV3NaiveMoe`.
The published checkpoints carry an extra multi-token-prediction layer (`model.layers.61.*`) that the
model has no module for: the loader skips it. FP8 checkpoints (128x128 `weight_scale_inv` blocks) are
dequantized at load time.
"""

from __future__ import annotations

from typing import Any

from kt_core.architectures.spec import Architecture

# Keys of Kimi-K2's config.json that belong to its remote code, not to DeepseekV3Config.
_REMOTE_CODE_KEYS = ("model_type", "auto_map", "architectures")


def _deepseek_v3_config(config_dict: dict[str, Any]):
    from transformers import DeepseekV3Config

    kwargs = {k: v for k, v in config_dict.items() if k not in _REMOTE_CODE_KEYS}
    config = DeepseekV3Config(**kwargs)
    config.architectures = ["DeepseekV3ForCausalLM"]
    return config


ARCHITECTURE = Architecture(
    name="deepseek_v3",
    model_types=("deepseek_v3", "kimi_k2"),
    description="DeepSeek-V3, V3.1, R1, Kimi-K2",
    config_class=_deepseek_v3_config,
)

"""Qwen1.5-MoE and Qwen2-MoE (57B-A14B): routed experts plus one gated shared expert per layer.

transformers 5: `model.layers.N.mlp` is `Qwen2MoeSparseMoeBlock`, its routed experts `Qwen2MoeExperts`.
"""

from kt_core.architectures.spec import Architecture

ARCHITECTURE = Architecture(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    description="Qwen1.5-MoE, Qwen2-57B-A14B",
)

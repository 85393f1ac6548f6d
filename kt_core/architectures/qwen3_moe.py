"""Qwen3-MoE (30B-A3B, 235B-A22B, Coder): routed experts only, no shared expert.

transformers 5: `model.layers.N.mlp` is `Qwen3MoeSparseMoeBlock`, its routed experts `Qwen3MoeExperts`;
layers listed in `mlp_only_layers` keep a dense MLP and have no experts module.
"""

from kt_core.architectures.spec import Architecture

ARCHITECTURE = Architecture(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    description="Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder",
)

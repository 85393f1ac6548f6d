"""GLM-4.5 / 4.6 / 4.7 MoE (Glm4Moe): DeepSeek-V3-style routing with shared experts.

transformers 5: `model.layers.N.mlp` is `Glm4MoeMoE`, its routed experts `Glm4MoeNaiveMoe`. The
checkpoints' multi-token-prediction layers beyond `num_hidden_layers` have no module and are skipped.
"""

from kt_core.architectures.spec import Architecture

ARCHITECTURE = Architecture(
    name="glm4_moe",
    model_types=("glm4_moe",),
    description="GLM-4.5, GLM-4.5-Air, GLM-4.6, GLM-4.7",
)

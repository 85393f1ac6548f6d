"""DeepSeek-V2 and V2-Lite (V2.5 too): MLA attention, group-limited routing, shared experts.

transformers 5: `model.layers.N.mlp` is `DeepseekV2Moe`, its routed experts `DeepseekV2Experts`; the
first `first_k_dense_replace` layers keep a dense MLP and have no experts module.
"""

from kt_core.architectures.spec import Architecture

ARCHITECTURE = Architecture(
    name="deepseek_v2",
    model_types=("deepseek_v2",),
    description="DeepSeek-V2, V2-Lite, V2.5",
)

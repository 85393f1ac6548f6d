"""The model shapes the SFT benchmarks train: DeepSeek-V2-Lite, Qwen3-30B-A3B and DeepSeek-V3 (real widths, any
layer count: DeepSeek-V3's 61 layers do not fit a test machine, so it defaults to its 3 dense layers + 2 MoE
layers, 45 GB of routed experts in bf16, 22.5 GB in DeepSeek's FP8), or tiny configs of the same structure for
smoke tests; and the LoRA targets a user sets on them."""

from __future__ import annotations

ATTENTION_TARGETS = ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
QWEN3_ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
DSV3_ATTENTION_TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
SHAPES = ("dsv2-lite", "qwen3-30b-a3b", "deepseek-v3")
DSV3_DEFAULT_LAYERS = 5
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def build_config(small: bool, layers: int | None, shape_name: str = "dsv2-lite"):
    """DeepSeek-V2-Lite shapes (as in the anchor) or Qwen3-30B-A3B's, or a tiny config of the same structure."""
    from transformers import DeepseekV2Config

    if shape_name == "qwen3-30b-a3b":
        return _qwen3_config(small, layers)
    if shape_name == "deepseek-v3":
        return _deepseek_v3_config(small, layers)
    if small:
        shape = dict(
            vocab_size=1000,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=3,
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            kv_lora_rank=64,
            qk_rope_head_dim=16,
            qk_nope_head_dim=32,
            v_head_dim=32,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=4096,
        )
    else:
        shape = dict(
            vocab_size=102400,
            hidden_size=2048,
            intermediate_size=10944,
            num_hidden_layers=27,
            n_routed_experts=64,
            num_experts_per_tok=6,
            moe_intermediate_size=1408,
            kv_lora_rank=512,
            qk_rope_head_dim=64,
            qk_nope_head_dim=128,
            v_head_dim=128,
            num_attention_heads=16,
            num_key_value_heads=16,
            max_position_embeddings=8192,
        )
    if layers:
        shape["num_hidden_layers"] = layers
    return DeepseekV2Config(
        **shape,
        first_k_dense_replace=1,
        n_shared_experts=2,
        q_lora_rank=None,
        topk_method="greedy",
        n_group=1,  # these four as in DeepSeek-V2-Lite's config.json (SGLang reads them)
        topk_group=1,
        scoring_func="softmax",
        moe_layer_freq=1,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_cache=False,
    )


def _qwen3_config(small: bool, layers: int | None):
    from transformers import Qwen3MoeConfig

    shape = dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
    )
    if small:
        shape.update(
            vocab_size=1000, hidden_size=256, intermediate_size=512, moe_intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=8, num_experts_per_tok=2,
        )  # fmt: skip
    if layers:
        shape["num_hidden_layers"] = layers
    return Qwen3MoeConfig(
        **shape,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_cache=False,
    )


def _deepseek_v3_config(small: bool, layers: int | None):
    from transformers import DeepseekV3Config

    shape = dict(  # deepseek-ai/DeepSeek-V3's config.json
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=DSV3_DEFAULT_LAYERS,
        first_k_dense_replace=3,
        n_routed_experts=256,
        n_shared_experts=1,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        num_attention_heads=128,
        num_key_value_heads=128,
    )
    if small:
        shape.update(
            vocab_size=1000, hidden_size=256, intermediate_size=512, moe_intermediate_size=64, num_hidden_layers=3,
            first_k_dense_replace=1, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
            q_lora_rank=64, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
            num_attention_heads=4, num_key_value_heads=4,
        )  # fmt: skip
    if layers:
        shape["num_hidden_layers"] = layers
    return DeepseekV3Config(
        **shape,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_cache=False,
    )


def attention_targets(config) -> list[str]:
    if config.model_type == "qwen3_moe":
        return QWEN3_ATTENTION_TARGETS
    if config.model_type == "deepseek_v3":
        return DSV3_ATTENTION_TARGETS
    return ATTENTION_TARGETS

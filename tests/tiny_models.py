"""Tiny random-init configs of each supported MoE family, scaled down from the real ones.

Sizes: H = 32, expert I = 16, E = 4 experts, top-2, 2-3 layers, vocab 64 -- fast on the CPU, yet
with the real structure (DeepSeek / GLM dense first layer, shared experts, MLA attention).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = [
    "FAMILIES",
    "build_tiny_model",
    "eval_logits",
    "save_fused_checkpoint",
    "tiny_config",
    "token_dataset",
    "trainer_args",
]

_COMMON = dict(hidden_size=32, num_attention_heads=4, vocab_size=64, max_position_embeddings=64)
_DEEPSEEK = dict(
    intermediate_size=48,
    moe_intermediate_size=16,
    num_key_value_heads=4,
    n_routed_experts=4,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    v_head_dim=8,
    qk_nope_head_dim=8,
    n_group=1,
    topk_group=1,
)
_KWARGS = {
    "deepseek_v2": dict(**_DEEPSEEK, q_lora_rank=None),
    "deepseek_v3": dict(**_DEEPSEEK, q_lora_rank=16),
    "glm4_moe": dict(
        intermediate_size=48,
        moe_intermediate_size=16,
        num_key_value_heads=2,
        head_dim=8,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
    ),
    "mixtral": dict(intermediate_size=16, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        intermediate_size=48,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
    ),
    "qwen3_moe": dict(
        intermediate_size=48,
        moe_intermediate_size=16,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        mlp_only_layers=[],
    ),
}
FAMILIES = tuple(sorted(_KWARGS))


def tiny_config(family: str, *, num_layers: int = 3, **overrides):
    """A transformers config of `family` (a model_type) at toy size."""
    from transformers import AutoConfig

    kwargs = {**_COMMON, **_KWARGS[family], "num_hidden_layers": num_layers, **overrides}
    config = AutoConfig.for_model(family, **kwargs)
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    return config


def build_tiny_model(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A random-init causal LM of `family`, in eval mode, with non-trivial routing biases."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.normal_(0, 0.1)  # zeros at init; make the routing bias matter
    return model


def save_fused_checkpoint(model, path: Path) -> None:
    """Writes `model` in transformers 5's in-memory names (fused experts `...experts.gate_up_proj`)."""
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if not model.config.tie_word_embeddings:
        tensors["lm_head.weight"] = model.state_dict()["lm_head.weight"].contiguous()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def randomize_lora(peft_model, std: float = 0.2, seed: int = 1):
    """Gives every LoRA factor random values (PEFT starts B at zero: then every factor matters); drawn on the CPU,
    so the factors are the same wherever PEFT put them. Returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return peft_model


def token_dataset(n: int = 64, seq: int = 16, vocab: int = 64) -> list[dict[str, torch.Tensor]]:
    """A fixed language-modelling dataset of random token rows (labels = inputs) for Trainer tests."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def eval_logits(model, seed: int = 5) -> torch.Tensor:
    """Logits of a fixed [2, 12] batch, in eval mode and without gradients."""
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def trainer_args(output_dir, *, max_steps: int, **overrides):
    """TrainingArguments of the Trainer parity tests: CPU, fixed seed, no saving or reporting by default."""
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_steps=max_steps,
        learning_rate=5e-3,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)

"""Hugging Face experts modules of each family on tiny random weights: the reference for parity tests."""

from __future__ import annotations

import torch
from transformers import DeepseekV3Config, MixtralConfig, Qwen3MoeConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3NaiveMoe
from transformers.models.mixtral.modeling_mixtral import MixtralExperts
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

# Odd sizes on purpose: no dimension is a multiple of any SIMD width.
NUM_EXPERTS, HIDDEN, INTERMEDIATE = 7, 37, 19

FAMILIES = {
    "qwen3_moe": (
        Qwen3MoeExperts,
        lambda: Qwen3MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=INTERMEDIATE, num_experts=NUM_EXPERTS),
    ),
    "deepseek_v3": (
        DeepseekV3NaiveMoe,
        lambda: DeepseekV3Config(hidden_size=HIDDEN, moe_intermediate_size=INTERMEDIATE, n_routed_experts=NUM_EXPERTS),
    ),
    "mixtral": (
        MixtralExperts,
        lambda: MixtralConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_local_experts=NUM_EXPERTS),
    ),
}


def make_hf_experts(family: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """The family's eager experts module with random weights scaled like a trained layer."""
    cls, make_config = FAMILIES[family]
    config = make_config()
    config._experts_implementation = "eager"
    module = cls(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.gate_up_proj.copy_(torch.randn(module.gate_up_proj.shape, generator=gen) / HIDDEN**0.5)
        module.down_proj.copy_(torch.randn(module.down_proj.shape, generator=gen) / INTERMEDIATE**0.5)
    return module.to(dtype)


def random_routing(T: int, K: int, *, seed: int, experts_used: int = NUM_EXPERTS) -> tuple[torch.Tensor, torch.Tensor]:
    """top_k_index [T, K] (distinct experts per token, drawn from the first `experts_used`) and weights [T, K]."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts_used, generator=gen)[:K] for _ in range(T)])
    weights = torch.softmax(torch.randn(T, K, generator=gen), dim=-1)
    return ids, weights

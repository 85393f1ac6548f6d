"""Hugging Face experts modules of each family on tiny random weights: the reference for parity tests."""

from __future__ import annotations

import importlib

import torch
from transformers import DeepseekV3Config, MixtralConfig, Qwen3MoeConfig

# Odd sizes on purpose: no dimension is a multiple of any SIMD width.
NUM_EXPERTS, HIDDEN, INTERMEDIATE = 7, 37, 19


def experts_class(family: str, prefix: str) -> type[torch.nn.Module]:
    """The family's fused experts class; its name changed across transformers 5.x releases."""
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    for name in (f"{prefix}Experts", f"{prefix}NaiveMoe"):
        if hasattr(modeling, name):
            return getattr(modeling, name)
    raise ImportError(f"no fused experts class in {modeling.__name__}")


FAMILIES = {
    "qwen3_moe": (
        experts_class("qwen3_moe", "Qwen3Moe"),
        lambda: Qwen3MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=INTERMEDIATE, num_experts=NUM_EXPERTS),
    ),
    "deepseek_v3": (
        experts_class("deepseek_v3", "DeepseekV3"),
        lambda: DeepseekV3Config(hidden_size=HIDDEN, moe_intermediate_size=INTERMEDIATE, n_routed_experts=NUM_EXPERTS),
    ),
    "mixtral": (
        experts_class("mixtral", "Mixtral"),
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

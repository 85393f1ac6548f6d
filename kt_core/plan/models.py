"""Shapes of the MoE models the projection knows, from their published configs (no download needed).

Legend: L = decoder layers, D = leading dense layers, H = hidden, I = routed-expert intermediate, E = routed
experts, K = experts per token, S = shared experts (each of intermediate I), F = dense-layer intermediate,
V = vocabulary, A = attention parameters per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MODELS", "ModelShape"]


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int  # L
    dense_layers: int  # D: leading layers with a dense MLP instead of experts
    hidden: int  # H
    expert_intermediate: int  # I
    experts: int  # E
    experts_per_token: int  # K
    shared_experts: int  # S
    dense_intermediate: int  # F
    vocab: int  # V
    attention_params: int  # A
    attention_width: int  # query heads x head dim: the attention-score FLOPs per token and context position

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers

    def expert_params(self) -> int:
        """Weights of one routed expert: gate, up and down."""
        return 3 * self.hidden * self.expert_intermediate

    def layer_params_on_gpu(self, moe: bool) -> int:
        """Non-routed weights of one layer: attention, norms, router, shared experts or the dense MLP."""
        mlp = (
            self.shared_experts * self.expert_params() + self.experts * self.hidden
            if moe
            else 3 * self.hidden * self.dense_intermediate
        )
        return self.attention_params + mlp + 2 * self.hidden

    def total_params(self) -> int:
        gpu = self.moe_layers * self.layer_params_on_gpu(True) + self.dense_layers * self.layer_params_on_gpu(False)
        return gpu + self.moe_layers * self.experts * self.expert_params() + 2 * self.vocab * self.hidden


def _mla(hidden: int, heads: int, q_rank: int | None, kv_rank: int, nope: int, rope: int, v: int) -> int:
    """Parameters of DeepSeek's multi-head latent attention."""
    q = hidden * heads * (nope + rope) if q_rank is None else hidden * q_rank + q_rank * heads * (nope + rope)
    return q + hidden * (kv_rank + rope) + kv_rank * heads * (nope + v) + heads * v * hidden


def _gqa(hidden: int, heads: int, kv_heads: int, head_dim: int) -> int:
    return hidden * head_dim * (2 * heads + 2 * kv_heads)


MODELS = {
    m.name: m
    for m in (
        ModelShape("deepseek-v3", 61, 3, 7168, 2048, 256, 8, 1, 18432, 129280,
                   _mla(7168, 128, 1536, 512, 128, 64, 128), 128 * 192),
        ModelShape("kimi-k2", 61, 1, 7168, 2048, 384, 8, 1, 18432, 163840,
                   _mla(7168, 64, 1536, 512, 128, 64, 128), 64 * 192),
        ModelShape("qwen3-235b-a22b", 94, 0, 4096, 1536, 128, 8, 0, 12288, 151936, _gqa(4096, 64, 4, 128), 64 * 128),
        ModelShape("qwen3-30b-a3b", 48, 0, 2048, 768, 128, 8, 0, 6144, 151936, _gqa(2048, 32, 4, 128), 32 * 128),
        ModelShape("deepseek-v2-lite", 27, 1, 2048, 1408, 64, 6, 2, 10944, 102400,
                   _mla(2048, 16, None, 512, 128, 64, 128), 16 * 192),
    )
}  # fmt: skip

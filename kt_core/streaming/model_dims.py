"""What the GPU memory plan reads of a model: each decoder layer's linears and the routed experts' shapes.

`model_dims` reads a meta model before loading or the loaded (PEFT-wrapped) one; kt_core.streaming.memory_plan
turns the result into bytes.

Legend: H = hidden, V = vocab, E = experts, K = experts per token, I = expert intermediate, r = expert-LoRA rank.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kt_core.streaming.planner import stored_expert_bytes

__all__ = ["LayerDims", "ModelDims", "matches_lora_target", "model_dims"]

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class LayerDims:
    """One decoder layer, per token: what its non-expert linears take and produce.

    Attributes:
        linear: sum over its non-expert linears of in_features + out_features.
        widest: the largest out_features among them.
        lora_inputs: sum of in_features of its LoRA'd linears with dropout (dropout copies their input).
        moe: whether it has routed experts.
    """

    linear: int
    widest: int
    lora_inputs: int = 0
    moe: bool = False


@dataclass(frozen=True)
class ModelDims:
    """The shapes the plan reads of a model (model_dims builds it).

    Attributes:
        hidden, vocab, heads: H, V, attention heads.
        layers: the decoder layers on the planned GPU, in order.
        experts, top_k, expert_intermediate: E, K, I of the routed experts (0 without any).
        expert_item: bytes per expert weight in the host stores (2 for bf16, 1 for FP8).
        expert_block: the quantization block of FP8 experts (fp32 scales per block), None when not FP8.
        expert_lora_rank: r of the expert LoRA (0: none).
        moe_layers: MoE layers in the whole model (all of them stream, whatever GPU the rest is on).
    """

    hidden: int
    vocab: int
    heads: int
    layers: tuple[LayerDims, ...]
    experts: int = 0
    top_k: int = 0
    expert_intermediate: int = 0
    expert_item: int = 2
    expert_lora_rank: int = 0
    moe_layers: int = 0
    expert_block: tuple[int, int] | None = None

    @property
    def expert_bytes(self) -> int:
        """One expert's weights (gate_up [2I, H] and down [H, I]) as stored, FP8 block scales included."""
        return stored_expert_bytes(self.hidden, self.expert_intermediate, self.expert_item, self.expert_block)


def _experts_modules(model: nn.Module) -> list[nn.Module]:
    """Routed-experts modules: KTExperts, or Hugging Face's fused experts ([E, 2I, H] gate_up_proj)."""
    found = []
    for module in model.modules():
        gate_up = module._parameters.get("gate_up_proj") if hasattr(module, "_parameters") else None
        if gate_up is not None and gate_up.dim() == 3 and "down_proj" in module._parameters:
            found.append(module)
    return found


def _lora_dropout_p(module: nn.Module) -> float:
    dropout = getattr(module, "lora_dropout", None)
    if isinstance(dropout, nn.ModuleDict):
        return max((getattr(d, "p", 0.0) for d in dropout.values()), default=0.0)
    return 0.0


def model_dims(
    model: nn.Module,
    *,
    include: Callable[[str, nn.Module], bool] | None = None,
    lora_targets: list[str] | None = None,
    lora_dropout: float = 0.0,
    expert_lora_rank: int | None = None,
) -> ModelDims:
    """The shapes of `model` the plan reads: a meta model before loading, or the loaded (PEFT-wrapped) one.

    Args:
        model: a transformers causal LM with routed experts, or a wrapper of one.
        include: (module name, linear) -> whether that linear is on the planned GPU; a decoder layer counts when
            its linears are there (None: every layer).
        lora_targets: the LoRA targets of a model not wrapped yet ("all", or module names PEFT matches by suffix),
            for the dropout copies; None reads PEFT's LoRA layers in the model.
        lora_dropout: the dropout of those targets.
        expert_lora_rank: r of the expert LoRA; None reads the KTExperts' LoRA.
    """
    config = model.config
    layers: dict[int, dict] = {}
    experts = _experts_modules(model)
    inside_experts = {id(m) for e in experts for m in e.modules()}
    for name, module in model.named_modules():
        found = _LAYER.search(name + ".")
        if found is None:
            continue
        layer = layers.setdefault(int(found.group(1)), {"linear": 0, "widest": 0, "lora": 0, "moe": False, "on": 0})
        if id(module) in inside_experts:
            layer["moe"] = True
            continue
        if isinstance(module, nn.Linear) and "lora_" not in name:
            if include is None or include(name, module):
                layer["on"] += 1
            layer["linear"] += module.in_features + module.out_features
            layer["widest"] = max(layer["widest"], module.out_features)
            if (
                lora_targets is not None
                and lora_dropout > 0
                and matches_lora_target(name.removesuffix(".base_layer"), lora_targets)
            ):
                layer["lora"] += module.in_features
        elif lora_targets is None and _lora_dropout_p(module) > 0:
            layer["lora"] += getattr(module, "in_features", 0) or 0
    first = experts[0] if experts else None
    E, two_I = first.gate_up_proj.shape[:2] if first is not None else (0, 0)
    fp8 = first is not None and first.gate_up_proj.dtype == torch.float8_e4m3fn
    if expert_lora_rank is None:
        ranks = [m.lora.rank for m in experts if getattr(m, "lora", None) is not None]
        expert_lora_rank = max(ranks, default=0)
    return ModelDims(
        hidden=config.hidden_size,
        vocab=config.vocab_size,
        heads=getattr(config, "num_attention_heads", 0) or 0,
        layers=tuple(
            LayerDims(linear=v["linear"], widest=v["widest"], lora_inputs=v["lora"], moe=v["moe"])
            for _, v in sorted(layers.items())
            if v["on"] or not v["linear"]
        ),
        experts=E,
        top_k=(getattr(config, "num_experts_per_tok", 0) or 0) if experts else 0,
        expert_intermediate=two_I // 2,
        expert_item=1 if fp8 else 2 if first is None or first.gate_up_proj.dtype != torch.float32 else 4,
        expert_lora_rank=expert_lora_rank,
        moe_layers=len(experts),
        expert_block=_fp8_block(first, config) if fp8 else None,
    )


def _fp8_block(experts: nn.Module, config) -> tuple[int, int]:
    """The quantization block of FP8 experts: KTExperts', else the checkpoint's quantization_config, else 128 x 128."""
    from kt_core.loading.fp8 import DEFAULT_BLOCK, fp8_block_size

    block = getattr(experts, "weight_block_size", None)
    if block is None:
        quant = getattr(config, "quantization_config", None)
        quant = quant if isinstance(quant, dict) else getattr(quant, "to_dict", dict)()
        block = fp8_block_size({"quantization_config": quant})
    return tuple(int(b) for b in block or DEFAULT_BLOCK)


def matches_lora_target(name: str, targets: list[str]) -> bool:
    """PEFT's matching of target_modules names, with LLaMA-Factory's "all" (every linear but lm_head)."""
    if "all" in targets:
        return "lm_head" not in name
    return any(name == t or name.endswith("." + t) for t in targets)

"""Expert LoRA of a kt-plugins (PEFT-format) adapter, served by the `--kt-experts` method.

A PEFT adapter trained with kt-plugins stores the routed experts' LoRA as `target_parameters` on
`mlp.experts.gate_up_proj` / `down_proj` (PEFT's ParamWrapper keys, `...mlp.experts.[base_layer.]lora_A.weight`,
see kt_core.peft.keys). SGLang's own LoRA support knows nothing of those; the rest of the adapter
(attention, dense MLPs, shared experts) is SGLang's to serve with `--lora-paths`.

- CPU experts: the factors go to `KTExperts.add_lora`, computed unmerged by the CPU operator.
- GPU experts: SGLang's kernels have no expert LoRA, so the update is merged into their weights once at
  load (one adapter per server; TP size 1).

Which fused parameter a pair of tensors belongs to is read from the shapes (gate_up: lora_A [r*E, 2I],
lora_B [H, r*E]; down: lora_A [r*E, H], lora_B [I, r*E]), not from the nesting depth, so the order in which
PEFT nested the two wrappers does not matter.

Legend: E = experts, H = hidden, I = expert intermediate, r = rank.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass, field

import torch

from kt_core.peft import EXPERT_PARAMETERS, AdapterFolder, expert_factors_from_peft

__all__ = ["ExpertLoRAAdapter", "apply_expert_lora", "read_expert_lora"]

logger = logging.getLogger(__name__)

_EXPERTS_MODULE = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.experts$")  # routed experts of decoder layer N


@dataclass
class ExpertLoRAAdapter:
    """The expert LoRA tensors of one adapter directory, by layer, still in PEFT's layout.

    Attributes:
        path: the adapter directory.
        rank: r.
        scaling: alpha / r (alpha / sqrt(r) with rsLoRA).
        layers: {layer index: {nesting depth: {"A": lora_A [r*E, d1], "B": lora_B [d2, r*E]}}}.
    """

    path: str
    rank: int
    scaling: float
    layers: dict[int, dict[int, dict[str, torch.Tensor]]] = field(default_factory=dict)


@functools.lru_cache(maxsize=4)
def read_expert_lora(path: str) -> ExpertLoRAAdapter:
    """Reads the expert LoRA of a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."""
    folder = AdapterFolder(path)
    try:
        config = folder.config()
        weights = folder.load_lora(lambda key: _EXPERTS_MODULE.search(key.module) is not None)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"--kt-experts-lora: {exc}") from None
    for key in ("rank_pattern", "alpha_pattern"):
        if any("experts" in pattern for pattern in config.get(key) or {}):
            raise ValueError(f"--kt-experts-lora: {path}: per-module {key} on the experts is not supported")
    adapter = ExpertLoRAAdapter(str(folder.path), *folder.rank_and_scaling())
    for key, tensor in weights:
        layer = int(_EXPERTS_MODULE.search(key.module).group(1))
        adapter.layers.setdefault(layer, {}).setdefault(key.depth, {})[key.which] = tensor
    if not adapter.layers:
        logger.warning("--kt-experts-lora: %s holds no expert LoRA (mlp.experts target_parameters)", path)
    return adapter


def _factors_for_layer(adapter: ExpertLoRAAdapter, layer_idx: int, E: int, H: int, I: int) -> dict[str, torch.Tensor]:
    """{"gate_up_A": [E, r, H], "gate_up_B": [E, 2I, r], ...} for the parameters this layer's LoRA targets."""
    factors: dict[str, torch.Tensor] = {}
    for depth, pair in sorted(adapter.layers.get(layer_idx, {}).items()):
        where = f"--kt-experts-lora: {adapter.path}, layer {layer_idx}"
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{where}: lora_A / lora_B incomplete at nesting depth {depth} (found {sorted(pair)})")
        lora_A, lora_B = pair["A"], pair["B"]  # [r*E, d1], [d2, r*E]
        dims = (lora_A.shape[1], lora_B.shape[0])
        param = {(2 * I, H): "gate_up_proj", (H, I): "down_proj"}.get(dims)
        if param is None:
            raise ValueError(
                f"{where}: expert LoRA of shapes {tuple(lora_A.shape)} / {tuple(lora_B.shape)} fits neither "
                f"gate_up_proj (lora_A [r*E, {2 * I}], lora_B [{H}, r*E]) nor down_proj (lora_A [r*E, {H}], "
                f"lora_B [{I}, r*E]) of this model (E = {E})"
            )
        a_name, b_name = EXPERT_PARAMETERS[param]
        factors[a_name], factors[b_name] = expert_factors_from_peft(lora_A, lora_B, E)
        if factors[a_name].shape[1] != adapter.rank:
            raise ValueError(
                f"{where}: {param} has rank {factors[a_name].shape[1]}, adapter_config says {adapter.rank}"
            )
    return factors


def apply_expert_lora(method, layer: torch.nn.Module, path: str) -> None:
    """Puts the adapter's expert LoRA of `layer` on both halves of a KTExpertsMethod.

    Args:
        method: the layer's KTExpertsMethod (after its weights were loaded).
        layer: the FusedMoE layer (its w13_weight [N_gpu, 2I, H] / w2_weight [N_gpu, H, I]).
        path: the adapter directory.
    """
    adapter = read_expert_lora(path)
    layer_idx = method.kt_config.layer_idx
    E = method.global_num_experts
    H = layer.hidden_size
    I = layer.intermediate_size_per_partition * getattr(layer, "moe_tp_size", 1)
    factors = _factors_for_layer(adapter, layer_idx, E, H, I)
    if not factors:
        return
    if method.cpu_experts is not None:
        cpu_rows = torch.tensor(method.cpu_ids, dtype=torch.long)
        lora = method.cpu_experts.add_lora(adapter.rank, adapter.scaling * adapter.rank)
        with torch.no_grad():
            for name in ("gate_up_A", "gate_up_B", "down_A", "down_B"):
                target = getattr(lora, name)
                if name in factors:
                    target.copy_(factors[name].index_select(0, cpu_rows))
                else:  # the adapter does not target this parameter
                    target.zero_()
        lora.requires_grad_(False)
    if method.num_gpu_experts > 0:
        _merge_into_gpu_experts(method, layer, factors, adapter.scaling)


def _merge_into_gpu_experts(method, layer, factors: dict[str, torch.Tensor], scaling: float) -> None:
    where = f"--kt-experts-lora (layer {method.kt_config.layer_idx})"
    if getattr(layer, "moe_tp_size", 1) > 1:
        raise NotImplementedError(
            f"{where}: merging expert LoRA into GPU experts needs --tp-size 1; or keep all "
            "experts on the CPU (--kt-experts-gpu-experts 0)"
        )
    up_first = bool(getattr(method.gpu_method, "load_up_proj_weight_first", False))
    with torch.no_grad():
        for row, expert in enumerate(method.gpu_ids):
            if "gate_up_A" in factors:
                delta = scaling * factors["gate_up_B"][expert] @ factors["gate_up_A"][expert]  # [2I, H]
                if up_first:
                    delta = torch.cat(delta.chunk(2, dim=0)[::-1])
                w = layer.w13_weight.data[row]
                w.copy_((w.float() + delta.to(w.device)).to(w.dtype))
            if "down_A" in factors:
                delta = scaling * factors["down_B"][expert] @ factors["down_A"][expert]  # [H, I]
                w = layer.w2_weight.data[row]
                w.copy_((w.float() + delta.to(w.device)).to(w.dtype))

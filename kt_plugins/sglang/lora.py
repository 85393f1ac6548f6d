"""Expert LoRA of a kt-plugins (PEFT-format) adapter, served by the `--kt-experts` method.

A PEFT adapter trained with kt-plugins stores the routed experts' LoRA as `target_parameters` on
`mlp.experts.gate_up_proj` / `down_proj` (PEFT's ParamWrapper keys, `...mlp.experts.[base_layer.]lora_A.weight`,
see kt_core.peft.keys). SGLang's own LoRA support knows nothing of those; the rest of the adapter
(attention, dense MLPs, shared experts) is SGLang's to serve with `--lora-paths`.

- CPU experts: the factors go to `KTExperts.add_lora`, computed unmerged by the CPU operator.
- GPU experts: SGLang's kernels have no expert LoRA, so the update is merged into their weights once at
  load (one adapter per server; TP size 1).

The factor layout is the one of the PEFT release that saved the adapter (`peft_version` in adapter_config.json;
kt_core.peft.layout): shapes alone cannot tell the layouts apart when H == 2*I or H == I, so an adapter whose
config does not name its release is refused. Within the layout, which fused parameter a pair of tensors belongs
to is read from the shapes, not from the nesting depth, so the order in which PEFT nested the two wrappers does
not matter:
    PEFT < 0.19:   gate_up: lora_A [r*E, 2I], lora_B [H, r*E]     down: lora_A [r*E, H], lora_B [I, r*E]
    PEFT >= 0.19:  gate_up: lora_A [r*E, H], lora_B [2I, r*E]     down: lora_A [r*E, I], lora_B [H, r*E]

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
        swapped: the tensors are in the in/out-swapped layout of PEFT >= 0.19.
        layers: {layer index: {nesting depth: {"A": lora_A.weight, "B": lora_B.weight}}}.
    """

    path: str
    rank: int
    scaling: float
    swapped: bool
    layers: dict[int, dict[int, dict[str, torch.Tensor]]] = field(default_factory=dict)

    def layer_factors(self, layer_idx: int, E: int, H: int, I: int) -> dict[str, torch.Tensor]:
        """{"gate_up_A": [E, r, H], "gate_up_B": [E, 2I, r], ...} for the parameters this layer's LoRA targets.

        Raises:
            ValueError: a lora_A / lora_B pair is incomplete, fits neither parameter in the adapter's layout, or
                has another rank than adapter_config.json.
        """
        where = f"--kt-experts-lora: {self.path}, layer {layer_idx}"
        layout = "PEFT >= 0.19" if self.swapped else "PEFT < 0.19"
        # (lora_A.shape[1], lora_B.shape[0]) of each fused parameter P [E, d1, d2], in the adapter's layout
        expected = {
            param: (d2, d1) if self.swapped else (d1, d2)
            for param, (d1, d2) in (("gate_up_proj", (2 * I, H)), ("down_proj", (H, I)))
        }
        factors: dict[str, torch.Tensor] = {}
        for depth, pair in sorted(self.layers.get(layer_idx, {}).items()):
            if set(pair) != {"A", "B"}:
                raise ValueError(f"{where}: lora_A / lora_B incomplete at nesting depth {depth} (found {sorted(pair)})")
            lora_A, lora_B = pair["A"], pair["B"]
            found = (lora_A.shape[1], lora_B.shape[0])
            param = next((name for name, dims in expected.items() if dims == found), None)
            if param is None:
                fits = " nor ".join(
                    f"{name} (lora_A [r*E, {a}], lora_B [{b}, r*E])" for name, (a, b) in expected.items()
                )
                raise ValueError(
                    f"{where}: expert LoRA of shapes {tuple(lora_A.shape)} / {tuple(lora_B.shape)} fits neither {fits} "
                    f"of this model (E = {E}) in the {layout} layout that adapter_config.json's peft_version names"
                )
            a_name, b_name = EXPERT_PARAMETERS[param]
            factors[a_name], factors[b_name] = expert_factors_from_peft(lora_A, lora_B, E, swapped=self.swapped)
            if factors[a_name].shape[1] != self.rank:
                raise ValueError(
                    f"{where}: {param} has rank {factors[a_name].shape[1]}, adapter_config says {self.rank}"
                )
        return factors


@functools.lru_cache(maxsize=4)
def read_expert_lora(path: str) -> ExpertLoRAAdapter:
    """Reads the expert LoRA of a PEFT adapter directory (adapter_config.json + adapter_model.safetensors).

    Raises:
        FileNotFoundError: a file of the adapter is missing.
        ValueError: adapter_config.json does not tell the factor layout (`peft_version`), or sets a per-module
            rank / alpha on the experts.
    """
    folder = AdapterFolder(path)
    try:
        config = folder.config()
        swapped = folder.expert_layout_swapped()
        weights = folder.load_lora(lambda key: _EXPERTS_MODULE.search(key.module) is not None)
    except (FileNotFoundError, ValueError) as exc:
        raise type(exc)(f"--kt-experts-lora: {exc}") from None
    for key in ("rank_pattern", "alpha_pattern"):
        if any("experts" in pattern for pattern in config.get(key) or {}):
            raise ValueError(f"--kt-experts-lora: {path}: per-module {key} on the experts is not supported")
    adapter = ExpertLoRAAdapter(str(folder.path), *folder.rank_and_scaling(), swapped=swapped)
    for key, tensor in weights:
        layer = int(_EXPERTS_MODULE.search(key.module).group(1))
        adapter.layers.setdefault(layer, {}).setdefault(key.depth, {})[key.which] = tensor
    if not adapter.layers:
        logger.warning("--kt-experts-lora: %s holds no expert LoRA (mlp.experts target_parameters)", path)
    return adapter


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
    factors = adapter.layer_factors(layer_idx, E, H, I)
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

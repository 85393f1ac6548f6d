"""Mapping checkpoint tensor names to the model: non-expert tensors, expert tensors, FP8 scales, packed ints.

Expert tensors come in two namings, both read here:
- per expert, as DeepSeek, Qwen, GLM and Mixtral publish them (and as transformers 5 saves them):
  `model.layers.3.mlp.experts.7.gate_proj.weight` (Mixtral: `block_sparse_moe.experts.7.w1.weight`);
- fused, as the transformers 5 module holds them: `model.layers.3.mlp.experts.gate_up_proj` [E, 2I, H]
  and `model.layers.3.mlp.experts.down_proj` [E, H, I].
A compressed-tensors pack-quantized weight (`<name>.weight_packed` with `_scale` / `_shape` companions) maps as
`<name>.weight` would; its key stays the packed one, which the loader dequantizes (kt_core/loading/packed_int.py).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from torch import nn

from kt_core.architectures.spec import Architecture
from kt_core.loading.checkpoint import Checkpoint
from kt_core.loading.packed_int import COMPANIONS, PACKED_SUFFIX

__all__ = ["CheckpointMap", "ExpertTensor", "map_checkpoint"]

logger = logging.getLogger(__name__)

SCALE_SUFFIX = "_scale_inv"  # DeepSeek FP8: `<name>.weight_scale_inv` next to `<name>.weight`


@dataclass(frozen=True)
class ExpertTensor:
    """One checkpoint tensor of an experts module.

    Attributes:
        key: checkpoint name.
        expert: expert index e, or None for a fused tensor of all experts.
        proj: "gate", "up", "down" (per expert) or "gate_up", "down" (fused).
        scale_key: checkpoint name of its FP8 block scales, if any.
    """

    key: str
    expert: int | None
    proj: str
    scale_key: str | None = None


@dataclass
class CheckpointMap:
    """Where each checkpoint tensor goes.

    Attributes:
        tensors: {model tensor name: checkpoint key} for non-expert tensors.
        scales: {checkpoint key of an FP8 weight: checkpoint key of its scales}.
        experts: {experts module name: its checkpoint tensors}.
        unexpected: checkpoint keys the model has no place for (skipped).
    """

    tensors: dict[str, str] = field(default_factory=dict)
    scales: dict[str, str] = field(default_factory=dict)
    experts: dict[str, list[ExpertTensor]] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)


def _expert_regexes(arch: Architecture) -> tuple[re.Pattern, re.Pattern]:
    p = arch.projections
    names = "|".join(re.escape(n) for n in (p.gate, p.up, p.down))
    per_expert = re.compile(rf"^(?P<module>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>{names})\.weight$")
    fused = re.compile(r"^(?P<module>.+\.experts)\.(?P<proj>gate_up_proj|down_proj)(?:\.weight)?$")
    return per_expert, fused


def _packed_companion(key: str, keys: set[str]) -> bool:
    """`<name>.weight_scale` / `_shape` / ... next to a `<name>.weight_packed`: read with it, not mapped."""
    stem, _, suffix = key.rpartition(".weight")
    return f"_{suffix.lstrip('_')}" in COMPANIONS and f"{stem}.weight{PACKED_SUFFIX}" in keys


def map_checkpoint(checkpoint: Checkpoint, model: nn.Module, arch: Architecture) -> CheckpointMap:
    """Classifies every checkpoint tensor against a (meta) model.

    Args:
        checkpoint: the opened checkpoint.
        model: the model built from its config.
        arch: its family (checkpoint renames, expert projection names, experts modules).
    """
    experts_modules = {name for name, _ in model.named_modules() if arch.is_experts_module(name)}
    targets = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    targets |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    per_expert, fused = _expert_regexes(arch)
    roles = {arch.projections.gate: "gate", arch.projections.up: "up", arch.projections.down: "down"}
    out = CheckpointMap(experts={name: [] for name in experts_modules})
    keys = set(checkpoint.tensors)
    for key in sorted(keys):
        if key.endswith(SCALE_SUFFIX):
            weight_key = key[: -len(SCALE_SUFFIX)]
            if weight_key in keys:
                out.scales[weight_key] = key
                continue
        if _packed_companion(key, keys):
            continue
        packed = key.endswith(".weight" + PACKED_SUFFIX)
        name = arch.rename_checkpoint_key(key.removesuffix(PACKED_SUFFIX) if packed else key)
        m = per_expert.match(name)
        if m and m["module"] in experts_modules:
            out.experts[m["module"]].append(ExpertTensor(key, int(m["expert"]), roles[m["proj"]]))
            continue
        m = fused.match(name)
        if m and m["module"] in experts_modules:
            proj = "gate_up" if m["proj"] == "gate_up_proj" else "down"
            out.experts[m["module"]].append(ExpertTensor(key, None, proj))
            continue
        if name in targets:
            out.tensors[name] = key
        else:
            out.unexpected.append(key)
    for module, tensors in out.experts.items():
        out.experts[module] = [ExpertTensor(t.key, t.expert, t.proj, out.scales.get(t.key)) for t in tensors]
    if out.unexpected:
        logger.info(
            "%d checkpoint tensors have no place in the model and are skipped (e.g. %s)",
            len(out.unexpected),
            ", ".join(out.unexpected[:3]),
        )
    return out

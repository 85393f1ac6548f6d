"""What a model family declares so that kt_core can load it with its routed experts on the CPU.

A family costs a registration, not a modeling file: the model code stays Hugging Face's, and the
declaration says where the experts modules are and how the checkpoint names their weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Architecture", "ExpertProjections"]

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class ExpertProjections:
    """Checkpoint names of one expert's three projections (`...experts.<e>.<name>.weight`)."""

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


@dataclass(frozen=True)
class Architecture:
    """A model family: its config model types and where its routed experts live.

    Args:
        name: registry key, lowercase (`deepseek_v3`).
        model_types: `config.json` model_type values this family loads (`deepseek_v3`, `kimi_k2`).
        description: the models it covers, shown in the unknown-architecture error.
        experts_pattern: regex (re.search) on module names matching each routed-experts module of the
            transformers model, e.g. `model.layers.3.mlp.experts`.
        layers_path: dotted path of the decoder layers' ModuleList (split over GPUs by layer ranges).
        projections: per-expert checkpoint names of gate / up / down.
        checkpoint_renames: (regex, replacement) pairs mapping checkpoint keys to model keys, applied
            in order (Mixtral: `.block_sparse_moe.` -> `.mlp.`).
        config_class: builds the transformers config from the `config.json` dict for model types that
            transformers does not know by that name (Kimi-K2 ships `kimi_k2` with DeepSeek-V3's layout).
        default_rules: optional callable(devices) -> list of PlacementRule that replaces the generic
            defaults (experts on the CPU, the rest on the GPU).
    """

    name: str
    model_types: tuple[str, ...]
    description: str = ""
    experts_pattern: str = r"^model\.layers\.\d+\.mlp\.experts$"
    layers_path: str = "model.layers"
    projections: ExpertProjections = field(default_factory=ExpertProjections)
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    config_class: Callable[[dict[str, Any]], Any] | None = None
    default_rules: Callable[[list[str]], list] | None = None

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"Architecture name {self.name!r} must be lowercase: letters, digits, underscores")
        if not self.model_types:
            raise ValueError(f"Architecture {self.name!r}: model_types must name at least one config model_type")
        try:
            re.compile(self.experts_pattern)
            for pattern, _ in self.checkpoint_renames:
                re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"Architecture {self.name!r}: bad regex: {exc}") from exc

    def is_experts_module(self, module_name: str) -> bool:
        """Whether `module_name` (e.g. `model.layers.3.mlp.experts`) is one of the routed-experts modules."""
        return re.search(self.experts_pattern, module_name) is not None

    def rename_checkpoint_key(self, key: str) -> str:
        """Maps a checkpoint tensor name to the transformers model's name."""
        for pattern, replacement in self.checkpoint_renames:
            key = re.sub(pattern, replacement, key)
        return key

    def build_config(self, config_dict: dict[str, Any]):
        """Returns the transformers config for this `config.json` dict."""
        if self.config_class is not None:
            return self.config_class(config_dict)
        from transformers import AutoConfig

        cfg = dict(config_dict)
        model_type = cfg.pop("model_type")
        return AutoConfig.for_model(model_type, **cfg)

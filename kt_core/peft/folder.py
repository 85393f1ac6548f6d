"""The adapter folder PEFT's `save_pretrained` writes, read without peft.

    <folder>/adapter_config.json        the LoraConfig: r, lora_alpha, use_rslora, rank_pattern, alpha_pattern,
                                        target_modules, target_parameters, peft_version, ...
    <folder>/adapter_model.safetensors  {key: tensor}, keys as in keys.py without the adapter name
    <folder>/adapter_model.bin          the same, torch.save'd (PEFT with safe_serialization=False)

Only the LoRA weights are read (keys that keys.py parses); of a safetensors file only those asked for. The
factor layout of the expert LoRA is the one of the PEFT release that saved the folder (`peft_version`, see
layout.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kt_core.peft.keys import LoraKey, parse_lora_key
from kt_core.peft.layout import SWAPPED_SINCE, peft_scaling, peft_version_layout_swapped

__all__ = ["AdapterFolder"]

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class AdapterFolder:
    """A PEFT adapter folder.

    Args:
        path: the folder.
    """

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def weights_file(self) -> Path | None:
        """adapter_model.safetensors, else adapter_model.bin, else None."""
        return next((self.path / f for f in WEIGHT_FILES if (self.path / f).is_file()), None)

    def config(self) -> dict[str, Any]:
        """adapter_config.json, parsed.

        Raises:
            FileNotFoundError: the folder has no adapter_config.json.
        """
        config_file = self.path / CONFIG_FILE
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found (expected a PEFT adapter folder)")
        return json.loads(config_file.read_text())

    def rank_and_scaling(self) -> tuple[int, float]:
        """(r, the LoRA scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA) of adapter_config.json."""
        config = self.config()
        rank = int(config["r"])
        alpha = float(config.get("lora_alpha", rank))
        return rank, peft_scaling(rank, alpha, bool(config.get("use_rslora", False)))

    def expert_layout_swapped(self) -> bool:
        """Whether the expert LoRA is saved in the in/out-swapped factor layout of PEFT >= 0.19 (layout.py).

        Told by `peft_version` of adapter_config.json, which every PEFT release since 0.18.0 writes; never by the
        shapes, which are the same in both layouts when H == 2*I or H == I.

        Raises:
            ValueError: `peft_version` is missing, or does not tell the layout; the message names the file.
        """
        config_file = self.path / CONFIG_FILE
        version = self.config().get("peft_version")
        swapped = peft_version_layout_swapped(version) if isinstance(version, str) else None
        if swapped is None:
            found = "no `peft_version`" if version is None else f"`peft_version` {version!r}"
            raise ValueError(
                f"{config_file}: {found}, which does not tell the factor layout of the expert LoRA (expected the "
                f'PEFT release that saved the adapter, as PEFT >= 0.18 records it, e.g. "0.18.1": releases '
                f"before {SWAPPED_SINCE} save lora_A [r*E, out], later ones lora_A [r*E, in])"
            )
        return swapped

    def lora_shapes(self) -> Iterator[tuple[str, LoraKey, tuple[int, ...]]]:
        """Every LoRA weight of the adapter: (key, parsed key, shape); of a safetensors file only the header is read."""
        weights = self._weights()
        if weights.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    parsed = parse_lora_key(key)
                    if parsed is not None:
                        yield key, parsed, tuple(f.get_slice(key).get_shape())
            return
        for key, tensor in self._load_bin(weights).items():
            parsed = parse_lora_key(key)
            if parsed is not None:
                yield key, parsed, tuple(tensor.shape)

    def load_lora(self, keep: Callable[[LoraKey], bool]) -> list[tuple[LoraKey, torch.Tensor]]:
        """The LoRA weights whose parsed key `keep` accepts; of a safetensors file only those are read."""
        weights = self._weights()
        if weights.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as f:
                wanted = [(key, parse_lora_key(key)) for key in f.keys()]  # noqa: SIM118 - no __iter__
                return [(parsed, f.get_tensor(key)) for key, parsed in wanted if parsed is not None and keep(parsed)]
        state = self._load_bin(weights)
        wanted = [(key, parse_lora_key(key)) for key in state]
        return [(parsed, state[key]) for key, parsed in wanted if parsed is not None and keep(parsed)]

    def _weights(self) -> Path:
        weights = self.weights_file
        if weights is None:
            raise FileNotFoundError(f"no {' or '.join(WEIGHT_FILES)} in {self.path}")
        return weights

    @staticmethod
    def _load_bin(weights: Path) -> dict[str, torch.Tensor]:
        return torch.load(weights, map_location="cpu", weights_only=True)

"""The state-dict keys of PEFT's LoRA: one grammar for every reader and writer of them.

    [base_model.model.]<module>.[base_layer.]*lora_{A,B}[.<adapter>].weight

- `base_model.model.`: a PeftModel's prefix (its LoraModel, then the transformers model); saved adapters
  and `PeftModel.state_dict()` carry it, the state dict of a module below it does not.
- `<module>`: the adapted module as the transformers model names it (`model.layers.3.mlp.experts`);
  empty for a key relative to that module (its own `state_dict()`).
- `base_layer.` repeated `depth` times: PEFT wrappers nested around one module. Each targeted parameter of an
  experts module gets its own `ParamWrapper`; the one created first is the inner one, so its keys carry one
  more `base_layer.` (PEFT wraps gate_up_proj first whatever the order of `target_parameters`).
- `<adapter>`: the adapter's name in memory (`default`); saved adapter files leave it out.

Example, both expert parameters of layer 3 targeted, as a saved adapter holds them:
    base_model.model.model.layers.3.mlp.experts.base_layer.lora_A.weight   gate_up_proj (depth 1)
    base_model.model.model.layers.3.mlp.experts.lora_A.weight              down_proj    (depth 0)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["PEFT_MODEL_PREFIX", "LoraKey", "lora_key", "parse_lora_key"]

PEFT_MODEL_PREFIX = "base_model.model."

# The optional module group is lazy, so a relative key's leading `base_layer.`s count as nesting.
_LORA_KEY = re.compile(
    r"^(?:(?P<module>.+?)\.)??(?P<nesting>(?:base_layer\.)*)lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$"
)


@dataclass(frozen=True)
class LoraKey:
    """One parsed LoRA key.

    Attributes:
        module: the adapted module's name without PEFT_MODEL_PREFIX; "" for a key relative to it.
        depth: how many `base_layer.` precede `lora_` (0: the outermost wrapper).
        which: "A" or "B".
        adapter: the adapter name, or None in saved adapter files.
    """

    module: str
    depth: int
    which: str
    adapter: str | None


def parse_lora_key(key: str) -> LoraKey | None:
    """Parses a LoRA weight key (full, saved or relative); None for any other key."""
    match = _LORA_KEY.match(key.removeprefix(PEFT_MODEL_PREFIX))
    if match is None:
        return None
    depth = len(match["nesting"]) // len("base_layer.")
    return LoraKey(match["module"] or "", depth, match["which"], match["adapter"])


def lora_key(depth: int, which: str, adapter: str | None = None) -> str:
    """The key of a LoRA weight relative to its module: `[base_layer.]*lora_{which}[.<adapter>].weight`."""
    return f"{'base_layer.' * depth}lora_{which}{f'.{adapter}' if adapter else ''}.weight"

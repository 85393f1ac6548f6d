"""Built-in placement rules per architecture, so that no YAML file is needed.

The default: every routed-experts module of the family on the CPU operator ("kt" backend), every
other module Hugging Face's own on the target device (or split over several devices by layers).
"""

from __future__ import annotations

from collections.abc import Sequence

from kt_core.architectures.spec import Architecture
from kt_core.placement.schema import PlacementRule, RuleMatch, RuleReplace

__all__ = ["default_rules"]


def default_rules(arch: Architecture, devices: Sequence[str] = ()) -> list[PlacementRule]:
    """The rules used when the caller gives none.

    Args:
        arch: the model's family.
        devices: the target devices (used by families with their own default rules).
    """
    if arch.default_rules is not None:
        return list(arch.default_rules(list(devices)))
    return [
        PlacementRule(
            match=RuleMatch(name=arch.experts_pattern),
            replace=RuleReplace(class_="kt"),
            recursive=False,
            source=f"<defaults of {arch.name}>",
            index=0,
        )
    ]

"""Matching rules to modules: depth-first over the module tree, the first matching rule wins.

As in KTransformers' rule engine: a module that matches a rule with `recursive: false` hides its
children from every rule; otherwise the walk goes on into the children, which may match rules of
their own. The root module itself is never matched. A rule that matches nothing is reported with
an `UnmatchedRuleWarning` naming its file and index.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence

from torch import nn

from kt_core.placement.schema import PlacementRule

__all__ = ["UnmatchedRuleWarning", "class_matches", "match_rules"]

logger = logging.getLogger(__name__)


class UnmatchedRuleWarning(UserWarning):
    """A placement rule matched no module of the model."""


def class_matches(module: nn.Module, class_path: str) -> bool:
    """Whether `module` is an instance of the class that `class_path` names.

    Compared by dotted path over the module's MRO, then by bare class name (case-insensitively): rule
    files written for other packages name their own modeling classes (`ktransformers.models.
    modeling_deepseek_v3.DeepseekV3MoE`, `torch.nn.Linear`) that we match to transformers' by name.
    """
    short = class_path.rsplit(".", 1)[-1].lower()
    for cls in type(module).__mro__:
        if f"{cls.__module__}.{cls.__qualname__}" == class_path or cls.__name__.lower() == short:
            return True
    return False


def _rule_matches(rule: PlacementRule, name: str, module: nn.Module) -> bool:
    if rule.match.name is not None and re.search(rule.match.name, name) is None:
        return False
    return rule.match.class_ is None or class_matches(module, rule.match.class_)


def match_rules(
    model: nn.Module, rules: Sequence[PlacementRule], *, warn_unmatched: bool = True
) -> dict[str, PlacementRule]:
    """Assigns each module the first rule it matches.

    Args:
        model: the model (any device, meta included).
        rules: in priority order.
        warn_unmatched: emit an UnmatchedRuleWarning for each rule that matched nothing.

    Returns:
        {module name: rule} for every matched module, in walk order.
    """
    matches: dict[str, PlacementRule] = {}
    hits = [0] * len(rules)

    def visit(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            for i, rule in enumerate(rules):
                if _rule_matches(rule, name, child):
                    matches[name] = rule
                    hits[i] += 1
                    break
            else:
                visit(name, child)
                continue
            if matches[name].recursive:
                visit(name, child)

    visit("", model)
    if warn_unmatched:
        for rule, count in zip(rules, hits, strict=True):
            if count == 0:
                message = f"{rule.where} ({rule.match.describe()}) matched no module of {type(model).__name__}"
                logger.warning(message)
                warnings.warn(message, UnmatchedRuleWarning, stacklevel=2)
    return matches

"""Placement rules as data: `match {name regex, class} -> replace {class, kwargs}`, first match wins.

A rule file is a YAML list:

    - match: {name: "^model\\.layers\\.\\d+\\.mlp\\.experts$"}    # re.search on the module name
      replace: {class: kt_core.experts.KTExperts, kwargs: {kernel: auto}}
      recursive: false                                          # do not place this module's children
    - match: {name: "^model$"}
      replace: {class: default, kwargs: {device: "cuda:0"}}     # Hugging Face's module, on that device

Rules are validated into these dataclasses when loaded; errors name the file and the rule index.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PlacementRule", "RuleError", "RuleMatch", "RuleReplace", "parse_rules"]


class RuleError(ValueError):
    """A rule file or rule that does not validate; the message names the file and the rule index."""


@dataclass(frozen=True)
class RuleMatch:
    """Which modules a rule applies to; every given criterion must hold.

    Args:
        name: regex searched (re.search) in the module's dotted name.
        class_: dotted path (or bare name) of a class the module is an instance of.
    """

    name: str | None = None
    class_: str | None = None

    def describe(self) -> str:
        parts = [f"name={self.name!r}"] if self.name is not None else []
        if self.class_ is not None:
            parts.append(f"class={self.class_!r}")
        return ", ".join(parts)


@dataclass(frozen=True)
class RuleReplace:
    """What to do with a matched module.

    Args:
        class_: "default" keeps Hugging Face's module; an expert backend's dotted path or name (e.g.
            `kt_core.experts.KTExperts`) swaps the experts module; legacy KTransformers classes are
            translated (see `kt_core.placement.legacy`).
        kwargs: the replacement's options (device, kernel, cpu_infer, transfer_map, ...).
    """

    class_: str = "default"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PlacementRule:
    """One rule.

    Args:
        match: the criteria.
        replace: the action.
        recursive: when False, the matched module's children are not matched against any rule.
        source: the file the rule came from ("<defaults>" for built-in rules).
        index: the rule's 0-based position in its file.
    """

    match: RuleMatch
    replace: RuleReplace = field(default_factory=RuleReplace)
    recursive: bool = True
    source: str = "<rules>"
    index: int = 0

    @property
    def where(self) -> str:
        return f"{self.source}: rule {self.index}"


def parse_rules(data: Any, source: str = "<rules>") -> list[PlacementRule]:
    """Validates a parsed YAML document (a list of rule mappings) into PlacementRules.

    Raises:
        RuleError: naming `source` and the index of the first bad rule.
    """
    if data is None:
        return []
    if not isinstance(data, list):
        raise RuleError(f"{source}: expected a YAML list of rules, got {type(data).__name__}")
    return [_parse_rule(entry, source, i) for i, entry in enumerate(data)]


def _parse_rule(entry: Any, source: str, index: int) -> PlacementRule:
    where = f"{source}: rule {index}"
    if not isinstance(entry, dict):
        raise RuleError(f"{where}: expected a mapping with 'match' and 'replace', got {type(entry).__name__}")
    unknown = set(entry) - {"match", "replace", "recursive"}
    if unknown:
        raise RuleError(f"{where}: unknown keys {sorted(unknown)} (expected match, replace, recursive)")
    match = entry.get("match")
    if not isinstance(match, dict) or not ({"name", "class"} & set(match)):
        raise RuleError(f"{where}: 'match' must be a mapping with 'name' (regex) and/or 'class' (dotted path)")
    unknown = set(match) - {"name", "class"}
    if unknown:
        raise RuleError(f"{where}: unknown match keys {sorted(unknown)} (expected name, class)")
    name, class_ = match.get("name"), match.get("class")
    for key, value in (("name", name), ("class", class_)):
        if value is not None and not isinstance(value, str):
            raise RuleError(f"{where}: match.{key} must be a string, got {value!r}")
    if name is not None:
        try:
            re.compile(name)
        except re.error as exc:
            raise RuleError(f"{where}: match.name {name!r} is not a valid regex: {exc}") from exc
    replace = entry.get("replace", {"class": "default"})
    if not isinstance(replace, dict):
        raise RuleError(f"{where}: 'replace' must be a mapping with 'class' and optional 'kwargs'")
    unknown = set(replace) - {"class", "kwargs"}
    if unknown:
        raise RuleError(f"{where}: unknown replace keys {sorted(unknown)} (expected class, kwargs)")
    replace_class = replace.get("class", "default")
    kwargs = replace.get("kwargs") or {}
    if not isinstance(replace_class, str) or not replace_class:
        raise RuleError(f"{where}: replace.class must be a non-empty string, got {replace_class!r}")
    if not isinstance(kwargs, dict):
        raise RuleError(f"{where}: replace.kwargs must be a mapping, got {type(kwargs).__name__}")
    recursive = entry.get("recursive", True)
    if not isinstance(recursive, bool):
        raise RuleError(f"{where}: 'recursive' must be true or false, got {recursive!r}")
    return PlacementRule(
        match=RuleMatch(name=name, class_=class_),
        replace=RuleReplace(class_=replace_class, kwargs=dict(kwargs)),
        recursive=recursive,
        source=source,
        index=index,
    )

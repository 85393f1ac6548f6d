"""Reading rule files: paths, our shipped `rules/<variant>.yaml`, and legacy file names.

The shipped rules are generic (`rules/single-gpu.yaml` serves every family whose experts sit at
`model.layers.N.mlp.experts`); a family that needs other rules ships `rules/<family>/<variant>.yaml`.
`<family>/<variant>.yaml` names the family's own file when there is one, else the generic file, so
`qwen3_moe/single-gpu.yaml` and `single-gpu.yaml` are the same rules today.

`load_rules("examples/kt_optimize_rules/DeepSeek-V3-Chat-sft-amx-multi-gpu.yaml")` reads the file
when it exists (a KTransformers rule file keeps working) and otherwise resolves the legacy name to
`deepseek_v3/multi-gpu.yaml`, i.e. the shipped `rules/multi-gpu.yaml`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from kt_core.placement.legacy import resolve_legacy_rule_name
from kt_core.placement.schema import PlacementRule, RuleError, parse_rules

__all__ = ["load_rules", "resolve_rule_file", "rules_dirs"]

logger = logging.getLogger(__name__)


def rules_dirs() -> list[Path]:
    """Folders holding the shipped rules: inside the installed package, then the source tree's `rules/`."""
    package = Path(__file__).resolve().parents[1]
    return [d for d in (package / "rules", package.parent / "rules") if d.is_dir()]


def resolve_rule_file(path: str | Path) -> Path:
    """Finds a rule file: an existing path, a shipped `[family/]variant.yaml`, or a legacy name.

    Raises:
        FileNotFoundError: none of these exists; the message lists what was tried.
    """
    candidate = Path(path).expanduser()
    if candidate.is_file():
        return candidate
    tried = [str(candidate)]
    names = [str(path)]
    legacy = resolve_legacy_rule_name(path)
    if legacy is not None:
        names.append(legacy)
    for root in rules_dirs():
        for name in names:
            for shipped in _shipped_candidates(root, name):
                tried.append(str(shipped))
                if shipped.is_file():
                    if name == legacy:
                        logger.info("rule file %s: using the shipped %s", path, shipped)
                    return shipped
    raise FileNotFoundError(
        f"Rule file {path} not found (tried: {', '.join(tried)}). Give a path to a YAML rule file or a "
        "shipped one such as 'single-gpu.yaml' or 'deepseek_v3/single-gpu.yaml'."
    )


def _shipped_candidates(root: Path, name: str) -> list[Path]:
    """`root/name`, then for `family/variant.yaml` of a registered family the generic `root/variant.yaml`."""
    candidates = [root / name]
    family, _, variant = name.partition("/")
    if variant and "/" not in variant and _is_family(family):
        candidates.append(root / variant)
    return candidates


def _is_family(name: str) -> bool:
    from kt_core.architectures import list_architectures

    return name in list_architectures()


def load_rules(path: str | Path) -> list[PlacementRule]:
    """Reads and validates a YAML rule file.

    Raises:
        FileNotFoundError: see resolve_rule_file.
        RuleError: invalid YAML or rule; the message names the file and the rule index.
    """
    resolved = resolve_rule_file(path)
    try:
        data = yaml.safe_load(resolved.read_text())
    except yaml.YAMLError as exc:
        raise RuleError(f"{resolved}: not valid YAML: {exc}") from exc
    return parse_rules(data, source=str(resolved))

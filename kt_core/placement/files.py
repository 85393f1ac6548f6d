"""Reading rule files: paths, our shipped `rules/<family>/<variant>.yaml`, and legacy file names.

`load_rules("examples/kt_optimize_rules/DeepSeek-V3-Chat-sft-amx-multi-gpu.yaml")` reads the file
when it exists (a KTransformers rule file keeps working) and otherwise resolves the legacy name to
the shipped `rules/deepseek_v3/multi-gpu.yaml`.
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
    """Finds a rule file: an existing path, `family/variant.yaml` under the shipped rules, or a legacy name.

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
            shipped = root / name
            tried.append(str(shipped))
            if shipped.is_file():
                if name == legacy:
                    logger.info("rule file %s: using the shipped %s", path, shipped)
                return shipped
    raise FileNotFoundError(
        f"Rule file {path} not found (tried: {', '.join(tried)}). Give a path to a YAML rule file or a "
        "shipped one such as 'deepseek_v3/single-gpu.yaml'."
    )


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

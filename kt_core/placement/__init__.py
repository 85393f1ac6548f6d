"""Placement: which module goes where, with which operator (rules as data, defaults per family)."""

from kt_core.placement.backends import get_expert_backend, list_expert_backends, register_expert_backend
from kt_core.placement.defaults import default_rules
from kt_core.placement.files import load_rules, resolve_rule_file
from kt_core.placement.matcher import UnmatchedRuleWarning, match_rules
from kt_core.placement.plan import ExpertsPlacement, PlacementPlan, resolve_placement
from kt_core.placement.schema import PlacementRule, RuleError, RuleMatch, RuleReplace, parse_rules

__all__ = [
    "ExpertsPlacement",
    "PlacementPlan",
    "PlacementRule",
    "RuleError",
    "RuleMatch",
    "RuleReplace",
    "UnmatchedRuleWarning",
    "default_rules",
    "get_expert_backend",
    "list_expert_backends",
    "load_rules",
    "match_rules",
    "parse_rules",
    "register_expert_backend",
    "resolve_placement",
    "resolve_rule_file",
]

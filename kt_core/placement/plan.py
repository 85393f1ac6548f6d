"""From matched rules to a placement plan: which experts run on an expert backend, and where every
other tensor lives (one device, or decoder layers split over several).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from kt_core.architectures.spec import Architecture
from kt_core.placement import legacy
from kt_core.placement.backends import get_expert_backend, list_expert_backends
from kt_core.placement.matcher import match_rules
from kt_core.placement.schema import PlacementRule, RuleError

__all__ = ["ExpertsPlacement", "PlacementPlan", "resolve_placement"]

logger = logging.getLogger(__name__)

KEEP = "default"  # replace.class that keeps Hugging Face's module
_KEEP_KWARGS = frozenset({"device", "devices", "transfer_map"})
# Constructor arguments the loader fills in itself (from the checkpoint), not a rule.
_BACKEND_FIXED_ARGS = frozenset({"self", "num_experts", "hidden_size", "intermediate_size", "dtype", "hidden_act"})


@dataclass(frozen=True)
class ExpertsPlacement:
    """An experts module computed by an expert backend (host memory, CPU operator)."""

    backend: str
    cls: type
    options: dict[str, Any]
    rule: PlacementRule | None = None


@dataclass
class PlacementPlan:
    """Where everything goes.

    Attributes:
        default_device: device of tensors no rule places.
        devices: {module name: device}; a tensor goes to the device of its longest named prefix.
        experts: {experts module name: ExpertsPlacement} for the experts that leave the GPU.
        layer_devices: [L] device of each decoder layer when they are split, else [].
        layers_path: dotted path of the decoder layers.
        device_sources: {device: the rule (file and index) that first placed something there}, for errors
            about devices this machine does not have.
    """

    default_device: str
    devices: dict[str, str] = field(default_factory=dict)
    experts: dict[str, ExpertsPlacement] = field(default_factory=dict)
    layer_devices: list[str] = field(default_factory=list)
    layers_path: str = "model.layers"
    device_sources: dict[str, str] = field(default_factory=dict)

    def device_of(self, name: str) -> str:
        """The device of a tensor or module (`model.layers.3.self_attn.q_proj.weight`)."""
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            device = self.devices.get(".".join(parts[:end]))
            if device is not None:
                return device
        return self.default_device

    def expert_module_of(self, name: str) -> str | None:
        """The experts module a tensor name belongs to, when it is one placed on a backend."""
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            prefix = ".".join(parts[:end])
            if prefix in self.experts:
                return prefix
        return None

    def used_devices(self) -> list[str]:
        """Devices holding non-expert tensors, in first-use order."""
        seen = [self.default_device]
        for device in self.devices.values():
            if device not in seen:
                seen.append(device)
        return seen


def resolve_placement(
    model: nn.Module,
    rules: Sequence[PlacementRule],
    *,
    arch: Architecture,
    default_device: str,
    devices: Sequence[str] | None = None,
    expert_options: dict[str, Any] | None = None,
    warn_unmatched: bool = True,
) -> PlacementPlan:
    """Matches the rules on a (meta) model and resolves them into a PlacementPlan.

    Args:
        model: the transformers model, usually on the meta device.
        rules: placement rules, first match wins.
        arch: the model's family (where its decoder layers are).
        default_device: where unplaced tensors go.
        devices: several devices to split the decoder layers over when no rule gives a split.
        expert_options: backend options from the caller (kernel, cpu_infer); a rule's own values win,
            except "auto" / null, which defer to these.
        warn_unmatched: warn about rules that match nothing.
    """
    plan = PlacementPlan(default_device=str(default_device), layers_path=arch.layers_path)
    split: tuple[PlacementRule | None, dict[str, Any]] | None = None
    explicit: dict[str, str] = {}
    actions: dict[int, tuple[str, dict[str, Any]]] = {}  # per rule: translated (and notices logged) once
    for name, rule in match_rules(model, rules, warn_unmatched=warn_unmatched).items():
        if id(rule) not in actions:
            actions[id(rule)] = _action(rule)
        kind, kwargs = actions[id(rule)][0], dict(actions[id(rule)][1])
        if kind == "experts":
            plan.experts[name] = _experts_placement(name, model.get_submodule(name), rule, kwargs, expert_options)
            continue
        if kwargs.get("device"):
            explicit[name] = str(kwargs["device"])
            plan.device_sources.setdefault(explicit[name], f"{rule.where} (places {name})")
        if (kwargs.get("devices") or kwargs.get("transfer_map")) and split is None:
            split = (rule, kwargs)
    if split is None and devices is not None and len(devices) > 1:
        split = (None, {"devices": list(devices)})
    if split is not None:
        _apply_layer_split(plan, model, arch, *split, first_device=explicit.get("model", plan.default_device))
    plan.devices.update(explicit)  # an explicit rule beats the split for the module it names
    return plan


def _action(rule: PlacementRule) -> tuple[str, dict[str, Any]]:
    """Normalizes a rule's replace into ("experts", options with "backend") or ("keep", kwargs)."""
    cls, kwargs = rule.replace.class_, dict(rule.replace.kwargs)
    if legacy.is_legacy_class(cls):
        if legacy.is_legacy_experts_class(cls):
            device = legacy.legacy_device(kwargs) or "cpu"
            if device.startswith("cpu"):
                kernel = legacy.legacy_backend_to_kernel(kwargs.get("backend"), where=rule.where)
                return "experts", {"backend": "kt", "kernel": kernel}
            return "keep", {"device": device}
        keep = {"device": legacy.legacy_device(kwargs)}
        if "transfer_map" in kwargs:
            keep["transfer_map"] = kwargs["transfer_map"]
        logger.debug("%s: %s kept as Hugging Face's module on %s", rule.where, cls, keep["device"] or "default")
        return "keep", keep
    if cls == KEEP:
        unknown = set(kwargs) - _KEEP_KWARGS - legacy.LEGACY_IGNORED_KWARGS
        if unknown:
            raise RuleError(
                f"{rule.where}: unknown kwargs {sorted(unknown)} for class 'default' (expected {sorted(_KEEP_KWARGS)})"
            )
        if "device" not in kwargs and legacy.legacy_device(kwargs):
            kwargs["device"] = legacy.legacy_device(kwargs)
        return "keep", {k: v for k, v in kwargs.items() if k in _KEEP_KWARGS}
    found = get_expert_backend(cls)
    if found is None:
        raise RuleError(
            f"{rule.where}: replace.class {cls!r} is neither 'default' (keep Hugging Face's module) nor an "
            f"expert backend ({', '.join(sorted(list_expert_backends()))}) nor a KTransformers class"
        )
    backend, backend_cls = found
    allowed = _backend_kwargs(backend_cls)
    unknown = set(kwargs) - allowed if allowed is not None else set()
    if unknown:
        raise RuleError(f"{rule.where}: unknown kwargs {sorted(unknown)} for {cls} (expected {sorted(allowed)})")
    return "experts", {"backend": backend, **kwargs}


def _backend_kwargs(cls: type) -> set[str] | None:
    params = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params} - _BACKEND_FIXED_ARGS


def _experts_placement(
    name: str, module: nn.Module, rule: PlacementRule, kwargs: dict[str, Any], caller: dict[str, Any] | None
) -> ExpertsPlacement:
    if not all(hasattr(module, p) for p in ("gate_up_proj", "down_proj")):
        raise RuleError(
            f"{rule.where}: {name} ({type(module).__name__}) is not a routed-experts module with fused "
            "gate_up_proj / down_proj; point the experts rule at `...mlp.experts`"
        )
    backend = kwargs.pop("backend")
    options = dict(caller or {})
    options.update({k: v for k, v in kwargs.items() if v is not None and v != "auto"})
    return ExpertsPlacement(backend=backend, cls=get_expert_backend(backend)[1], options=options, rule=rule)


def _numel(module: nn.Module, skip: set[str], prefix: str) -> int:
    return sum(
        p.numel() * p.element_size()
        for n, p in module.named_parameters(prefix=prefix)
        if not any(n.startswith(s + ".") for s in skip)
    )


def _apply_layer_split(
    plan: PlacementPlan,
    model: nn.Module,
    arch: Architecture,
    rule: PlacementRule | None,
    kwargs: dict[str, Any],
    *,
    first_device: str,
) -> None:
    # Imported here: kt_core.loading imports this module.
    from kt_core.loading.multi_gpu import layer_devices_from_transfer_map, split_layers

    layers = model.get_submodule(arch.layers_path)
    num_layers = len(layers)
    where = rule.where if rule is not None else "devices"
    if kwargs.get("transfer_map"):
        try:
            plan.layer_devices = layer_devices_from_transfer_map(num_layers, kwargs["transfer_map"], first_device)
        except (ValueError, TypeError) as exc:
            raise RuleError(f"{where}: {exc}") from exc
    else:
        devices = [str(d) for d in kwargs["devices"]]
        skip = set(plan.experts)
        weights = [_numel(layer, skip, f"{arch.layers_path}.{i}") for i, layer in enumerate(layers)]
        plan.layer_devices = split_layers(weights, devices)
        first_device = devices[0]
    for device in plan.layer_devices:
        plan.device_sources.setdefault(device, f"{where} (splits the decoder layers)")
    core_path = arch.layers_path.rpartition(".")[0]
    core = model.get_submodule(core_path) if core_path else model
    plan.devices[core_path or ""] = first_device
    for i, device in enumerate(plan.layer_devices):
        plan.devices[f"{arch.layers_path}.{i}"] = device
    # Modules of the core registered after the layers (final norm, rotary) and the output head run last.
    last, after = plan.layer_devices[-1], False
    layers_name = arch.layers_path.rpartition(".")[2]
    for child_name, _ in core.named_children():
        if after:
            plan.devices[f"{core_path}.{child_name}" if core_path else child_name] = last
        after = after or child_name == layers_name
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if head is not None and module is head:
            plan.devices[name] = last
    plan.default_device = first_device

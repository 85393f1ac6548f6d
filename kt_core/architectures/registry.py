"""The architecture registry: lowercase unique names, filled by the `register_architectures` hook."""

from __future__ import annotations

from kt_core.architectures.spec import Architecture
from kt_core.registry import Registry

__all__ = [
    "UnknownArchitectureError",
    "get_architecture",
    "list_architectures",
    "register_architecture",
    "unregister_architecture",
]


def _register_from_plugin(arch: Architecture) -> None:
    # A plugin re-registering after a manager reset is not an error: same name, same declaration.
    if _registry.get(arch.name) == arch:
        return
    register_architecture(arch)


_registry: Registry[Architecture] = Registry("Architecture", "register_architectures", _register_from_plugin)
_by_model_type: dict[str, str] = {}  # config model_type -> family name, guarded by _registry.lock

_HOW_TO_ADD = (
    "To add a family, register an `kt_core.Architecture` (model_types, experts_pattern, checkpoint "
    "names) from a plugin: a module with `@kt_core.hookimpl def register_architectures(register): "
    "register(Architecture(...))`, published under the entry-point group 'kt' of your package, or call "
    "kt_core.register_architecture(...) before loading."
)


class UnknownArchitectureError(ValueError):
    """Raised when no registered family loads a config's model_type."""


def register_architecture(arch: Architecture, *, replace: bool = False) -> Architecture:
    """Adds a family to the registry.

    Args:
        arch: the family declaration.
        replace: allow overriding an existing family of the same name.

    Raises:
        ValueError: the name or one of its model types is already registered (and replace is False).
    """
    if not isinstance(arch, Architecture):
        raise TypeError(f"register_architecture expects an Architecture, got {type(arch).__name__}")
    with _registry.lock:
        if _registry.get(arch.name) is not None and not replace:
            raise ValueError(f"Architecture {arch.name!r} is already registered")
        for model_type in arch.model_types:
            owner = _by_model_type.get(model_type)
            if owner is not None and owner != arch.name and not replace:
                raise ValueError(
                    f"Architecture {arch.name!r}: model_type {model_type!r} is already handled by {owner!r}"
                )
        if _registry.get(arch.name) is not None:
            _forget(arch.name)
        _registry.add(arch.name, arch)
        for model_type in arch.model_types:
            _by_model_type[model_type] = arch.name
    return arch


def unregister_architecture(name: str) -> None:
    """Removes a family (for tests and plugins that replace one)."""
    with _registry.lock:
        _forget(name)


def list_architectures() -> dict[str, Architecture]:
    """Returns {name: Architecture} of every registered family, the plugins' included."""
    return _registry.entries()


def get_architecture(model_type_or_config) -> Architecture:
    """Finds the family for a config model_type (a string, a transformers config or a config.json dict).

    Raises:
        UnknownArchitectureError: no family handles it; the message lists the supported ones.
    """
    model_type, hf_architectures = _model_type_of(model_type_or_config)
    with _registry.lock:
        families = _registry.entries()
        name = _by_model_type.get(model_type)
    if name is None and model_type in families:  # the family's own name works too
        name = model_type
    if name is not None:
        return families[name]
    supported = "\n".join(
        f"  - {a.name}: model_type {', '.join(a.model_types)}" + (f" ({a.description})" if a.description else "")
        for a in families.values()
    )
    shown = f"{model_type!r}" + (f" ({', '.join(hf_architectures)})" if hf_architectures else "")
    raise UnknownArchitectureError(
        f"Unsupported architecture: model_type {shown}. Supported families:\n{supported}\n{_HOW_TO_ADD}"
    )


def _forget(name: str) -> None:
    arch = _registry.remove(name)
    for model_type in arch.model_types:
        if _by_model_type.get(model_type) == name:
            del _by_model_type[model_type]


def _model_type_of(obj) -> tuple[str, list[str]]:
    if isinstance(obj, str):
        return obj, []
    if isinstance(obj, dict):
        return str(obj.get("model_type")), list(obj.get("architectures") or [])
    return str(getattr(obj, "model_type", None)), list(getattr(obj, "architectures", None) or [])


def _reset_for_tests() -> None:
    """Makes the next lookup collect the plugins' registrations again."""
    _registry.reset_for_tests()
